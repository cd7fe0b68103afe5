"""Does switching neurons off hurt the answers? Per evaluation domain, against matched random
neurons: answer log-probability and its margin over the other answers of its set (what moves
first), first-token accuracy, greedy exact match, and the change of the final hidden state.

Samples are mappings with ``question``, ``image`` (or None / a list), ``answer`` and
``domain``; see ``mm_lens.analysis.answers`` for how each sample is scored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from einops import rearrange, reduce
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.analysis.answers import AnswerScores, answer_sets, score_answers
from mm_lens.base.display import new_figure
from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.model.generation_check import check_generation
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.samples import Samples, prompt_batch, sample_column
from mm_lens.neurons.deactivation import Deactivation, check_neurons_fit, deactivation_hooks
from mm_lens.neurons.neuron_set import NeuronSet

METRICS: tuple[str, ...] = ("answer_logprob", "margin", "first_token_accuracy", "accuracy", "hidden_change")
UNITS = {"answer_logprob": "nats", "margin": "nats", "first_token_accuracy": "", "accuracy": "", "hidden_change": ""}
UNION = "(all)"  # row of CrossDomainResult with every group's neurons off at once


def _per_domain(scores: AnswerScores, baseline: AnswerScores | None, labels: list[str], domains: list[str]) -> dict[str, Tensor]:
    """Metric -> ``[domain]`` means (``METRICS``, accuracy only where the run decoded; the
    margin over the samples whose answer set has another answer); the hidden change is
    relative to ``baseline`` (0 without one)."""
    change = torch.zeros(len(labels), dtype=torch.float64)
    if baseline is not None:
        change = (scores.final_hidden - baseline.final_hidden).norm(dim=-1) / baseline.final_hidden.norm(dim=-1)
    per_sample = {
        "answer_logprob": scores.answer_logprob, "margin": scores.margin,
        "first_token_accuracy": scores.first_token_correct.double(), "hidden_change": change,
    }
    if scores.correct is not None:
        per_sample["accuracy"] = scores.correct.double()
    masks = [torch.tensor([label == d for label in labels]) for d in domains]
    return {m: torch.stack([values[mask].nanmean() for mask in masks]) for m, values in per_sample.items()}


@dataclass
class GroupEffect:
    """What switching one group's neurons off does to one metric, as changes from the
    baseline: on the group's own domain (``None`` where no domain bears the group's name,
    e.g. MINER's modalities) and on average over the other domains, each next to the mean
    and spread of matched random neurons' change and as a multiple of it."""

    group: str
    own: float | None
    own_random: float | None
    own_random_sd: float | None
    others: float
    others_random: float

    @staticmethod
    def ratio(change: float | None, random: float | None) -> float:
        """``change / random``; inf where random neurons changed nothing."""
        if change is None or random is None:
            return math.nan
        return change / random if random != 0 else (math.inf if change != 0 else math.nan)

    @property
    def own_ratio(self) -> float:
        return self.ratio(self.own, self.own_random)

    @property
    def others_ratio(self) -> float:
        return self.ratio(self.others, self.others_random)

    @property
    def beyond_random(self) -> bool:
        """The own-domain drop exceeds random's by more than two random standard deviations
        and is measurable (more than ``NOISE``)."""
        if self.own is None or self.own_random is None:
            return False
        return self.own < min(self.own_random - 2 * (self.own_random_sd or 0.0), -NOISE)


NOISE = 1e-3  # changes smaller than this (nats, or accuracy) are reported as no measurable change


def _versus(change: float | None, random: float | None, name: str = "random") -> str:
    """``change`` as a multiple of ``random``, or why no multiple is meaningful."""
    if change is None or random is None or math.isnan(change) or math.isnan(random):
        return f"{name} n/a"
    if abs(random) < NOISE:
        return f"{name}: no measurable change"
    if change * random < 0:
        return f"the opposite way to {name}"
    return f"{change / random:.1f}× {name}"


