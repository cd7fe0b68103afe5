"""MINER's modality-specific neurons on a HookedMLLM: modality separation, streaming
importance scores, aggregation over datasets, and selection into a ``NeuronSet``.

Only prompt (prefill) forwards are scored. Scores are computed inside the hooks, layer by
layer, and summed per dataset: memory does not grow with the number of samples.

The causal ``attn_k``/``attn_q`` metrics need, per layer, row and modality, only the row and
column sums of the head-averaged pattern within the modality (``miner.attention_sums``). By
default (``route="fast"``) the forward runs inside ``HookedMLLM.fast_attention`` (SDPA, no
``[head, query, key]`` pattern anywhere); each layer's SDPA inputs (post-rotary queries and
keys, the mask the model built, the scale) are recorded as SDPA receives them and the sums
computed from them a block of queries at a time. ``route="pattern"`` reads ``hook_pattern``
instead (eager attention, O(T^2) memory per head and layer). The fast route checks itself:
on a collector's first batch both routes run and their sums are compared (``RTOL``); on a
mismatch, or when a layer's attention did not run through SDPA, it warns
(``FastPathWarning``, naming the layer and the difference) and the collector uses the
pattern route from then on. The two routes' scores agree to float rounding: the SDPA
forward's activations differ from the eager one's in the last bits, which can flip a
``prob`` count where an activation lies within rounding of 0.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
from einops import einsum, reduce, repeat
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mm_lens.base.fast_path import FastPathWarning, mismatch, warn_fallback
from mm_lens.base.hooks import block_hook, parse_block_hook
from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.base.modality import ModalityMap, position_mask, position_names
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.samples import Samples, prompt_batch, sample_chunks
from mm_lens.neurons.miner import (
    DEFAULT_METRIC_WEIGHTS,
    MINER_METRICS,
    ScoreAccumulator,
    attention_sums,
    combine_datasets,
    importance_scores,
    miner_select,
    weighted_score,
)
from mm_lens.neurons.neuron_set import NeuronSet


def modality_masks(mm: ModalityMap, modalities: Sequence[str]) -> dict[str, Bool[Tensor, "batch pos"]]:
    """MINER's modality separation: one mask per position name (``text``, ``image``,
    ``video``, ``audio``, ``special`` -- template and BOS-like tokens --, ``special_text`` and
    ``prompt``; see ``mm_lens.base.modality.POSITIONS``)."""
    position_names(modalities, "MINER modalities")
    return {name: position_mask(mm, name) for name in modalities}


def _unmasked_attention(q: Tensor, k: Tensor, keep: Bool[Tensor, "pos"]) -> Float[Tensor, "pos pos"]:
    """The public code's ``S`` for one row: head-averaged ``softmax(q k^T / sqrt(d))`` with
    no causal mask (padding keys excluded), ``[query, key]`` over the row's positions."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = repeat(k, "pos kv d -> pos (kv group) d", group=heads // kv_heads)
    scores = einsum(q.float(), k.float(), "q head d, k head d -> head q k") / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep.to(scores.device)[None, None, :], -torch.inf)
    return reduce(scores.softmax(-1), "head q k -> q k", "mean")


ROUTES = ("fast", "pattern")
# the fast route's sums against the pattern route's, relative to their largest magnitude
RTOL = {torch.float32: 1e-4, torch.float64: 1e-4}
RTOL_HALF = 2e-2  # bfloat16 / float16 models: the eager pattern is rounded to the model dtype


class SdpaInputs(NamedTuple):
    """One attention layer's SDPA call: ``query`` ``[batch, head, pos, d_head]`` and ``key``
    ``[batch, kv_head, pos, d_head]`` (post-rotary, before the grouped-query repeat),
    ``mask`` ``[batch, 1, pos, pos]`` (boolean or additive) or None, ``scale`` and ``causal``
    (SDPA's ``is_causal``: only without a mask)."""

    query: Tensor
    key: Tensor
    mask: Tensor | None
    scale: float
    causal: bool


