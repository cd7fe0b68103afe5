"""End-to-end analyses that write a results folder: tables (text), tensors (safetensors),
metadata (JSON) and plots (PNG). The command line runs these."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from safetensors.torch import save_file

from mm_lens.analysis.answers import with_choices
from mm_lens.analysis.convergence import ConvergenceResult, analyze_convergence
from mm_lens.analysis.dose_response import DOSES, DoseResponse, dose_response
from mm_lens.analysis.evaluation import CrossDomainResult, evaluate_cross_domain
from mm_lens.analysis.lens import LensSummary, logit_lens_summary
from mm_lens.analysis.patching import PatchingResult, patch_sweep
from mm_lens.base.display import text_table
from mm_lens.base.io import close_results_folder, open_results_folder
from mm_lens.base.modality import MODALITIES
from mm_lens.model.fingerprint import data_fingerprint, model_fingerprint
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.inputs import answer_token_ids
from mm_lens.model.samples import (
    Sample,
    Samples,
    chat_prompt,
    first_per_domain,
    prompt_batch,
    sample_column,
    with_images,
)
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.neurons.domain_neurons import select_domain_neurons
from mm_lens.neurons.miner import DEFAULT_METRIC_WEIGHTS
from mm_lens.neurons.modality_neurons import (
    MinerScores,
    collect_miner_scores,
    select_modality_neurons,
)
from mm_lens.neurons.neuron_set import NeuronSet, library_versions
from mm_lens.neurons.statistics import NeuronStats, NeuronStatsCollector
from mm_lens.presentation.report import HTMLReport
from mm_lens.presentation.visualize import patching_pictures


@dataclass
class DomainNeuronRun:
    """Everything ``run_domain_neurons`` computed; the same is on disk under ``out``."""

    stats: NeuronStats
    neurons: NeuronSet
    evaluation: CrossDomainResult
    dose_response: DoseResponse | None
    out: Path


@dataclass
class MinerRun:
    """Everything ``run_miner`` computed; the same is on disk under ``out``."""

    scores: MinerScores
    neurons: NeuronSet
    deactivation: CrossDomainResult
    convergence: ConvergenceResult
    out: Path


def _open_results(out: str | Path, command: str, model: HookedMLLM, samples: Samples, settings: Mapping[str, Any], overwrite: bool) -> Path:
    """Claim the results folder for this run (see ``base.io.open_results_folder``)."""
    manifest = {"command": command, "model": model_fingerprint(model), "data": data_fingerprint(samples),
                "settings": dict(settings), "versions": library_versions()}
    return open_results_folder(out, manifest, overwrite)


def _section(report: HTMLReport, heading: str, table: str, out: Path, *figures: tuple[Any, str, str]) -> None:
    """A report section: heading, a text table, then figures ``(figure, file name, caption)``
    saved as PNG files in ``out``."""
    report.add_heading(heading)
    report.add_preformatted(table)
    for figure, name, caption in figures:
        report.add_figure(figure, caption, dpi=110, save_as=out / name)


def _means(stats: NeuronStats | None, mode: str) -> dict[str, torch.Tensor] | None:
    """Mean ablation's replacement values: each neuron's mean over the collected positions."""
    return stats.neuron_means() if mode == "mean" and stats is not None else None


def _dose_sentence(curve: DoseResponse, metric: str = "answer_logprob") -> str:
    """What the largest dose does to each group's own domain, next to random."""
    dose = curve.doses[-1]
    parts = []
    for group in curve.groups:
        c = curve.curve(group, metric)
        parts.append(f"{group} {c['chosen'][-1]:+.2f} (random {c['random'][-1]:+.2f})")
    return f"With {dose:.0%} of each group's neurons off, own-domain {metric.replace('_', ' ')} changes by: " + "; ".join(parts) + "."


