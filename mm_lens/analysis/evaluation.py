"""Does switching neurons off hurt the answers? Greedy exact match, answer log-probability
and the change of the final hidden state, per domain, against matched random controls.

Samples are mappings with ``question``, ``image`` (or None / a list), ``answer`` and
``domain``. Answers are decoded greedily (the published MMNeuron code sampled at
temperature 0.9; we don't).
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from einops import rearrange, reduce
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.base.hooks import block_hook
from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.model.generation_check import check_generation
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.inputs import answer_token_ids
from mm_lens.model.samples import (
    Sample,
    Samples,
    chat_prompt,
    chunk_media,
    prompt_batch,
    sample_chunks,
    sample_column,
)
from mm_lens.neurons.deactivation import Deactivation, check_neurons_fit
from mm_lens.base.display import new_figure
from mm_lens.neurons.neuron_set import NeuronSet

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """VQA-style normal form: lower case, no punctuation or articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass
class AnswerScores:
    """Per-sample results of one evaluation run."""

    correct: Bool[Tensor, "sample"]
    answer_logprob: Float[Tensor, "sample"]
    final_hidden: Float[Tensor, "sample d_model"]
    predictions: list[str]


def _greedy_answers(model: HookedMLLM, batch: Any, hooks: list, max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (``model.generate`` with the hooks active)."""
    with model.hooks(fwd_hooks=hooks):
        return model.generate(batch, max_new_tokens=max_new_tokens).text


def _first_nonfinite(model: HookedMLLM, batch: Any, hooks: list) -> str:
    """The first residual-stream hook (embedding, then each block's output) holding NaN or
    inf at a real (unpadded) position of ``batch``, rerun with the same ``hooks``."""
    names = ["hook_embed"] + [block_hook(layer, "resid_post") for layer in range(model.cfg.n_layers)]
    keep = batch["attention_mask"].bool()
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in names)
    for name in names:
        if name in cache and not bool(torch.isfinite(cache[name][keep.to(cache[name].device)]).all()):
            return name if name == "hook_embed" else f"{name} (layer {name.split('.')[1]})"
    return "the logits only (every residual hook is finite)"


def _teacher_forced(
    model: HookedMLLM, chunk: Sequence[Sample], deactivate: Deactivation | None, where: str, allow_nonfinite: bool
):
    """Sum of the answer tokens' log-probabilities and the last layer's residual at the last
    prompt position, with the prompt and the answer in one left-padded forward. Inputs the
    architecture derives from the prompt alone (``spec.prompt_only_inputs``, e.g.
    InstructBLIP's Q-Former instruction) come from the prompt without the answer. NaN or inf
    in the log-probabilities is an error naming the first hook that holds it and ``where``
    (the batch) unless ``allow_nonfinite``."""
    media = chunk_media(chunk)
    prompts = [chat_prompt(model, s) for s in chunk]
    batch = model.prepare_inputs([p + " " + s["answer"] for p, s in zip(prompts, chunk)], **media, chat=False)
    if model.spec.prompt_only_inputs:
        question_only = model.prepare_inputs(prompts, **media, chat=False)
        batch.inputs.update({name: question_only[name] for name in model.spec.prompt_only_inputs})
    lengths = [len(answer_token_ids(model.processor, p, s["answer"])) for p, s in zip(prompts, chunk)]
    final = block_hook(model.cfg.n_layers - 1, "resid_post")
    saved = {}

    def save_final(resid: Tensor, hook: Any) -> None:
        saved["resid"] = resid.detach()

    hooks = _hooks(model, batch, deactivate) + [(final, save_final)]
    with torch.no_grad():
        log_probs = model.run_with_hooks(batch, fwd_hooks=hooks).log_softmax(-1)
    if not allow_nonfinite and not bool(torch.isfinite(log_probs[batch["attention_mask"].bool()]).all()):
        raise ValueError(
            f"NaN or inf in the answer scores of {where}: first seen at {_first_nonfinite(model, batch, hooks)}. "
            "Check the model, its dtype and the inputs (and the deactivation's replacement values), or pass allow_nonfinite=True"
        )
    end, ids = batch["input_ids"].shape[1], batch["input_ids"]
    logprob = torch.stack([
        log_probs[row, end - n - 1 : end - 1].gather(-1, ids[row, end - n :, None]).sum() for row, n in enumerate(lengths)
    ])
    hidden = torch.stack([saved["resid"][row, end - n - 1] for row, n in enumerate(lengths)])
    return logprob, hidden


def _hooks(model: HookedMLLM, batch: Any, deactivate: Deactivation | None) -> list:
    return [] if deactivate is None else deactivate.hooks(model, batch.modality_map)


def score_answers(
    model: HookedMLLM,
    samples: Samples,
    *,
    deactivate: Deactivation | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> AnswerScores:
    """Greedy answers with exact match, teacher-forced answer log-probability (sum over the
    answer's tokens), and the last layer's residual at the last prompt position.

    ``deactivate``: a ``Deactivation`` (neurons, mode, positions, ...); its hooks are rebuilt
    per batch with that batch's ModalityMap. NaN or inf in the scores is an error naming the
    hook and batch unless ``allow_nonfinite``.
    """
    sample_column(samples, "answer")  # every sample needs its answer, checked before any batch runs
    correct, logprobs, hidden, predictions = [], [], [], []
    chunks = list(sample_chunks(samples, batch_size))
    for number, (start, chunk) in enumerate(tqdm(chunks, desc="answers", disable=not progress, unit="batch")):
        prompt = prompt_batch(model, chunk)
        answers = _greedy_answers(model, prompt, _hooks(model, prompt, deactivate), max_new_tokens)
        predictions += answers
        correct += [normalize_answer(a) == normalize_answer(s["answer"]) for a, s in zip(answers, chunk)]
        domains = ", ".join(sorted({str(s.get("domain", "?")) for s in chunk}))
        where = f"batch {number} (samples {start}-{start + len(chunk) - 1}, domains {domains})"
        logprob, final = _teacher_forced(model, chunk, deactivate, where, allow_nonfinite)
        logprobs.append(logprob)
        hidden.append(final)
    return AnswerScores(
        correct=torch.tensor(correct, dtype=torch.bool),
        answer_logprob=torch.cat(logprobs).double().cpu(),
        final_hidden=torch.cat(hidden).double().cpu(),
        predictions=predictions,
    )


METRICS: tuple[str, ...] = ("accuracy", "answer_logprob", "hidden_change")
UNION = "(all)"  # row of CrossDomainResult with every group's neurons off at once


def _per_domain(scores: AnswerScores, baseline: AnswerScores | None, labels: list[str], domains: list[str]) -> dict[str, Tensor]:
    """Metric -> ``[domain]`` means: accuracy, mean answer log-prob, mean relative change of
    the final hidden state against ``baseline`` (0 without one)."""
    change = torch.zeros(len(labels), dtype=torch.float64)
    if baseline is not None:
        change = (scores.final_hidden - baseline.final_hidden).norm(dim=-1) / baseline.final_hidden.norm(dim=-1)
    per_sample = {"accuracy": scores.correct.double(), "answer_logprob": scores.answer_logprob, "hidden_change": change}
    masks = [torch.tensor([label == d for label in labels]) for d in domains]
    return {m: torch.stack([values[mask].mean() for mask in masks]) for m, values in per_sample.items()}


@dataclass
class CrossDomainResult:
    """Effect of deactivating each group's neurons on every evaluation domain.

    ``baseline[metric]``: ``[domain]``; ``chosen[metric]``: ``[group, domain]`` with group
    ``g``'s neurons off; ``random[metric]``: ``[seed, group, domain]`` with matched random
    neurons off. Metrics: accuracy (greedy exact match), answer_logprob, hidden_change.
    """

    groups: list[str]
    domains: list[str]
    baseline: dict[str, Tensor]
    chosen: dict[str, Tensor]
    random: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def delta(self, metric: str = "accuracy") -> Float[Tensor, "group domain"]:
        """Chosen neurons off minus baseline."""
        return self.chosen[metric] - rearrange(self.baseline[metric], "domain -> 1 domain")

    def random_delta(self, metric: str = "accuracy") -> tuple[Tensor, Tensor]:
        """Mean and standard deviation over seeds of random-control minus baseline."""
        deltas = self.random[metric] - rearrange(self.baseline[metric], "domain -> 1 1 domain")
        spread = deltas.std(dim=0, unbiased=False) if deltas.shape[0] > 1 else torch.zeros_like(deltas[0])
        return reduce(deltas, "seed group domain -> group domain", "mean"), spread

    def table(self, metric: str = "accuracy") -> str:
        """Baseline, then per deactivated group: chosen delta and random delta (mean ± std)."""
        chosen, (random_mean, random_std) = self.delta(metric), self.random_delta(metric)
        rows = [
            [f"{c:+.3f} (rnd {m:+.3f}±{s:.3f})" for c, m, s in zip(chosen[g].tolist(), random_mean[g].tolist(), random_std[g].tolist())]
            for g in range(len(self.groups))
        ]
        width = max(len(x) for x in [*self.domains, *(cell for row in rows for cell in row)]) + 2
        label = max(len(g) for g in self.groups) + 6
        lines = [f"{metric}: change when each group's neurons are off (random control: mean ± std over {self.random[metric].shape[0]} seeds)"]
        lines.append(" " * label + "".join(f"{d:>{width}}" for d in self.domains))
        lines.append(f"{'baseline':<{label}}" + "".join(f"{v:>{width}.3f}" for v in self.baseline[metric].tolist()))
        for group, cells in zip(self.groups, rows):
            lines.append(f"{group + ' off':<{label}}" + "".join(f"{cell:>{width}}" for cell in cells))
        return "\n".join(lines)

    def tables(self) -> str:
        """``table`` of every metric, one after the other."""
        return "\n\n".join(self.table(metric) for metric in METRICS)

    def plot(self, metric: str = "accuracy"):
        """Heatmaps of the change with the chosen neurons off and with random ones off."""
        chosen, (random_mean, _) = self.delta(metric), self.random_delta(metric)
        limit = max(float(chosen.abs().max()), float(random_mean.abs().max()), 1e-9)
        figure = new_figure(4 + 1.6 * len(self.domains), 0.9 * len(self.groups) + 2.5)
        axes = figure.subplots(1, 2)
        for ax, values, title in ((axes[0], chosen, "domain neurons off"), (axes[1], random_mean, "random neurons off (mean)")):
            image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
            ax.set_xticks(range(len(self.domains)), self.domains, rotation=45, ha="right")
            ax.set_yticks(range(len(self.groups)), [f"{g} off" for g in self.groups])
            ax.set_xlabel("evaluated domain")
            ax.set_title(f"{title}: Δ {metric}")
            for (i, j), v in zip(((i, j) for i in range(len(self.groups)) for j in range(len(self.domains))), values.flatten().tolist()):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8)
        figure.colorbar(image, ax=axes, shrink=0.8)
        return figure

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> None:
        """``folder/cross_domain.safetensors``: every matrix, groups, domains and metadata."""
        tensors = {f"{part}/{metric}": getattr(self, part)[metric] for part in ("baseline", "chosen", "random") for metric in METRICS}
        save_tensors(Path(folder) / "cross_domain.safetensors", tensors, {"groups": self.groups, "domains": self.domains, "metadata": self.metadata}, "CrossDomainResult", overwrite)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "CrossDomainResult":
        tensors, header = load_tensors(Path(folder) / "cross_domain.safetensors", "CrossDomainResult")
        parts = {part: {m: tensors[f"{part}/{m}"] for m in METRICS} for part in ("baseline", "chosen", "random")}
        return cls(header["groups"], header["domains"], metadata=header["metadata"], **parts)


def evaluate_cross_domain(
    model: HookedMLLM,
    samples: Samples,
    neuron_set: NeuronSet,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    mode: str = "zero",
    positions: str | Sequence[str] = "all",
    complementary: bool = False,
    include_union: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> CrossDomainResult:
    """Deactivate each group's neurons (all modules) and, as controls, matched random
    neurons (one draw per seed); score every sample; average per evaluation domain (the
    samples' ``domain`` labels: domains for MMNeuron, datasets for MINER).

    ``mode``/``positions``/``complementary`` are passed to ``deactivation_hooks``;
    ``include_union`` adds a row ``(all)`` with every group's neurons off at once. NaN or inf
    in a run's scores is an error naming the hook and batch unless ``allow_nonfinite``.
    """
    if not seeds:
        raise ValueError("pass at least one seed for the random control")
    check_neurons_fit(model, neuron_set)  # before any control is drawn from its widths
    labels = sample_column(samples, "domain")
    sample_column(samples, "answer")
    domains = sorted(set(labels))
    groups: list[str | None] = list(neuron_set.groups) + ([None] if include_union else [])
    runs = [("baseline", None, None)]
    runs += [("chosen", group, neuron_set) for group in groups]
    controls = {seed: neuron_set.random_control(seed) for seed in seeds}
    runs += [(f"random{seed}", group, controls[seed]) for seed in seeds for group in groups]

    def run(neurons: NeuronSet | None, group: str | None, baseline: AnswerScores | None):
        deactivate = None if neurons is None else Deactivation(
            neurons, mode=mode, positions=positions, complementary=complementary, groups=None if group is None else [group]
        )
        scores = score_answers(
            model, samples, deactivate=deactivate, batch_size=batch_size, max_new_tokens=max_new_tokens,
            allow_nonfinite=allow_nonfinite,
        )
        return scores, _per_domain(scores, baseline, labels, domains)

    check_generation(model, prompt_batch(model, list(samples[: min(batch_size, 4)])), max_new_tokens)
    bar = tqdm(total=len(runs), desc="cross-domain evaluation", disable=not progress, unit="run")
    base_scores, baseline = run(None, None, None)
    bar.update(1)
    results: dict[str, list[dict[str, Tensor]]] = {}
    for name, group, neurons in runs[1:]:
        results.setdefault(name, []).append(run(neurons, group, base_scores)[1])
        bar.update(1)
    bar.close()

    def stack(name: str) -> dict[str, Tensor]:
        return {m: torch.stack([r[m] for r in results[name]]) for m in METRICS}

    chosen = stack("chosen")
    randoms = [stack(f"random{seed}") for seed in seeds]
    return CrossDomainResult(
        groups=[UNION if g is None else g for g in groups],
        domains=domains,
        baseline=baseline,
        chosen=chosen,
        random={m: torch.stack([r[m] for r in randoms]) for m in METRICS},
        metadata={"mode": mode, "positions": positions, "complementary": complementary, "seeds": list(seeds), "n_samples": len(labels),
                  "neurons": neuron_set.metadata, "max_new_tokens": max_new_tokens},
    )