@dataclass
class CrossDomainResult:
    """Effect of deactivating each group's neurons on every evaluation domain.

    ``baseline[metric]``: ``[domain]``; ``chosen[metric]``: ``[group, domain]`` with group
    ``g``'s neurons off; ``random[metric]``: ``[seed, group, domain]`` with matched random
    neurons off. Metrics (``METRICS``): answer_logprob and margin (nats), first_token_accuracy,
    accuracy (greedy exact match), hidden_change (relative change of the final residual).
    """

    groups: list[str]
    domains: list[str]
    baseline: dict[str, Tensor]
    chosen: dict[str, Tensor]
    random: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return [m for m in METRICS if m in self.baseline]

    def delta(self, metric: str = "answer_logprob") -> Float[Tensor, "group domain"]:
        """Chosen neurons off minus baseline."""
        return self.chosen[self._metric(metric)] - rearrange(self.baseline[metric], "domain -> 1 domain")

    def random_delta(self, metric: str = "answer_logprob") -> tuple[Tensor, Tensor]:
        """Mean and sample standard deviation over seeds of random-control minus baseline."""
        deltas = self.random[self._metric(metric)] - rearrange(self.baseline[metric], "domain -> 1 1 domain")
        spread = deltas.std(dim=0) if deltas.shape[0] > 1 else torch.zeros_like(deltas[0])
        return reduce(deltas, "seed group domain -> group domain", "mean"), spread

    def effects(self, metric: str = "answer_logprob") -> list[GroupEffect]:
        """Each group's own-domain and other-domain change next to random neurons'. A group
        has an own domain only for domain neurons (LAPE): MINER's modality groups are never
        read as the evaluation domain of the same name (e.g. ``text``)."""
        chosen, (random_mean, random_sd) = self.delta(metric), self.random_delta(metric)
        by_domain = self.metadata.get("neurons", {}).get("method") != "miner"
        effects = []
        for g, group in enumerate(self.groups):
            own = self.domains.index(group) if by_domain and group in self.domains else None
            others = [d for d in range(len(self.domains)) if d != own]
            effects.append(GroupEffect(
                group,
                None if own is None else float(chosen[g, own]),
                None if own is None else float(random_mean[g, own]),
                None if own is None else float(random_sd[g, own]),
                float(chosen[g, others].nanmean()) if others else math.nan,
                float(random_mean[g, others].nanmean()) if others else math.nan,
            ))
        return effects

    def summary(self, metric: str = "answer_logprob") -> str:
        """Two or three sentences from the measured numbers: the strongest own-domain effects
        as multiples of random, and how many groups beat random by more than 2 sd."""
        unit = UNITS[self._metric(metric)]
        name = metric.replace("_", " ")
        effects = [e for e in self.effects(metric) if e.group != UNION]
        owned = [e for e in effects if e.own is not None]
        if not owned:  # groups are not domains (MINER): say what each does on average
            parts = [f"{e.group} neurons off change {name} by {e.others:+.3f} {unit} on average "
                     f"({_versus(e.others, e.others_random)}, {e.others_random:+.3f})" for e in effects]
            return "; ".join(parts) + "." if parts else ""
        strongest = sorted(owned, key=lambda e: (not e.beyond_random, e.own))[:2]  # beyond random first
        sentences = [
            f"{e.group} neurons off change {e.group} answers' {name} by {e.own:+.3f} {unit} "
            f"({_versus(e.own, e.own_random, 'the matched random neurons')}, {e.own_random:+.3f} ± {e.own_random_sd:.3f}); "
            f"other domains {e.others:+.3f} ({_versus(e.others, e.others_random)})."
            for e in strongest if abs(e.own) >= NOISE
        ] or [f"No group's neurons change its own domain's {name} by {NOISE} {unit} or more."]
        beyond = [e.group for e in owned if e.beyond_random]
        sentences.append(
            f"{len(beyond)} of {len(owned)} domains' own {name} drops by more than random's mean - 2 sd (and more than {NOISE})"
            + (f": {', '.join(beyond)}." if beyond else ".")
        )
        return " ".join(sentences)

    def table(self, metric: str = "answer_logprob") -> str:
        """Baseline, then per deactivated group: chosen delta and random delta (mean ± std)."""
        chosen, (random_mean, random_std) = self.delta(metric), self.random_delta(metric)
        rows = [
            [f"{c:+.3f} (rnd {m:+.3f}±{s:.3f})" for c, m, s in zip(chosen[g].tolist(), random_mean[g].tolist(), random_std[g].tolist())]
            for g in range(len(self.groups))
        ]
        width = max(len(x) for x in [*self.domains, *(cell for row in rows for cell in row)]) + 2
        label = max(len(g) for g in self.groups) + 6
        unit = f" ({UNITS[metric]})" if UNITS[metric] else ""
        lines = [f"{metric}{unit}: baseline, then the change when each group's neurons are off "
                 f"(random control: mean ± std over {self.random[metric].shape[0]} seeds)"]
        lines.append(" " * label + "".join(f"{d:>{width}}" for d in self.domains))
        lines.append(f"{'baseline':<{label}}" + "".join(f"{v:>{width}.3f}" for v in self.baseline[metric].tolist()))
        for group, cells in zip(self.groups, rows):
            lines.append(f"{group + ' off':<{label}}" + "".join(f"{cell:>{width}}" for cell in cells))
        return "\n".join(lines)

    def tables(self) -> str:
        """``table`` of every metric, one after the other."""
        return "\n\n".join(self.table(metric) for metric in self.metrics)

    def plot(self, metric: str = "answer_logprob"):
        """Heatmaps of the change with the chosen neurons off and with random ones off, on
        one colour scale centred on zero (at least ±0.01, so a table of zeros looks flat)."""
        chosen, (random_mean, _) = self.delta(metric), self.random_delta(metric)
        limit = max(float(chosen.abs().nan_to_num().max()), float(random_mean.abs().nan_to_num().max()), 0.01)
        figure = new_figure(4 + 1.6 * len(self.domains), 0.9 * len(self.groups) + 2.5)
        axes = figure.subplots(1, 2)
        for ax, values, title in ((axes[0], chosen, "chosen neurons off"), (axes[1], random_mean, "random neurons off (mean)")):
            image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
            ax.set_xticks(range(len(self.domains)), self.domains, rotation=45, ha="right")
            ax.set_yticks(range(len(self.groups)), [f"{g} off" for g in self.groups])
            ax.set_xlabel("evaluated domain")
            ax.set_title(f"{title}: Δ {metric}")
            for (i, j), v in zip(((i, j) for i in range(len(self.groups)) for j in range(len(self.domains))), values.flatten().tolist()):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8)
        unit = UNITS[metric]
        figure.colorbar(image, ax=axes, shrink=0.8, label=f"Δ {metric}" + (f" ({unit})" if unit else ""))
        return figure

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> None:
        """``folder/cross_domain.safetensors``: every matrix, groups, domains and metadata."""
        tensors = {f"{part}/{metric}": getattr(self, part)[metric] for part in ("baseline", "chosen", "random") for metric in self.metrics}
        header = {"groups": self.groups, "domains": self.domains, "metrics": self.metrics, "metadata": self.metadata}
        save_tensors(Path(folder) / "cross_domain.safetensors", tensors, header, "CrossDomainResult", overwrite)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "CrossDomainResult":
        tensors, header = load_tensors(Path(folder) / "cross_domain.safetensors", "CrossDomainResult")
        metrics = header.get("metrics", ["accuracy", "answer_logprob", "hidden_change"])  # files written before margins
        parts = {part: {m: tensors[f"{part}/{m}"] for m in metrics} for part in ("baseline", "chosen", "random")}
        return cls(header["groups"], header["domains"], metadata=header["metadata"], **parts)

    def _metric(self, metric: str) -> str:
        if metric not in self.baseline:
            raise ValueError(f"unknown metric {metric!r}; this result has {', '.join(self.metrics)}")
        return metric