def run_domain_neurons(
    model: HookedMLLM,
    samples: Samples,
    out: str | Path,
    *,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    activation_bar_ratio: float = 0.95,
    mode: str = "zero",
    seeds: Sequence[int] = (0, 1, 2),
    doses: Sequence[float] = DOSES,
    dose_samples: int = 16,
    evaluation_samples: int = 64,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = True,
    overwrite: bool = False,
) -> DomainNeuronRun:
    """MMNeuron end to end on the samples that have an image: statistics of every neuron
    module (checkpointed under ``out``), LAPE selection, deactivation of each domain's
    neurons against matched random controls (``mode="mean"`` replaces them by their mean
    over the statistics), evaluated on the first ``evaluation_samples`` samples of each
    domain, and a dose-response curve over ``doses`` (fractions of neurons; empty: none) on
    the first ``dose_samples`` of those per domain.
    Writes tables, tensors, plots and ``report.html``, which opens with what was measured."""
    settings = dict(top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=activation_bar_ratio, mode=mode,
                    seeds=list(seeds), doses=list(doses), dose_samples=dose_samples, evaluation_samples=evaluation_samples,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens)
    out = _open_results(out, "neurons", model, samples, settings, overwrite)
    image_samples = with_images(samples)
    if not image_samples:
        raise ValueError("no sample has an image; domain-specific neurons are found on image samples")
    stats = collect_neuron_stats(
        model, image_samples, batch_size=batch_size, checkpoint=out / "stats.checkpoint.safetensors", progress=progress
    )
    stats.save(out / "stats.safetensors", overwrite=True)
    neurons = select_domain_neurons(stats, top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=activation_bar_ratio)
    neurons.save(out / "neurons", overwrite=True)
    (out / "neurons.txt").write_text(neurons.table() + "\n")

    evaluated = with_choices(first_per_domain(image_samples, evaluation_samples), image_samples)
    means = _means(stats, mode)
    evaluation = evaluate_cross_domain(
        model, evaluated, neurons, seeds=seeds, mode=mode, means=means,
        batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
    )
    evaluation.save(out / "evaluation", overwrite=True)
    story = evaluation.summary("answer_logprob")
    curve = None
    if doses:
        curve = dose_response(
            model, first_per_domain(evaluated, dose_samples),
            lambda rate: select_domain_neurons(stats, top_rate=rate, filter_rate=filter_rate, activation_bar_ratio=activation_bar_ratio),
            doses=doses, seeds=seeds, mode=mode, means=means, batch_size=batch_size, progress=progress,
        )
        curve.save(out / "dose_response", overwrite=True)
        (out / "dose_response.txt").write_text(curve.table() + "\n")
        story += " " + _dose_sentence(curve)
    (out / "evaluation.txt").write_text(story + "\n\n" + evaluation.tables() + "\n")

    report = HTMLReport("Domain-specific neurons (MMNeuron)")
    report.add_text(story)
    report.add_text(f"Model: {getattr(model.cfg, 'model_name', '?')}; {len(image_samples)} image samples "
                    f"({len(evaluated)} evaluated); domains: {', '.join(stats.domains)}; LAPE top rate {top_rate:g}; "
                    f"deactivation: {mode}; random controls: seeds {', '.join(map(str, seeds))}.")
    _section(report, "Switching each domain's neurons off, against matched random neurons", evaluation.tables(), out,
             (evaluation.plot("answer_logprob"), "evaluation_logprob.png", "Change of the answer's log-probability (nats)"),
             (evaluation.plot("margin"), "evaluation_margin.png", "Change of the answer's margin over the other answers of its set (nats)"),
             (evaluation.plot("accuracy"), "evaluation_accuracy.png", "Change of greedy exact-match accuracy"))
    if curve is not None:
        _section(report, "Dose-response: more neurons off", curve.table(), out,
                 (curve.plot(), "dose_response.png", "Own-domain change of the answer log-prob; grey: random neurons (mean ± sd)"))
    _section(report, "Neurons per domain, module and layer", neurons.table(), out,
             (neurons.plot(), "neurons_per_layer.png", "Domain-specific neurons over layers, per module"),
             (neurons.plot_overlap("lm_mlp" if "lm_mlp" in neurons.modules else None), "neurons_overlap.png",
              "Neurons shared between domains"))
    report.save(out / "report.html")
    close_results_folder(out)
    return DomainNeuronRun(stats, neurons, evaluation, curve, out)


def _miner_means(model: HookedMLLM, samples: Samples, mode: str, batch_size: int) -> dict[str, torch.Tensor] | None:
    """For ``mode="mean"``: each LM MLP neuron's mean over the evaluated samples' positions."""
    if mode != "mean":
        return None
    stats = collect_neuron_stats(model, samples, modules=["lm_mlp"], classes=["all"], batch_size=batch_size, progress=False)
    return stats.neuron_means()


