"""MINER: modality-specific neurons from importance scores (Huang et al., "MINER: Mining the
Underlying Pattern of Modality-Specific Neurons in Multimodal Large Language Models").

Pure tensor core of stages 2-4; the forward passes that produce ``act`` and ``attn`` live at
the edges. Per sample, layer and modality ``m`` (``A`` = MLP ``act_fn`` output at m's tokens,
``[tokens_m, N]``), ``importance_scores`` gives five metrics per neuron, each min-max
normalised over the layer's neurons:

- ``prob``: share of m's tokens with ``A > 0``; ``mean``, ``max``: of ``A`` over m's tokens.
- ``attn_q``, ``attn_k``: ``A`` weighted by attention among m's tokens. With ``W`` a
  ``[query, key]`` weight matrix, ``attn_q = sum_q (W @ A) = sum_k (sum_q W[q, k]) A[k]``
  (each token's activation times the attention it *receives* as a key) and
  ``attn_k = sum_k (W^T @ A) = sum_q (sum_k W[q, k]) A[q]`` (each token's activation times
  the attention it *pays*, as a query, to m's tokens).

  * Default (causal, correct): ``W = P``, the model's real attention pattern (softmaxed
    with the causal mask over the whole prompt, head-averaged) restricted to m's rows and
    columns. Rows of the restricted ``P`` sum to the share of each query's attention that
    stays inside m, so ``attn_k`` is not a plain token sum.
    Only ``P``'s row and column sums within m enter: ``paid[q] = sum_{k in m} P[q, k]``
    and ``received[k] = sum_{q in m} P[q, k]`` give ``attn_k = sum_q paid[q] A[q]`` and
    ``attn_q = sum_k received[k] A[k]``. ``attention_sums`` computes them from the
    post-rotary queries and keys, a block of queries at a time, without ever holding
    ``P``; ``importance_scores`` takes either the restricted ``P`` or the two sums.
  * ``published_attention=True``: the public code's variant. ``S`` is what it stores as
    ``attn_score``: head-averaged ``softmax(QK^T/sqrt(d))`` over the prompt *without* the
    causal mask, restricted to m. A second softmax is applied: ``W = softmax_rows(S)``
    (over keys) for ``attn_q`` and ``W = softmax_cols(S)`` (over queries) for ``attn_k``.

Aggregation (stage 3): ``ScoreAccumulator`` sums per-sample scores in float64 per dataset
and divides by how many samples contained each modality; ``combine_datasets`` sums the
per-dataset means and divides each modality by the number of datasets where it occurs
(``aggregate_scores`` does both from the accumulators); ``weighted_score`` mixes the
metrics. Selection (stage 4): ``miner_select``.

Decisions where the published code is silent or fragile:

- Min-max normalisation maps a constant vector (max == min) to zeros; the public code
  divides 0 by 0 (NaN).
- A modality with no tokens raises ``ValueError``: don't call ``importance_scores`` for it
  and don't ``add`` it for that sample.
- Per-dataset means divide by the samples that contained the modality; the public code
  divides by all samples of the dataset. Both agree when every sample of a dataset has the
  modality (so for TextVQA, COCO, MMLU); ours does not dilute a modality seen in few samples.
- ``random`` draws ``K // M`` distinct neurons per modality with ``torch.Generator(seed)``
  (the public code draws K pairs with replacement into one set); the same budget as LA_MU.
- Ties in top-k go to the lower flat index ((layer, neuron), or (modality, neuron) in
  LU_MA) via a stable sort; in ``adaptive`` a tied argmax goes to the first modality.
- Every modality gets an entry, maybe empty (``[0, 2]``), with pairs sorted by
  (layer, neuron), on the scores' device.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from einops import einsum, rearrange, reduce, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "DEFAULT_METRIC_WEIGHTS",
    "MINER_METRICS",
    "MINER_STRATEGIES",
    "ScoreAccumulator",
    "aggregate_scores",
    "attention_sums",
    "combine_datasets",
    "importance_scores",
    "min_max_normalize",
    "miner_select",
    "weighted_score",
]

MINER_METRICS: tuple[str, ...] = ("prob", "mean", "max", "attn_k", "attn_q")
DEFAULT_METRIC_WEIGHTS: dict[str, float] = {
    "prob": 0.0,
    "mean": 0.25,
    "max": 0.25,
    "attn_k": 0.5,
    "attn_q": 0.0,
}
MINER_STRATEGIES: tuple[str, ...] = ("LA_MU", "adaptive", "LU_MA", "uniform", "random")


# --- stage 2: importance scores of one sample ------------------------------------------


def min_max_normalize(x: Float[Tensor, "*layer neuron"]) -> Float[Tensor, "*layer neuron"]:
    """``(x - min) / (max - min)`` over the last axis; a constant row maps to zeros."""
    lo = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def importance_scores(
    act: Tensor,
    attn: Tensor | None = None,
    *,
    published_attention: bool = False,
    paid: Tensor | None = None,
    received: Tensor | None = None,
) -> dict[str, Float[Tensor, "*layer neuron"]]:
    """MINER metrics of one sample and one modality, each min-max normalised per layer.

    ``act``: ``act_fn`` output at the modality's tokens, ``[token, neuron]`` for one layer
    or ``[layer, token, neuron]`` for several. ``attn``: that layer's head-averaged
    attention among the same tokens, ``[query, key]`` (or ``[layer, query, key]``): the
    causal pattern ``P`` by default, the public code's unmasked ``S`` with
    ``published_attention=True`` (see the module docstring). Instead of the causal ``P``,
    its sums within the modality may be given: ``paid`` (``P.sum(-1)``, the attention each
    token pays to the modality's tokens) and ``received`` (``P.sum(-2)``, the attention it
    receives from them), each ``[token]`` (or ``[layer, token]``), e.g. from
    ``attention_sums``. Returns ``prob``, ``mean``, ``max`` and, when ``attn`` or the sums
    are given, ``attn_k`` and ``attn_q``, each ``[*layer, neuron]`` in at least float32.
    Shapes are checked here (``ValueError`` saying what is wrong).
    """
    if act.ndim not in (2, 3):
        raise ValueError(
            f"act has shape {tuple(act.shape)}; expected [token, neuron] or "
            "[layer, token, neuron]"
        )
    if act.shape[-2] == 0:
        raise ValueError(
            "act has no tokens: the modality is absent from this sample; skip it instead "
            "of scoring it"
        )
    if act.shape[-1] == 0:
        raise ValueError(f"act has shape {tuple(act.shape)}; need at least one neuron")
    if published_attention and attn is None:
        raise ValueError("published_attention=True needs attn (the unmasked scores S)")
    if (paid is None) != (received is None) or (paid is not None and (attn is not None or published_attention)):
        raise ValueError(
            "pass either attn (the attention among the modality's tokens) or both paid and received "
            "(its row and column sums, causal pattern only), not a mix"
        )
    for name, sums in (("paid", paid), ("received", received)):
        if sums is not None and sums.shape != act.shape[:-1]:
            raise ValueError(
                f"{name} has shape {tuple(sums.shape)} but act has shape {tuple(act.shape)}; "
                f"pass one sum per token, {list(act.shape[:-1])}"
            )
    if attn is not None:
        n_tok = act.shape[-2]
        if attn.shape != (*act.shape[:-2], n_tok, n_tok):
            raise ValueError(
                f"attn has shape {tuple(attn.shape)} but act has shape {tuple(act.shape)}; "
                f"pass the attention among the same tokens, "
                f"{list((*act.shape[:-2], n_tok, n_tok))}"
            )
    return _importance_scores(act, attn, published_attention, paid, received)


def _importance_scores(
    act: Float[Tensor, "*layer token neuron"],
    attn: Float[Tensor, "*layer token token"] | None,
    published_attention: bool,
    paid: Float[Tensor, "*layer token"] | None = None,
    received: Float[Tensor, "*layer token"] | None = None,
) -> dict[str, Float[Tensor, "*layer neuron"]]:
    """``importance_scores`` of inputs whose shapes it checked."""
    dtype = torch.promote_types(act.dtype, torch.float32)
    a = act.to(dtype)

    scores = {
        "prob": reduce((a > 0).to(dtype), "... token neuron -> ... neuron", "mean"),
        "mean": reduce(a, "... token neuron -> ... neuron", "mean"),
        "max": reduce(a, "... token neuron -> ... neuron", "max"),
    }
    if attn is not None:
        w = attn.to(dtype)
        w_q = w.softmax(dim=-1) if published_attention else w  # normalised over keys
        w_k = w.softmax(dim=-2) if published_attention else w  # normalised over queries
        scores["attn_k"] = einsum(w_k, a, "... query key, ... query neuron -> ... neuron")
        scores["attn_q"] = einsum(w_q, a, "... query key, ... key neuron -> ... neuron")
    elif paid is not None and received is not None:
        scores["attn_k"] = einsum(paid.to(dtype), a, "... query, ... query neuron -> ... neuron")
        scores["attn_q"] = einsum(received.to(dtype), a, "... key, ... key neuron -> ... neuron")
    return {name: min_max_normalize(value) for name, value in scores.items()}


def attention_sums(
    q: Float[Tensor, "head query d"],
    k: Float[Tensor, "kv_head key d"],
    groups: Bool[Tensor, "group pos"],
    *,
    scale: float,
    mask: Float[Tensor, "query key"] | Bool[Tensor, "query key"] | None = None,
    causal: bool = False,
    block: int = 128,
) -> tuple[Float[Tensor, "group pos"], Float[Tensor, "group pos"]]:
    """Row and column sums, within each group of positions, of the head-averaged attention
    pattern ``P = mean_head softmax(q k^T * scale + mask)``, without materialising ``P``.

    The pattern is SDPA's (``torch.nn.functional.scaled_dot_product_attention``) on the
    same inputs: ``q`` and ``k`` post-rotary, one row of the batch; query head ``h`` reads
    key head ``h // (head / kv_head)`` (grouped-query attention); ``mask`` boolean (True:
    may attend) or additive, what the model passes to SDPA (sliding windows, padding,
    bidirectional spans); ``causal`` (only without ``mask``): key <= query. Returns
    ``paid[g, q] = sum_{k in g} P[q, k]`` for every query in some group (0 for the others)
    and ``received[g, k] = sum_{q in g} P[q, k]`` for every key, float32.

    Queries go ``block`` at a time (scores of the block against all keys, softmax over
    them, head mean, summed into the ``[group, pos]`` outputs), so memory is ``O(head x
    block x key)``, never ``O(head x query x key)``. Keys that no query of the block may
    attend to (outside the causal triangle, or masked: boolean False, additive <= half the
    dtype's lowest value, where the softmax weight underflows to 0 exactly) are skipped.
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    n_key = k.shape[1]
    queries = q.float() * scale  # scaled once here, not per block of scores
    keys = repeat(k.float(), "kv key d -> (kv group) key d", group=heads // kv_heads)
    members = groups.to(device=q.device, dtype=torch.float32)
    allowed = None if mask is None else (mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2)
    paid = torch.zeros(groups.shape, dtype=torch.float32, device=q.device)
    received = torch.zeros(groups.shape, dtype=torch.float32, device=q.device)
    rows = groups.any(0).to(q.device).nonzero()[:, 0]
    for start in range(0, len(rows), block):
        index = rows[start : start + block]
        if allowed is not None:
            reached = allowed[index].any(0).nonzero()[:, 0]
            first, last = (int(reached[0]), int(reached[-1]) + 1) if len(reached) else (0, 1)
        else:
            first, last = 0, (int(index[-1]) + 1 if causal else n_key)
        scores = einsum(queries[:, index], keys[:, first:last], "head query d, head key d -> head query key")
        if mask is not None:
            window = mask[index, first:last]
            if window.dtype == torch.bool:
                scores.masked_fill_(~window, -torch.inf)
            else:
                scores.add_(window.float())
        elif causal:  # only keys from the block's first query on can be in any query's future
            diagonal = int(index[0])
            later = torch.arange(diagonal, last, device=q.device) > index[:, None]
            scores[:, :, diagonal - first :].masked_fill_(later, -torch.inf)
        pattern = reduce(scores.softmax(-1), "head query key -> query key", "mean")
        paid[:, index] = einsum(pattern, members[:, first:last], "query key, group key -> group query")
        received[:, first:last] += einsum(pattern, members[:, index], "query key, group query -> group key")
    return paid, received


# --- stage 3: aggregation over samples and datasets ------------------------------------


class ScoreAccumulator:
    """Running float64 sums of one dataset's per-sample scores; memory ``[metric, modality,
    layer, neuron]`` whatever the sample count.

    ``add(modality, scores)`` once per sample that contains the modality, with ``scores``
    as returned by ``importance_scores`` for all layers (``{metric: [layer, neuron]}``;
    extra metrics are ignored). ``mean()``: sums / per-modality sample counts, zeros for
    modalities never added. ``present``: which modalities were added at least once.
    """

    def __init__(
        self,
        metrics: Sequence[str] = MINER_METRICS,
        modalities: Sequence[str] = (),
        n_layers: int = 0,
        n_neurons: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if not modalities:
            raise ValueError("pass at least one modality name, e.g. ('text', 'image')")
        for kind, names in (("metric", metrics), ("modality", modalities)):
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names repeat: {list(names)}; pass each once")
        if n_layers < 1 or n_neurons < 1:
            raise ValueError(f"n_layers={n_layers}, n_neurons={n_neurons}; both must be >= 1")
        self.metrics = tuple(metrics)
        self.modalities = tuple(modalities)
        self.sums: Float[Tensor, "metric modality layer neuron"] = torch.zeros(
            len(metrics), len(modalities), n_layers, n_neurons, dtype=torch.float64, device=device
        )
        self.counts: Int[Tensor, "modality"] = torch.zeros(len(modalities), dtype=torch.long)

    def add(self, modality: str, scores: Mapping[str, Float[Tensor, "layer neuron"]]) -> None:
        """Add one sample's scores for ``modality``."""
        if modality not in self.modalities:
            raise ValueError(
                f"unknown modality {modality!r}; this accumulator has {list(self.modalities)}"
            )
        missing = [m for m in self.metrics if m not in scores]
        if missing:
            raise ValueError(
                f"scores lack metric(s) {missing}; pass attn to importance_scores or build "
                f"the accumulator with metrics={tuple(m for m in self.metrics if m in scores)}"
            )
        i = self.modalities.index(modality)
        for j, metric in enumerate(self.metrics):
            value = scores[metric]
            if value.shape != self.sums.shape[2:]:
                raise ValueError(
                    f"scores[{metric!r}] has shape {tuple(value.shape)}; expected "
                    f"[layer, neuron] = {list(self.sums.shape[2:])}"
                )
            self.sums[j, i] += value.to(self.sums)
        self.counts[i] += 1

    @property
    def present(self) -> Bool[Tensor, "modality"]:
        """Modalities added at least once."""
        return self.counts > 0

    def mean(self) -> Float[Tensor, "metric modality layer neuron"]:
        """Per-dataset mean score (float64); zeros for modalities never added."""
        n = self.counts.clamp(min=1).to(self.sums)
        return self.sums / rearrange(n, "modality -> 1 modality 1 1")


def combine_datasets(
    means: Sequence[Float[Tensor, "metric modality layer neuron"]],
    present: Sequence[Bool[Tensor, "modality"]],
) -> Float[Tensor, "metric modality layer neuron"]:
    """Sum of per-dataset means, each modality divided by the datasets where it occurs.

    ``present[d][m]``: modality m occurs in dataset d (``ScoreAccumulator.present``); means
    of absent modalities are ignored. A modality absent from every dataset stays zero.
    """
    if not means or len(means) != len(present):
        raise ValueError(
            f"{len(means)} means and {len(present)} presence masks; pass one of each per "
            "dataset (at least one)"
        )
    shape = means[0].shape
    for d, (mean, mask) in enumerate(zip(means, present)):
        if mean.ndim != 4 or mean.shape != shape or mask.shape != (shape[1],):
            raise ValueError(
                f"dataset {d}: mean {tuple(mean.shape)}, present {tuple(mask.shape)}; "
                f"expected [metric, modality, layer, neuron] = {list(shape)} and "
                f"[modality] = [{shape[1]}]"
            )
    total = torch.zeros(shape, dtype=torch.float64, device=means[0].device)
    occurrences = torch.zeros(shape[1], dtype=torch.float64, device=total.device)
    for mean, mask in zip(means, present):
        m = mask.to(device=total.device, dtype=torch.float64)
        total += mean.to(total) * rearrange(m, "modality -> 1 modality 1 1")
        occurrences += m
    return total / rearrange(occurrences.clamp(min=1), "modality -> 1 modality 1 1")


def aggregate_scores(
    datasets: Sequence[ScoreAccumulator],
) -> Float[Tensor, "metric modality layer neuron"]:
    """Stage 3 in one call: ``combine_datasets`` of each dataset's ``mean()``/``present``."""
    if not datasets:
        raise ValueError("pass one ScoreAccumulator per dataset (at least one)")
    first = datasets[0]
    for d, acc in enumerate(datasets):
        if (acc.metrics, acc.modalities) != (first.metrics, first.modalities):
            raise ValueError(
                f"dataset {d} has metrics {acc.metrics} and modalities {acc.modalities}, "
                f"dataset 0 {first.metrics} and {first.modalities}; build all accumulators "
                "with the same metrics and modalities"
            )
    return combine_datasets([a.mean() for a in datasets], [a.present for a in datasets])


def weighted_score(
    scores: Float[Tensor, "metric modality layer neuron"],
    weights: Mapping[str, float] = DEFAULT_METRIC_WEIGHTS,
    metrics: Sequence[str] = MINER_METRICS,
) -> Float[Tensor, "modality layer neuron"]:
    """``sum_metric weights[metric] * scores[metric]``; ``metrics`` names the metric axis.

    Metrics without a weight count 0; a nonzero weight for a metric not in ``metrics``
    raises.
    """
    if scores.ndim != 4 or scores.shape[0] != len(metrics):
        raise ValueError(
            f"scores has shape {tuple(scores.shape)}; expected [metric, modality, layer, "
            f"neuron] with {len(metrics)} metrics {tuple(metrics)}"
        )
    unknown = [m for m, w in weights.items() if m not in metrics and w != 0]
    if unknown:
        raise ValueError(
            f"weights for {unknown} but scores only have metrics {tuple(metrics)}; "
            "set those weights to 0 or compute those metrics"
        )
    w = torch.tensor(
        [float(weights.get(m, 0.0)) for m in metrics], dtype=scores.dtype, device=scores.device
    )
    return einsum(w, scores, "metric, metric modality layer neuron -> modality layer neuron")


# --- stage 4: selection ----------------------------------------------------------------


def _top(values: Float[Tensor, "value"], k: int) -> Int[Tensor, "k"]:
    """Flat indices of the k largest values; ties to the lower index."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


def miner_select(
    scores: Tensor,
    modalities: Sequence[str],
    ratio: float = 0.02,
    strategy: str = "LA_MU",
    seed: int = 0,
) -> dict[str, Int[Tensor, "_pair 2"]]:
    """Modality-specific neurons: per modality, sorted (layer, neuron) pairs (int64).

    ``K = int(ratio * L * N)``. ``LA_MU``: each modality takes its own top ``K // M`` over
    all ``L * N`` scores (sets may overlap). ``adaptive``: top K of the sum over
    modalities, each given to the modality that scores it highest. ``LU_MA``: per layer,
    top ``K // L`` cells of the ``[M, N]`` matrix, cell (m, n) going to m. ``uniform``: per
    layer and modality, top ``K // (M * L)``. ``random``: ``K // M`` distinct random
    neurons per modality (seeded), the control. ``scores`` ``[modality, layer, neuron]``
    and the other arguments are checked here (``ValueError`` saying what is wrong).
    """
    if strategy not in MINER_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {MINER_STRATEGIES}")
    if scores.ndim != 3:
        raise ValueError(
            f"scores has shape {tuple(scores.shape)}; expected [modality, layer, neuron] "
            "(use weighted_score to mix the metrics first)"
        )
    n_mod, n_layers, n_neurons = scores.shape
    if len(modalities) != n_mod:
        raise ValueError(
            f"{len(modalities)} modality names {list(modalities)} but scores has {n_mod} "
            "modalities; pass one name per row of scores"
        )
    if len(set(modalities)) != n_mod:
        raise ValueError(f"modality names repeat: {list(modalities)}; pass each once")
    if n_layers == 0 or n_neurons == 0:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; need layers and neurons")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio is {ratio}; pass a fraction in (0, 1], e.g. 0.02")
    if not torch.isfinite(scores).all():
        raise ValueError("scores hold NaN or inf; pass finite scores")

    k_total = int(ratio * n_layers * n_neurons)
    parts = {
        "LA_MU": n_mod,
        "adaptive": 1,
        "LU_MA": n_layers,
        "uniform": n_mod * n_layers,
        "random": n_mod,
    }[strategy]
    k = k_total // parts
    if k == 0:
        raise ValueError(
            f"ratio {ratio} gives K = {k_total} neurons of {n_layers * n_neurons}, and "
            f"{strategy} splits K into {parts} parts, so each part gets none; pass a ratio "
            f"of at least {parts / (n_layers * n_neurons):.3g}"
        )
    return _select(scores, modalities, k, strategy, seed)


def _select(
    scores: Float[Tensor, "modality layer neuron"], modalities: Sequence[str], k: int, strategy: str, seed: int
) -> dict[str, Int[Tensor, "_pair 2"]]:
    """``miner_select`` of checked arguments, ``k`` neurons per part of the strategy."""
    n_mod, n_layers, n_neurons = scores.shape
    device = scores.device
    flat = rearrange(scores, "modality layer neuron -> modality (layer neuron)")
    chosen: dict[str, list[Tensor]] = {m: [] for m in modalities}  # flat (layer neuron) ids
    if strategy == "LA_MU":
        for i, m in enumerate(modalities):
            chosen[m].append(_top(flat[i], k))
    elif strategy == "adaptive":
        top = _top(reduce(flat, "modality flat -> flat", "sum"), k)
        owner = flat[:, top].argmax(dim=0)
        for i, m in enumerate(modalities):
            chosen[m].append(top[owner == i])
    elif strategy == "LU_MA":
        for layer in range(n_layers):
            cells = _top(rearrange(scores[:, layer], "modality neuron -> (modality neuron)"), k)
            for i, m in enumerate(modalities):
                chosen[m].append(layer * n_neurons + cells[cells // n_neurons == i] % n_neurons)
    elif strategy == "uniform":
        for i, m in enumerate(modalities):
            for layer in range(n_layers):
                chosen[m].append(layer * n_neurons + _top(scores[i, layer], k))
    else:  # random
        gen = torch.Generator().manual_seed(seed)
        for m in modalities:
            chosen[m].append(torch.randperm(n_layers * n_neurons, generator=gen)[:k].to(device))

    result = {}
    for m, ids in chosen.items():
        flat_ids = torch.sort(torch.cat(ids)).values  # (layer, neuron) order
        result[m] = torch.stack([flat_ids // n_neurons, flat_ids % n_neurons], dim=-1)
    return result