@contextlib.contextmanager
def recording_sdpa(modules: Mapping[torch.nn.Module, int]) -> Iterator[dict[int, SdpaInputs | None]]:
    """Within: each call of transformers' SDPA attention function by one of ``modules``
    (HF attention modules -> layer index) is recorded, by layer, as ``SdpaInputs``: what
    SDPA receives, so what the model attends with (``None``: a call with arguments these
    sums do not model, e.g. a position bias). The call itself is unchanged."""
    recorded: dict[int, SdpaInputs | None] = {}
    layers = {id(module): layer for module, layer in modules.items()}
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def record(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, *args: Any, **kwargs: Any) -> Any:
        layer = layers.get(id(module))
        if layer is not None and (args or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
            recorded[layer] = None  # a call these sums do not model: the collector falls back
        elif layer is not None:
            scale, causal = kwargs.get("scaling"), kwargs.get("is_causal")
            causal = getattr(module, "is_causal", True) if causal is None else causal  # as SDPA's wrapper decides
            recorded[layer] = SdpaInputs(
                query.detach(), key.detach(), None if attention_mask is None else attention_mask.detach(),
                query.shape[-1] ** -0.5 if scale is None else float(scale),
                bool(causal and attention_mask is None and query.shape[2] > 1),
            )
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = record  # an override on the shared instance, as transformers allows
    try:
        yield recorded
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]  # back to transformers' own function ...
        if ALL_ATTENTION_FUNCTIONS.get("sdpa") is not sdpa:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa  # ... or to an override that was there before


class _NotThroughSdpa(Exception):
    """A layer's attention ran without a usable SDPA record: the fast route cannot score it."""