def evaluate_cross_domain(
    model: HookedMLLM,
    samples: Samples,
    neuron_set: NeuronSet,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    mode: str = "zero",
    means: Mapping[str, Tensor] | None = None,
    positions: str | Sequence[str] = "all",
    complementary: bool = False,
    include_union: bool = False,
    greedy: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> CrossDomainResult:
    """Deactivate each group's neurons (all modules) and, as controls, matched random
    neurons (one draw per seed); score every sample; average per evaluation domain (the
    samples' ``domain`` labels: domains for MMNeuron, datasets for MINER).

    ``mode``/``means``/``positions``/``complementary`` are passed to ``deactivation_hooks``
    (``mode="mean"`` needs ``means``, e.g. ``NeuronStats.neuron_means()``);
    ``include_union`` adds a row ``(all)`` with every group's neurons off at once;
    ``greedy=False`` skips decoding (no exact-match accuracy; the teacher-forced metrics need
    one forward per batch). NaN or inf in a run's scores is an error naming the hook and batch
    unless ``allow_nonfinite``.
    """
    if not seeds:
        raise ValueError("pass at least one seed for the random control")
    check_neurons_fit(model, neuron_set)  # before any control is drawn from its widths
    labels = sample_column(samples, "domain")
    answer_sets(samples)  # every sample needs an answer among its choices, checked before any run
    deactivation_hooks(model, neuron_set, mode=mode, means=means)  # the settings are checked before any run
    domains = sorted(set(labels))
    groups: list[str | None] = list(neuron_set.groups) + ([None] if include_union else [])
    runs = [("baseline", None, None)]
    runs += [("chosen", group, neuron_set) for group in groups]
    controls = {seed: neuron_set.random_control(seed) for seed in seeds}
    runs += [(f"random{seed}", group, controls[seed]) for seed in seeds for group in groups]

    def run(neurons: NeuronSet | None, group: str | None, baseline: AnswerScores | None):
        deactivate = None if neurons is None else Deactivation(
            neurons, mode=mode, means=means, positions=positions, complementary=complementary,
            groups=None if group is None else [group],
        )
        scores = score_answers(
            model, samples, deactivate=deactivate, greedy=greedy, batch_size=batch_size, max_new_tokens=max_new_tokens,
            allow_nonfinite=allow_nonfinite,
        )
        return scores, _per_domain(scores, baseline, labels, domains)

    if greedy:
        check_generation(model, prompt_batch(model, list(samples[: min(batch_size, 4)])), max_new_tokens)
    bar = tqdm(total=len(runs), desc="cross-domain evaluation", disable=not progress, unit="run")
    base_scores, baseline = run(None, None, None)
    bar.update(1)
    results: dict[str, list[dict[str, Tensor]]] = {}
    for name, group, neurons in runs[1:]:
        results.setdefault(name, []).append(run(neurons, group, base_scores)[1])
        bar.update(1)
    bar.close()

    metrics = [m for m in METRICS if m in baseline]

    def stack(name: str) -> dict[str, Tensor]:
        return {m: torch.stack([r[m] for r in results[name]]) for m in metrics}

    chosen = stack("chosen")
    randoms = [stack(f"random{seed}") for seed in seeds]
    return CrossDomainResult(
        groups=[UNION if g is None else g for g in groups],
        domains=domains,
        baseline=baseline,
        chosen=chosen,
        random={m: torch.stack([r[m] for r in randoms]) for m in metrics},
        metadata={"mode": mode, "positions": positions, "complementary": complementary, "seeds": list(seeds), "n_samples": len(labels),
                  "neurons": neuron_set.metadata, "max_new_tokens": max_new_tokens if greedy else None},
    )
