"""End-to-end analyses that write a results folder: tables (text), tensors (safetensors),
metadata (JSON) and plots (PNG). The command line runs these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mm_lens.collect import Sample
from mm_lens.convergence import ConvergenceResult, analyze_convergence
from mm_lens.modality import MODALITIES
from mm_lens.evaluation import CrossDomainResult, evaluate_cross_domain
from mm_lens.modality_neurons import MinerScores, collect_miner_scores, select_modality_neurons
from mm_lens.neurons import NeuronSet
from mm_lens.specificity import DEFAULT_METRIC_WEIGHTS


@dataclass
class MinerRun:
    """Everything ``run_miner`` computed; the same is on disk under ``out``."""

    scores: MinerScores
    neurons: NeuronSet
    deactivation: CrossDomainResult
    convergence: ConvergenceResult
    out: Path


def _save_figure(figure: Any, path: Path) -> None:
    figure.savefig(path, dpi=120, bbox_inches="tight")


def run_miner(
    model: Any,
    datasets: Mapping[str, Sequence[Sample]],
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
) -> MinerRun:
    """MINER end to end: importance scores over ``datasets`` ({name: samples}), selection of
    modality-specific neurons, deactivation per modality and of all of them against matched
    random controls (accuracy per dataset), and convergence curves with and without them.

    Evaluation and convergence use the first ``evaluation_samples`` samples of each dataset
    (samples need an ``answer``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = collect_miner_scores(
        model, datasets, modalities=modalities, published_attention=published_attention, batch_size=batch_size, progress=progress
    )
    scores.save(out / "scores.safetensors")
    neurons = select_modality_neurons(scores, weights=weights, ratio=ratio, strategy=strategy)
    neurons.save(out / "neurons")
    (out / "neurons.txt").write_text(neurons.table() + "\n\noverlap between modalities\n" + str(neurons.overlap().tolist()) + "\n")
    _save_figure(neurons.plot_layers("lm_mlp"), out / "neurons_per_layer.png")
    _save_figure(neurons.plot_overlap(), out / "neurons_overlap.png")

    evaluation = [
        dict(s, domain=name) for name, samples in datasets.items() for s in list(samples)[:evaluation_samples]
    ]
    deactivation = evaluate_cross_domain(
        model, evaluation, neurons, seeds=seeds, mode=mode, include_union=True,
        batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
    )
    deactivation.save(out / "deactivation")
    (out / "deactivation.txt").write_text(
        "\n\n".join(deactivation.table(metric) for metric in ("accuracy", "answer_logprob", "hidden_change")) + "\n"
    )
    _save_figure(deactivation.plot("accuracy"), out / "deactivation_accuracy.png")
    _save_figure(deactivation.plot("answer_logprob"), out / "deactivation_logprob.png")

    with_answers = [s for s in evaluation if s.get("answer")]
    positional = [m for m in modalities if m in MODALITIES]  # special_text / prompt are unions, not curves
    convergence = analyze_convergence(model, with_answers, modalities=positional, neurons=neurons, batch_size=batch_size, progress=progress)
    convergence.save(out / "convergence")
    (out / "convergence.txt").write_text(convergence.table() + "\n")
    _save_figure(convergence.plot(), out / "convergence.png")
    return MinerRun(scores, neurons, deactivation, convergence, out)