class MinerScoreCollector:
    """Per-sample MINER importance scores of the LM MLP neurons, summed per dataset.

    ``update(batch, dataset)`` runs one prompt forward; ``accumulators[dataset]`` holds the
    float64 sums. ``published_attention`` switches the attention-weighted metrics to the
    public code's unmasked scores with a second softmax (eager attention, ``hook_rot_q/k``).

    The causal metrics take the route ``route``: ``"fast"`` (default) runs the forward
    through SDPA and computes the pattern's sums from the recorded SDPA inputs,
    ``block_size`` queries at a time (``miner.attention_sums``; memory O(block x T) per
    layer); ``"pattern"`` reads ``hook_pattern`` (eager attention, the ``[batch, head, T,
    T]`` pattern of one layer at a time). The first batch runs both (two forwards) and
    compares their sums; on a mismatch (or when a layer's attention did not run through SDPA, e.g. with
    ``model.use_sdpa = False`` or a hook on the attention's own hook points) a
    ``FastPathWarning`` names the layer and the difference, and ``route`` becomes
    ``"pattern"``. ``route`` tells which one the collector now uses.
    """

    def __init__(
        self, model: HookedMLLM, modalities: Sequence[str] = ("text", "image"), *, published_attention: bool = False,
        allow_nonfinite: bool = False, route: str = "fast", block_size: int = 128,
    ):
        position_names(modalities, "MINER modalities")
        if route not in ROUTES:
            raise ValueError(f"route={route!r}; pass one of {ROUTES}")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}; pass a positive number of query rows")
        self.model = model
        self.allow_nonfinite = allow_nonfinite
        self.batches = 0  # batches scored so far, to name the one that goes wrong
        self.modalities = tuple(modalities)
        self.published_attention = published_attention
        self.route = route
        self.block_size = block_size
        self.checked = False  # whether the fast route was compared with the pattern route yet
        self.accumulators: dict[str, ScoreAccumulator] = {}

    def update(self, batch: Any, dataset: str) -> None:
        n_layers, width = self.model.cfg.n_layers, self.model.cfg.d_mlp
        accumulator = self.accumulators.setdefault(
            dataset, ScoreAccumulator(MINER_METRICS, self.modalities, n_layers, width)
        )
        masks = modality_masks(batch.modality_map, self.modalities)
        route = "published" if self.published_attention else self.route
        if route == "fast" and not self.model.use_sdpa:
            route = self.route = "pattern"  # the model keeps its bulk jobs eager: no SDPA to record
        try:
            scores, sums = self._score(batch, dataset, masks, route)
        except _NotThroughSdpa as error:
            self._fall_back(str(error))
            scores, sums = self._score(batch, dataset, masks, "pattern")
            route = "pattern"
        if route == "fast" and not self.checked:
            plain_scores, plain = self._score(batch, dataset, masks, "pattern")
            problem = _first_mismatch(sums, plain, self.modalities, RTOL.get(self.model.cfg.dtype, RTOL_HALF))
            if problem is not None:
                self._fall_back(problem, disagree=True)
                scores = plain_scores
        self.checked = True
        for (b, m), per_metric in scores.items():
            accumulator.add(m, per_metric)
        self.batches += 1

    def _fall_back(self, reason: str, disagree: bool = False) -> None:
        self.route = "pattern"
        consequence = "using the pattern route (eager attention, hook_pattern) for this collector"
        if disagree:
            warn_fallback("MINER attention sums", reason, consequence)
        else:
            warnings.warn(f"mm_lens: MINER's fast attention sums are unavailable ({reason}); {consequence}", FastPathWarning, stacklevel=3)

    def _score(
        self, batch: Any, dataset: str, masks: Mapping[str, Bool[Tensor, "batch pos"]], route: str
    ) -> tuple[dict[tuple[int, str], dict[str, Tensor]], dict[tuple[int, int, str], tuple[Tensor, Tensor]]]:
        """One forward on ``route`` (``fast``, ``pattern`` or ``published``): per (row,
        modality) present, ``{metric: [layer, neuron]}``; and per (layer, row, modality) the
        causal pattern's sums ``(paid, received)`` within the modality (not for published)."""
        model, n_layers, width = self.model, self.model.cfg.n_layers, self.model.cfg.d_mlp
        keep = ~batch.modality_map.mask("padding")
        batch_size = keep.shape[0]
        present = [(b, m) for b in range(batch_size) for m in self.modalities if bool(masks[m][b].any())]
        # per row and modality: {metric: [layer, neuron]}, filled layer by layer
        scores = {(b, m): {k: torch.zeros(n_layers, width) for k in MINER_METRICS} for b, m in present}
        sums: dict[tuple[int, int, str], tuple[Tensor, Tensor]] = {}
        attention: dict[int, Tensor] = {}
        saved: dict[str, Tensor] = {}
        recorded: dict[int, SdpaInputs | None] = {}

        def save_pattern(pattern: Tensor, hook: Any) -> None:
            attention[_layer(hook)] = reduce(pattern.float(), "batch head q k -> batch q k", "mean")

        def save_qk(tensor: Tensor, hook: Any) -> None:
            saved[hook.name.rsplit(".", 1)[-1]] = tensor.detach()

        def layer_sums(layer: int, b: int) -> dict[str, tuple[Tensor, Tensor]]:
            """``{modality: (paid, received)}`` of row ``b`` at its positions in the modality."""
            if route == "pattern":
                row_attention = attention[layer][b]
                within = {m: row_attention[masks[m][b]][:, masks[m][b]] for m in self.modalities if (b, m) in scores}
                return {m: (w.sum(-1), w.sum(-2)) for m, w in within.items()}
            inputs = recorded.get(layer)
            if inputs is None or inputs.query.shape[2] != inputs.key.shape[2] or (inputs.mask is not None and inputs.mask.shape[1] != 1):
                raise _NotThroughSdpa(
                    f"{block_hook(layer, 'attn')}'s attention did not run through a prefill SDPA call these sums model"
                    " (an attention hook, model.use_sdpa = False, softcapping, a KV cache or a per-head mask)"
                )
            mask = None if inputs.mask is None else inputs.mask[b if inputs.mask.shape[0] > 1 else 0, 0]
            names = [m for m in self.modalities if (b, m) in scores]
            groups = torch.stack([masks[m][b] for m in names]).to(inputs.query.device)
            paid, received = attention_sums(
                inputs.query[b], inputs.key[b], groups, scale=inputs.scale, mask=mask, causal=inputs.causal, block=self.block_size
            )
            return {m: (paid[i][groups[i]], received[i][groups[i]]) for i, m in enumerate(names)}

        def score_layer(act: Tensor, hook: Any) -> None:
            layer = _layer(hook)
            if not self.allow_nonfinite and not _finite(act, keep.to(act.device)):
                raise ValueError(
                    f"hook {block_hook(layer, 'mlp_act')} (lm_mlp layer {layer}) holds NaN or inf activations in batch "
                    f"{self.batches} of dataset {dataset!r}; the scores would be NaN. Check the model and inputs, or pass "
                    "allow_nonfinite=True"
                )
            for b in range(batch_size):
                if route == "published":
                    row_attention = _unmasked_attention(saved["hook_rot_q"][b], saved["hook_rot_k"][b], keep[b])
                    for m in self.modalities:
                        if (b, m) in scores:
                            where = masks[m][b]
                            value = importance_scores(act[b][where], row_attention[where][:, where], published_attention=True)
                            for metric, v in value.items():
                                scores[(b, m)][metric][layer] = v
                    continue
                for m, (paid, received) in layer_sums(layer, b).items():
                    sums[(layer, b, m)] = (paid, received)
                    value = importance_scores(act[b][masks[m][b]], paid=paid, received=received)
                    for metric, v in value.items():
                        scores[(b, m)][metric][layer] = v
            attention.pop(layer, None)  # free each layer's pattern or SDPA record as soon as used
            recorded.pop(layer, None)

        hooks = []
        for layer in range(n_layers):
            if route == "published":
                hooks += [(block_hook(layer, "attn.hook_rot_q"), save_qk), (block_hook(layer, "attn.hook_rot_k"), save_qk)]
            elif route == "pattern":
                hooks.append((block_hook(layer, "pattern"), save_pattern))
            hooks.append((block_hook(layer, "mlp_act"), score_layer))
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if route == "fast":
                stack.enter_context(model.fast_attention())
                attention_modules = {model.bridge.blocks[layer].attn.original_component: layer for layer in range(n_layers)}
                recorded = stack.enter_context(recording_sdpa(attention_modules))
            model.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
        return scores, sums


