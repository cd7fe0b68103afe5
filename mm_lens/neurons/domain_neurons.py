"""MMNeuron's domain-specific neurons from collected statistics (LAPE on every module)."""

from __future__ import annotations

from typing import Sequence

import torch

from mm_lens.neurons.lape import lape_select
from mm_lens.neurons.neuron_set import NeuronSet
from mm_lens.neurons.statistics import NeuronStats


def select_domain_neurons(
    stats: NeuronStats,
    *,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    activation_bar_ratio: float = 0.95,
    position_class: str = "all",
    modules: Sequence[str] | None = None,
) -> NeuronSet:
    """Domain-specific neurons of each neuron module, selected with LAPE over all its layers.

    Defaults are the published ones: firing counted over every position (``all``),
    ``top_rate`` 1% of each module's neurons, filter and activation bars at the 95%
    quantile of firing probability. ``position_class`` may be ``image``, ``text`` or
    ``last`` to ask which neurons are domain-specific on those positions only.
    """
    modules = list(stats.modules) if modules is None else list(modules)
    unknown = [m for m in modules if m not in stats.modules]
    if unknown:
        raise ValueError(f"no statistics for modules {unknown}; collected: {', '.join(stats.modules)}")
    chosen, widths = {}, {}
    for module in modules:
        counts, n_tokens = stats.over_zero(module, position_class), stats.n_tokens(module, position_class)
        empty = [stats.domains[d] for d in torch.nonzero(n_tokens == 0).flatten().tolist()]
        if empty:
            raise ValueError(
                f"{module}: no {position_class!r} position was counted in domain(s) {empty} (of {list(stats.domains)}); "
                "LAPE needs every domain's firing rate: add samples of those domains, drop them, or choose another "
                "position class"
            )
        chosen[module] = lape_select(counts, n_tokens, top_rate, filter_rate, activation_bar_ratio)
        widths[module] = counts.shape[1]
    metadata = {
        "method": "lape",
        "parameters": {
            "top_rate": top_rate, "filter_rate": filter_rate,
            "activation_bar_ratio": activation_bar_ratio, "position_class": position_class,
        },
        "statistics": stats.metadata,
    }
    return NeuronSet.from_lape(chosen, list(stats.domains), widths, metadata)