def run_miner(
    model: HookedMLLM,
    datasets: Mapping[str, Samples],
    out: str | Path,
    *,
    modalities: Sequence[str] = ("text", "image"),
    ratio: float = 0.02,
    strategy: str = "LA_MU",
    weights: Mapping[str, float] = DEFAULT_METRIC_WEIGHTS,
    mode: str = "zero",
    seeds: Sequence[int] = (0, 1, 2),
    published_attention: bool = False,
    evaluation_samples: int = 64,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = True,
    overwrite: bool = False,
) -> MinerRun:
    """MINER end to end: importance scores over ``datasets`` ({name: samples}), selection of
    modality-specific neurons, deactivation per modality and of all of them against matched
    random controls (accuracy per dataset), and convergence curves with and without them.

    Evaluation and convergence use the first ``evaluation_samples`` samples of each dataset
    (samples need an ``answer``).
    """
    every = [sample for name in sorted(datasets) for sample in datasets[name]]
    settings = dict(datasets=sorted(datasets), modalities=list(modalities), ratio=ratio, strategy=strategy, weights=dict(weights),
                    mode=mode, seeds=list(seeds), published_attention=published_attention,
                    evaluation_samples=evaluation_samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    out = _open_results(out, "miner", model, every, settings, overwrite)
    scores = collect_miner_scores(
        model, datasets, modalities=modalities, published_attention=published_attention, batch_size=batch_size, progress=progress
    )
    scores.save(out / "scores.safetensors", overwrite=True)
    neurons = select_modality_neurons(scores, weights=weights, ratio=ratio, strategy=strategy)
    neurons.save(out / "neurons", overwrite=True)
    (out / "neurons.txt").write_text(neurons.table() + "\n\noverlap between modalities\n" + str(neurons.overlap().tolist()) + "\n")

    evaluation = with_choices(
        [dict(s, domain=name) for name, samples in datasets.items() for s in list(samples)[:evaluation_samples]],
        [dict(s, domain=name) for name, samples in datasets.items() for s in list(samples)],
    )
    deactivation = evaluate_cross_domain(
        model, evaluation, neurons, seeds=seeds, mode=mode, means=_miner_means(model, evaluation, mode, batch_size),
        include_union=True, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
    )
    deactivation.save(out / "deactivation", overwrite=True)
    story = deactivation.summary("answer_logprob") + " " + deactivation.summary("accuracy")
    (out / "deactivation.txt").write_text(story + "\n\n" + deactivation.tables() + "\n")

    with_answers = [s for s in evaluation if s.get("answer")]
    positional = [m for m in modalities if m in MODALITIES]  # special_text / prompt are unions, not curves
    convergence = analyze_convergence(model, with_answers, modalities=positional, neurons=neurons, batch_size=batch_size, progress=progress)
    convergence.save(out / "convergence", overwrite=True)
    (out / "convergence.txt").write_text(convergence.table() + "\n")

    report = HTMLReport("Modality-specific neurons (MINER)")
    report.add_text(story)
    report.add_text(f"Datasets: {', '.join(f'{k} ({len(v)})' for k, v in datasets.items())}; modalities: {', '.join(modalities)}; "
                    f"ratio {ratio}, strategy {strategy}; deactivation: {mode}.")
    _section(report, "Switching them off, against matched random neurons", deactivation.tables(), out,
             (deactivation.plot("answer_logprob"), "deactivation_logprob.png", "Change of the answer log-prob per dataset (nats)"),
             (deactivation.plot("accuracy"), "deactivation_accuracy.png", "Change of greedy exact-match accuracy per dataset"))
    _section(report, "Neurons per modality and layer", neurons.table(), out,
             (neurons.plot_layers("lm_mlp"), "neurons_per_layer.png", "Modality-specific neurons over layers"),
             (neurons.plot_overlap(), "neurons_overlap.png", "Neurons shared between modalities"))
    _section(report, "Convergence of modalities over layers", convergence.table(), out,
             (convergence.plot(), "convergence.png", "Solid: as is; dashed: modality-specific neurons off"))
    report.save(out / "report.html")
    close_results_folder(out)
    return MinerRun(scores, neurons, deactivation, convergence, out)


@dataclass
class PatchingRun:
    """The two sweeps of ``run_patching`` and what was compared."""

    by_position: PatchingResult
    by_cell: PatchingResult
    description: str
    out: Path


def counterfactual_pair(samples: Samples, domain: str | None = None) -> tuple[Sample, Sample]:
    """Two samples of one domain with the same question, same image size and different
    answers (the first such pair): a clean and a corrupted input for patching."""
    domains = sample_column(samples, "domain")
    for i, first in enumerate(domains):
        if domain is not None and first != domain:
            continue
        a = samples[i]
        if not isinstance(a.get("image"), Image.Image):
            continue
        for j in range(i + 1, len(domains)):
            b = samples[j]
            if (domains[j] == first and isinstance(b.get("image"), Image.Image) and b["question"] == a["question"]
                    and b["answer"] != a["answer"] and b["image"].size == a["image"].size):
                return a, b
    where = f"domain {domain!r}" if domain else "any domain"
    raise ValueError(f"no two samples of {where} share a question and image size with different answers")


def run_patching(
    model: HookedMLLM,
    samples: Samples,
    out: str | Path,
    *,
    domain: str | None = None,
    hook: str = "resid_pre",
    metric: str = "logit_diff",
    progress: bool = True,
    overwrite: bool = False,
) -> PatchingRun:
    """Patch a clean image's activations into a corrupted image's run (same question,
    different answers): per layer and position, and per image cell drawn over the picture."""
    out = _open_results(out, "patch", model, samples, dict(domain=domain, hook=hook, metric=metric), overwrite)
    clean_sample, corrupted_sample = counterfactual_pair(samples, domain)
    clean = model.prepare_inputs([clean_sample["question"]], [clean_sample["image"]])
    corrupted = model.prepare_inputs([corrupted_sample["question"]], [corrupted_sample["image"]])
    prompt = chat_prompt(model, clean_sample)
    answer = torch.tensor(answer_token_ids(model.processor, prompt, clean_sample["answer"])[:1])
    wrong = torch.tensor(answer_token_ids(model.processor, prompt, corrupted_sample["answer"])[:1])
    answers = {"answer_tokens": answer, "wrong_tokens": wrong} if metric == "logit_diff" else {}
    by_position = patch_sweep(model, clean, corrupted, hook=hook, positions="all", metric=metric, progress=progress, **answers)
    by_cell = patch_sweep(model, clean, corrupted, hook=hook, positions="image", per="cell", metric=metric, progress=progress, **answers)
    by_position.save(out / "by_position", overwrite=True)
    by_cell.save(out / "by_cell", overwrite=True)
    description = (f"{clean_sample['domain']}: '{clean_sample['question']}' — clean answer '{clean_sample['answer']}', "
                   f"corrupted answer '{corrupted_sample['answer']}'; {metric} clean {by_position.clean_metric:+.3f}, "
                   f"corrupted {by_position.corrupted_metric:+.3f}")
    (out / "pair.json").write_text(json.dumps({"clean": {k: clean_sample[k] for k in ("question", "answer", "domain")},
                                               "corrupted": {k: corrupted_sample[k] for k in ("question", "answer", "domain")},
                                               "description": description}, indent=2))
    strongest = by_cell.layers[int(by_cell.effect.abs().sum(1).argmax())]
    mm = clean.modality_map
    figure = patching_pictures(model, clean, by_cell.position_values(strongest, mm.shape), clean_sample["image"],
                               corrupted_sample["image"], title=f"effect per image cell, layer {strongest}",
                               label="effect (0 = corrupted, 1 = clean)")

    report = HTMLReport("Activation patching across images")
    report.add_text(description)
    report.add_figure(by_position.plot(), "Effect per layer and position (0 = corrupted, 1 = clean)", save_as=out / "by_position.png")
    report.add_figure(figure, f"The clean and corrupted pictures, and the effect of patching each image cell at layer {strongest} "
                              "(the layer where cells matter most), drawn in the clean picture's frame", save_as=out / "by_cell_pictures.png")
    report.add_figure(by_cell.plot(), "Effect per layer and image cell", save_as=out / "by_cell.png")
    report.save(out / "report.html")
    close_results_folder(out)
    return PatchingRun(by_position, by_cell, description, out)


def folder_report(folder: str | Path) -> Path:
    """Rebuild ``report.html`` of a results folder: from ``report.json`` (the command's own
    text, tables and captions, with the PNG files read again) where the command wrote one,
    else from the folder's text tables and PNG plots."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a results folder")
    if (folder / "report.json").is_file():
        return HTMLReport.rebuild(folder / "report.html").save(folder / "report.html")
    tables, pictures = sorted(folder.glob("*.txt")), sorted(folder.glob("*.png"))
    if not tables and not pictures:
        raise ValueError(f"{folder} holds no tables (*.txt) or plots (*.png); run an analysis command first")
    report = HTMLReport(f"mm_lens results: {folder.name}")
    for table in tables:
        report.add_heading(table.stem.replace("_", " "))
        report.add_preformatted(table.read_text())
    for picture in pictures:
        report.add_heading(picture.stem.replace("_", " "))
        report.add_image(picture)
    return report.save(folder / "report.html")


@dataclass
class LogitLensRun:
    """The per-domain logit-lens summary of ``run_logit_lens``."""

    summary: LensSummary
    out: Path


def run_logit_lens(
    model: HookedMLLM,
    samples: Samples,
    out: str | Path,
    *,
    positions: str = "image",
    batch_size: int = 8,
    progress: bool = True,
    overwrite: bool = False,
) -> LogitLensRun:
    """Logit lens at image positions of the samples with an image: entropy per layer and
    domain, most frequent top-1 tokens, three stages; tables, plot and ``report.html``."""
    out = _open_results(out, "logit-lens", model, samples, dict(positions=positions, batch_size=batch_size), overwrite)
    image_samples = with_images(samples)
    if not image_samples:
        raise ValueError("no sample has an image; the logit lens on image tokens needs some")
    summary = logit_lens_summary(model, image_samples, positions=positions, batch_size=batch_size, progress=progress)
    summary.save(out / "lens.safetensors", overwrite=True)
    text = summary.table() + "\n\n"
    if len(summary.layers) >= 3:
        text += "stages (first layer of stage 2, first layer of stage 3):\n"
        text += "\n".join(f"  {domain}: {b1}, {b2}" for domain, (b1, b2) in summary.stages().items()) + "\n"
    else:
        text += f"no three-stage split: the model has {len(summary.layers)} layer(s), fewer than 3\n"
    (out / "logit_lens.txt").write_text(text)
    report = HTMLReport("Logit lens on image tokens")
    report.add_text(summary.summary())
    report.add_text(f"{len(image_samples)} samples; positions: {positions}; final norm and unembedding applied to each layer's residual.")
    report.add_preformatted(text)
    report.add_figure(summary.plot(), "Entropy of the lens distribution per layer (± std over positions), stage boundaries dashed",
                      save_as=out / "logit_lens.png")
    report.save(out / "report.html")
    close_results_folder(out)
    return LogitLensRun(summary, out)


@dataclass
class InspectRun:
    """``run_inspect``'s ModalityMap summary and one row per module, layer and token group."""

    modality_map: str
    rows: list[dict[str, Any]]
    out: Path

    def table(self) -> str:
        """Tokens, mean activation and share of positive activations per module, layer and group."""
        return text_table(
            ["module", "layer", "group", "tokens", "mean", ">0"],
            [[r["module"], r["layer"], r["group"], r["tokens"], f"{r['mean']:.4f}", f"{r['fraction_positive']:.2f}"] for r in self.rows],
        )


def run_inspect(model: HookedMLLM, samples: Samples, out: str | Path) -> InspectRun:
    """Where the media tokens of a small batch sit, and how each neuron module fires on
    image and text positions (streaming statistics, one class per group). Writes
    ``summary.json`` and ``neuron_means.safetensors`` (mean activation per neuron)."""
    out = Path(out)
    batch = prompt_batch(model, samples)
    domains = ["inspect"] * len(samples)
    collector = NeuronStatsCollector(model, ["inspect"], classes=(model.spec.encoder_modality, "text"))
    collector.update(batch, domains)
    rows, tensors = [], {}
    for module, stats in collector.stats.modules.items():
        means, positive = stats.mean(), stats.probability()
        for layer in range(stats.n_tokens.shape[0]):
            for c, group in enumerate(collector.stats.classes):
                tokens = int(stats.n_tokens[layer, 0, c])
                if tokens == 0:
                    continue
                tensors[f"{module}.{layer}.{group}.mean"] = means[layer, 0, c].float().contiguous()
                rows.append({"module": module, "layer": layer, "group": group, "tokens": tokens,
                             "mean": float(means[layer, 0, c].mean()), "fraction_positive": float(positive[layer, 0, c].mean())})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "neuron_means.safetensors"))
    summary = batch.modality_map.summary()
    (out / "summary.json").write_text(json.dumps({"model": getattr(model.cfg, "model_name", "?"), "modality_map": summary, "neurons": rows}, indent=2))
    return InspectRun(summary, rows, out)