def _first_mismatch(
    fast: Mapping[tuple[int, int, str], tuple[Tensor, Tensor]],
    plain: Mapping[tuple[int, int, str], tuple[Tensor, Tensor]],
    modalities: Sequence[str],
    rtol: float,
) -> str | None:
    """``None`` when the fast route's sums equal the pattern route's (within ``rtol`` of
    their largest magnitude, per layer, modality and kind), else where and by how much they
    first differ."""
    if set(fast) != set(plain):
        return f"the routes scored different (layer, row, modality) sets: {sorted(set(fast) ^ set(plain))[:4]}"
    for layer in sorted({key[0] for key in plain}):
        for m in modalities:
            keys = [key for key in plain if key[0] == layer and key[2] == m]
            for i, kind in enumerate(("row sums (paid)", "column sums (received)")):
                if not keys:
                    continue
                problem = mismatch(torch.cat([fast[key][i].cpu() for key in keys]), torch.cat([plain[key][i].cpu() for key in keys]), rtol)
                if problem is not None:
                    return f"{block_hook(layer, 'attn')} (layer {layer}), {m} {kind}: {problem}"
    return None


def _finite(act: Float[Tensor, "batch pos neuron"], keep: Bool[Tensor, "batch pos"]) -> bool:
    """Whether every activation at a kept position is finite. A position's sum over neurons
    is non-finite whenever one of its activations is (or on overflow, which the exact check
    then clears), so the exact check runs only when a sum says so."""
    return bool(torch.isfinite(act.sum(-1))[keep].all()) or bool(torch.isfinite(act[keep]).all())


