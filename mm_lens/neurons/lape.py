"""LAPE: domain-specific neurons by log-probability entropy (Huo et al. 2024, "MMNeuron:
Discovering Neuron-Level Domain-Specific Interpretation in Multimodal Large Language Model").

Input is what a counting pass over a domain's positions produces: ``over_zero[layer, neuron,
domain]`` (positions where the neuron's activation was > 0) and ``n_tokens[domain]``
(positions seen). A neuron is specific to the few domains it fires for often, i.e. its
firing probabilities, normalised over domains, have low entropy.

Decisions where the published code is silent or fragile:

- Probabilities are float64: counts of millions of positions are exact there, and distinct
  counts stay distinct (float32 would merge them and reorder the ranking).
- ``torch.kthvalue`` ranks from 1: ``k = round(numel * ratio)`` (Python's ``round``, half to
  even, as published) is clamped to ``[1, numel]``, so a ratio of 0 means the minimum.
- Filtered neurons (H = +inf) are never kept, even when ``round(numel(H) * top_rate)``
  exceeds the number of finite entropies; the published top-k would fill up with them.
- Ties in H are broken by position in the module, (layer, neuron) ascending (stable sort).
- Every domain gets an entry, also one no neuron is assigned to (all layers empty); the
  published code drops trailing domains that get nothing.
- Bad counts raise ``ValueError``: shapes, a domain with no positions, negative counts,
  more firing positions than positions.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from jaxtyping import Bool, Float, Float64, Int, Real
from torch import Tensor

__all__ = ["activation_probability", "lape_entropy", "lape_select"]


def _check_counts(over_zero: Tensor, n_tokens: Tensor) -> None:
    """Raise ``ValueError`` unless the counts can come from a counting pass."""
    if over_zero.ndim != 3:
        raise ValueError(
            f"over_zero has shape {tuple(over_zero.shape)}; expected [layer, neuron, domain]"
        )
    if n_tokens.ndim != 1 or n_tokens.shape[0] != over_zero.shape[2]:
        raise ValueError(
            f"n_tokens has shape {tuple(n_tokens.shape)} but over_zero has shape "
            f"{tuple(over_zero.shape)}; pass one count per domain, [{over_zero.shape[2]}]"
        )
    if over_zero.numel() == 0:
        raise ValueError(
            f"over_zero has shape {tuple(over_zero.shape)}; need at least one layer, "
            "neuron and domain"
        )
    for name, t in (("over_zero", over_zero), ("n_tokens", n_tokens)):
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name} has dtype {t.dtype}; pass counts as an integer tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds NaN or inf; pass finite counts")
        if (t < 0).any():
            raise ValueError(f"{name} holds negative values; counts must be >= 0")
    empty = torch.nonzero(n_tokens == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"n_tokens is 0 for domain(s) {empty}: no positions were counted there; "
            "count some positions of every domain or drop the domain"
        )
    n = rearrange(n_tokens.to(over_zero.device), "domain -> 1 1 domain")
    if (over_zero > n).any():
        domains = torch.nonzero(reduce(over_zero > n, "l n d -> d", "max")).flatten().tolist()
        raise ValueError(
            f"over_zero exceeds n_tokens in domain(s) {domains}: a neuron cannot fire at more "
            "positions than were counted; check that both come from the same pass"
        )


def activation_probability(over_zero: Tensor, n_tokens: Tensor) -> Float[Tensor, "layer neuron domain"]:
    """Share of positions where each neuron fired, per domain (float64). Step 1.

    ``over_zero`` ``[layer, neuron, domain]`` and ``n_tokens`` ``[domain]``: counts, checked
    here (``ValueError`` saying what is wrong), so they are plain ``Tensor`` parameters.
    """
    _check_counts(over_zero, n_tokens)
    return _probability(over_zero, n_tokens)


def _probability(
    over_zero: Real[Tensor, "layer neuron domain"], n_tokens: Real[Tensor, "domain"]
) -> Float64[Tensor, "layer neuron domain"]:
    """``activation_probability`` of counts ``_check_counts`` accepted (integer or float)."""
    n = n_tokens.to(device=over_zero.device, dtype=torch.float64)
    return over_zero.double() / rearrange(n, "domain -> 1 1 domain")


def _entropy(p: Float[Tensor, "layer neuron domain"]) -> Float[Tensor, "layer neuron"]:
    """Entropy (nats) of p normalised over domains; 0 for neurons that never fire."""
    total = reduce(p, "layer neuron domain -> layer neuron 1", "sum")
    normed = torch.where(total > 0, p / total, 0.0)
    plogp = torch.where(normed > 0, normed * normed.log(), 0.0)
    return -reduce(plogp, "layer neuron domain -> layer neuron", "sum")


def lape_entropy(over_zero: Tensor, n_tokens: Tensor) -> Float[Tensor, "layer neuron"]:
    """Entropy over domains of each neuron's normalised firing probability. Steps 1-3.

    ``p' = p / sum_domains p`` (0 where the neuron never fires), ``H = -sum p' ln p'``
    with ``0 ln 0 = 0``. Low H: the neuron fires for few domains. Counts as in
    ``activation_probability``.
    """
    return _entropy(activation_probability(over_zero, n_tokens))


def _kth(values: Float[Tensor, "value"], ratio: float) -> Tensor:
    """``kthvalue`` at ``round(numel * ratio)``, the rank clamped to [1, numel]."""
    k = min(max(round(values.numel() * ratio), 1), values.numel())
    return values.kthvalue(k).values


def lape_select(
    over_zero: Tensor,
    n_tokens: Tensor,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    activation_bar_ratio: float = 0.95,
) -> list[list[Int[Tensor, "_kept"]]]:
    """Domain-specific neurons of one module: ``result[domain][layer]`` = neuron indices.

    1-3. ``p`` = firing probability, ``H`` = its entropy over domains (``lape_entropy``).
    4. ``bar`` = ``filter_rate`` quantile (kthvalue) of all of ``p``; a neuron above
       ``bar`` in no domain gets H = +inf and is never kept.
    5. Keep the ``round(layer * neuron * top_rate)`` lowest-H neurons of all layers
       together (fewer if fewer have finite H; ties to the lower (layer, neuron)).
    6. Assign each kept neuron to every domain where ``p`` exceeds the
       ``activation_bar_ratio`` quantile of ``p`` (several domains or none).
    7. Returns, per domain in input order, per layer, a sorted int64 tensor (maybe empty)
       on ``over_zero``'s device.

    Counts as in ``activation_probability``; rates are checked here too (``ValueError``).
    """
    for name, rate in (
        ("top_rate", top_rate),
        ("filter_rate", filter_rate),
        ("activation_bar_ratio", activation_bar_ratio),
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} is {rate}; pass a fraction in [0, 1]")
    return _select(activation_probability(over_zero, n_tokens), top_rate, filter_rate, activation_bar_ratio)


def _select(
    p: Float[Tensor, "layer neuron domain"], top_rate: float, filter_rate: float, activation_bar_ratio: float
) -> list[list[Int[Tensor, "_kept"]]]:
    """Steps 4-7 of ``lape_select`` on checked firing probabilities."""
    n_layer, n_neuron, _ = p.shape
    flat_p = rearrange(p, "layer neuron domain -> (layer neuron domain)")

    above_bar: Bool[Tensor, "layer neuron domain"] = p > _kth(flat_p, filter_rate)
    fires_somewhere = reduce(above_bar, "layer neuron domain -> layer neuron", "max")
    entropy = torch.where(fires_somewhere, _entropy(p), torch.inf)

    flat_entropy = rearrange(entropy, "layer neuron -> (layer neuron)")
    n_keep = min(round(flat_entropy.numel() * top_rate), int(torch.isfinite(flat_entropy).sum()))
    kept = torch.sort(flat_entropy, stable=True).indices[:n_keep]

    specific = torch.zeros(n_layer * n_neuron, p.shape[2], dtype=torch.bool, device=p.device)
    specific[kept] = rearrange(p, "layer neuron domain -> (layer neuron) domain")[kept] > _kth(
        flat_p, activation_bar_ratio
    )
    specific = rearrange(
        specific, "(layer neuron) domain -> domain layer neuron", layer=n_layer
    )
    return [[torch.nonzero(row).flatten() for row in domain] for domain in specific]
