"""Dose-response: switch off more and more of each group's neurons (1, 2, 5, 10, 20% by
default), with matched random neurons at every dose, and follow what the answers lose.

Each dose is one ``evaluate_cross_domain`` run without decoding (teacher-forced answer
log-prob, margin and first-token accuracy), so a curve costs about one forward per batch,
group and seed at each dose.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_lens.analysis.evaluation import CrossDomainResult, evaluate_cross_domain
from mm_lens.base.display import new_figure
from mm_lens.base.io import atomic_write, refuse_to_replace
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.samples import Samples
from mm_lens.neurons.neuron_set import NeuronSet

DOSES = (0.01, 0.02, 0.05, 0.1, 0.2)


@dataclass
class DoseResponse:
    """One ``CrossDomainResult`` per dose (fraction of each module's neurons asked for) and
    how many neurons each group actually had off (a selection may keep fewer)."""

    doses: list[float]
    results: list[CrossDomainResult]
    counts: list[dict[str, int]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return self.results[0].groups

    def curve(self, group: str, metric: str = "answer_logprob") -> dict[str, list[float]]:
        """Per dose: the change on the group's own domain (all other domains where the group
        is no domain) and random neurons' mean and standard deviation there."""
        curve: dict[str, list[float]] = {"chosen": [], "random": [], "random_sd": []}
        for result in self.results:
            effect = next(e for e in result.effects(metric) if e.group == group)
            own = effect.own is not None
            curve["chosen"].append(effect.own if own else effect.others)
            curve["random"].append(effect.own_random if own else effect.others_random)
            curve["random_sd"].append(effect.own_random_sd if own else math.nan)
        return curve

    def table(self, metric: str = "answer_logprob") -> str:
        """Rows: doses; columns: each group's own-domain change (random mean ± sd)."""
        cells = {g: self.curve(g, metric) for g in self.groups}
        width = max(24, *(len(g) + 2 for g in self.groups))
        lines = [f"{metric}: own-domain change as more of each group's neurons are off (random control: mean ± sd)"]
        lines.append(f"{'dose':>6}" + "".join(f"{g:>{width}}" for g in self.groups))
        for i, dose in enumerate(self.doses):
            row = "".join(
                f"{cells[g]['chosen'][i]:+.3f} ({cells[g]['random'][i]:+.3f}±{cells[g]['random_sd'][i]:.3f})".rjust(width)
                for g in self.groups
            )
            lines.append(f"{dose:>6.0%}" + row)
        return "\n".join(lines)

    def plot(self, metric: str = "answer_logprob"):
        """One panel per group: the chosen neurons' curve and the random band (mean ± sd)."""
        groups = self.groups
        figure = new_figure(3.2 * len(groups) + 1, 3.4)
        axes = figure.subplots(1, len(groups), sharey=True, squeeze=False)[0]
        x = [100 * d for d in self.doses]
        for ax, group in zip(axes, groups):
            curve = self.curve(group, metric)
            low = [m - (s if not math.isnan(s) else 0) for m, s in zip(curve["random"], curve["random_sd"])]
            high = [m + (s if not math.isnan(s) else 0) for m, s in zip(curve["random"], curve["random_sd"])]
            ax.fill_between(x, low, high, color="0.8", label="random ± sd")
            ax.plot(x, curve["random"], color="0.4", linestyle="--", marker=".")
            ax.plot(x, curve["chosen"], color="C3", marker="o", label=f"{group} neurons")
            ax.axhline(0, color="0.2", linewidth=0.6)
            ax.set_xscale("log")
            ax.set_xticks(x, [f"{d:g}%" for d in x])
            ax.set_title(f"{group} off")
            ax.set_xlabel("neurons off (share of each module)")
        axes[0].set_ylabel(f"Δ {metric} on its own domain")
        axes[0].legend(fontsize=8)
        return figure

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> None:
        """``folder/dose_response.json`` and one ``CrossDomainResult`` folder per dose."""
        folder = Path(folder)
        refuse_to_replace(folder / "dose_response.json", overwrite)
        for dose, result in zip(self.doses, self.results):
            result.save(folder / f"dose_{dose:g}", overwrite)
        text = json.dumps({"doses": self.doses, "counts": self.counts, "metadata": self.metadata}, indent=2, default=str)

        def write(temporary: str) -> None:
            Path(temporary).write_text(text)

        atomic_write(folder / "dose_response.json", write)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "DoseResponse":
        folder = Path(folder)
        header = json.loads((folder / "dose_response.json").read_text())
        results = [CrossDomainResult.load(folder / f"dose_{dose:g}") for dose in header["doses"]]
        return cls(header["doses"], results, header["counts"], header["metadata"])


def dose_response(
    model: HookedMLLM,
    samples: Samples,
    select: Callable[[float], NeuronSet],
    *,
    doses: Sequence[float] = DOSES,
    seeds: Sequence[int] = (0, 1, 2),
    mode: str = "zero",
    means: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> DoseResponse:
    """``select(dose)`` gives the neuron set at each dose (e.g. ``lambda r:
    select_domain_neurons(stats, top_rate=r)``); each group's neurons, and matched random
    ones per seed, are switched off and the answers scored without decoding."""
    doses = [float(d) for d in doses]
    if not doses or any(not 0 < d <= 1 for d in doses) or sorted(set(doses)) != doses:
        raise ValueError(f"doses are {doses}; pass increasing fractions in (0, 1], e.g. {list(DOSES)}")
    results, counts = [], []
    for dose in doses:
        neurons = select(dose)
        counts.append({g: neurons.count(g) for g in neurons.groups})
        results.append(evaluate_cross_domain(
            model, samples, neurons, seeds=seeds, mode=mode, means=means, greedy=False, batch_size=batch_size, progress=progress,
        ))
    return DoseResponse(doses, results, counts, {"mode": mode, "seeds": list(seeds)})