def _layer(hook: Any) -> int:
    return parse_block_hook(hook.name)[0]


@dataclass
class MinerScores:
    """Aggregated importance scores ``[metric, modality, layer, neuron]`` (stage 3) and
    which modality occurred in which dataset."""

    scores: Float[Tensor, "metric modality layer neuron"]
    modalities: list[str]
    datasets: list[str]
    present: Bool[Tensor, "dataset modality"]
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = MINER_METRICS

    def weighted(self, weights: Mapping[str, float] = DEFAULT_METRIC_WEIGHTS) -> Float[Tensor, "modality layer neuron"]:
        return weighted_score(self.scores, weights, self.metrics)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        header = {"modalities": self.modalities, "datasets": self.datasets, "metrics": list(self.metrics), "metadata": self.metadata}
        save_tensors(path, {"scores": self.scores, "present": self.present}, header, "MinerScores", overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MinerScores":
        tensors, header = load_tensors(path, "MinerScores")
        return cls(tensors["scores"], header["modalities"], header["datasets"], tensors["present"], header["metadata"], tuple(header["metrics"]))


def collect_miner_scores(
    model: HookedMLLM,
    datasets: Mapping[str, Samples],
    *,
    modalities: Sequence[str] = ("text", "image"),
    published_attention: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    allow_nonfinite: bool = False,
    route: str = "fast",
) -> MinerScores:
    """Stages 1-3: score every sample of every dataset and average (per dataset over the
    samples holding each modality, then over the datasets where it occurs). NaN or inf in an
    activation is an error naming the hook, batch and dataset unless ``allow_nonfinite``.
    ``route``: how the causal attention metrics are computed (``MinerScoreCollector``)."""
    if not datasets:
        raise ValueError("pass at least one dataset: {name: samples}")
    collector = MinerScoreCollector(
        model, modalities, published_attention=published_attention, allow_nonfinite=allow_nonfinite, route=route
    )
    total = sum((len(s) + batch_size - 1) // batch_size for s in datasets.values())
    bar = tqdm(total=total, desc="MINER scores", disable=not progress, unit="batch")
    for name, samples in datasets.items():
        for _, chunk in sample_chunks(samples, batch_size):
            collector.update(prompt_batch(model, chunk), name)
            bar.update(1)
    bar.close()
    names = [n for n in datasets if n in collector.accumulators]
    accumulators = [collector.accumulators[n] for n in names]
    return MinerScores(
        scores=combine_datasets([a.mean() for a in accumulators], [a.present for a in accumulators]),
        modalities=list(modalities),
        datasets=names,
        present=torch.stack([a.present for a in accumulators]),
        metadata={"published_attention": published_attention, "samples": {n: len(datasets[n]) for n in names}},
    )


def select_modality_neurons(
    scores: MinerScores,
    *,
    weights: Mapping[str, float] = DEFAULT_METRIC_WEIGHTS,
    ratio: float = 0.02,
    strategy: str = "LA_MU",
    seed: int = 0,
) -> NeuronSet:
    """Stage 4: ``miner_select`` on the weighted scores, as a ``NeuronSet`` over ``lm_mlp``
    with one group per modality. A modality that occurred in no dataset is refused: its
    scores are zeros, not a ranking."""
    absent = [m for i, m in enumerate(scores.modalities) if not bool(scores.present[:, i].any())]
    if absent:
        raise ValueError(
            f"modality {absent} occurred in none of the datasets {scores.datasets}: it has no scores to rank; "
            "add samples holding it or leave it out of modalities="
        )
    weighted = scores.weighted(weights)
    pairs = miner_select(weighted, scores.modalities, ratio=ratio, strategy=strategy, seed=seed)
    _, n_layers, width = weighted.shape
    metadata = {
        "method": "miner",
        "parameters": {"ratio": ratio, "strategy": strategy, "seed": seed, "weights": dict(weights)},
        "scores": scores.metadata,
    }
    return NeuronSet.from_pairs(pairs, "lm_mlp", n_layers, width, metadata)
