"""MINER's modality-specific neurons on a HookedMLLM: modality separation, streaming
importance scores, aggregation over datasets, and selection into a ``NeuronSet``.

Only prompt (prefill) forwards are scored. Scores are computed inside the hooks, layer by
layer, and summed per dataset: memory does not grow with the number of samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from einops import einsum, reduce, repeat
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.base.hooks import block_hook, parse_block_hook
from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.base.modality import ModalityMap, position_mask, position_names
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.samples import Samples, prompt_batch, sample_chunks
from mm_lens.neurons.miner import (
    DEFAULT_METRIC_WEIGHTS,
    MINER_METRICS,
    ScoreAccumulator,
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


class MinerScoreCollector:
    """Per-sample MINER importance scores of the LM MLP neurons, summed per dataset.

    ``update(batch, dataset)`` runs one prompt forward; ``accumulators[dataset]`` holds the
    float64 sums. ``published_attention`` switches the attention-weighted metrics to the
    public code's unmasked scores with a second softmax.
    """

    def __init__(
        self, model: HookedMLLM, modalities: Sequence[str] = ("text", "image"), *, published_attention: bool = False,
        allow_nonfinite: bool = False,
    ):
        position_names(modalities, "MINER modalities")
        self.model = model
        self.allow_nonfinite = allow_nonfinite
        self.batches = 0  # batches scored so far, to name the one that goes wrong
        self.modalities = tuple(modalities)
        self.published_attention = published_attention
        self.accumulators: dict[str, ScoreAccumulator] = {}

    def update(self, batch: Any, dataset: str) -> None:
        model, n_layers, width = self.model, self.model.cfg.n_layers, self.model.cfg.d_mlp
        masks = modality_masks(batch.modality_map, self.modalities)
        keep = ~batch.modality_map.mask("padding")
        accumulator = self.accumulators.setdefault(
            dataset, ScoreAccumulator(MINER_METRICS, self.modalities, n_layers, width)
        )
        batch_size = keep.shape[0]
        # per row and modality: {metric: [layer, neuron]}, filled layer by layer
        scores = {(b, m): {k: torch.zeros(n_layers, width) for k in MINER_METRICS} for b in range(batch_size) for m in self.modalities}
        attention: dict[int, Tensor] = {}
        saved: dict[str, Tensor] = {}

        def save_pattern(pattern: Tensor, hook: Any) -> None:
            attention[_layer(hook)] = reduce(pattern.float(), "batch head q k -> batch q k", "mean")

        def save_qk(tensor: Tensor, hook: Any) -> None:
            saved[hook.name.rsplit(".", 1)[-1]] = tensor.detach()

        def score_layer(act: Tensor, hook: Any) -> None:
            layer = _layer(hook)
            if not self.allow_nonfinite and not bool(torch.isfinite(act[keep.to(act.device)]).all()):
                raise ValueError(
                    f"hook {block_hook(layer, 'mlp_act')} (lm_mlp layer {layer}) holds NaN or inf activations in batch "
                    f"{self.batches} of dataset {dataset!r}; the scores would be NaN. Check the model and inputs, or pass "
                    "allow_nonfinite=True"
                )
            pattern = None if self.published_attention else attention.pop(layer)  # free it as soon as used
            for b in range(batch_size):
                if self.published_attention:
                    row_attention = _unmasked_attention(saved["hook_rot_q"][b], saved["hook_rot_k"][b], keep[b])
                else:
                    row_attention = pattern[b]
                for m in self.modalities:
                    where = masks[m][b]
                    if not where.any():
                        continue
                    selected = row_attention[where][:, where]
                    for metric, value in importance_scores(act[b][where], selected, published_attention=self.published_attention).items():
                        scores[(b, m)][metric][layer] = value

        hooks = []
        for layer in range(n_layers):
            if self.published_attention:
                hooks += [(block_hook(layer, "attn.hook_rot_q"), save_qk), (block_hook(layer, "attn.hook_rot_k"), save_qk)]
            else:
                hooks.append((block_hook(layer, "pattern"), save_pattern))
            hooks.append((block_hook(layer, "mlp_act"), score_layer))
        with torch.no_grad():
            model.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
        for (b, m), per_metric in scores.items():
            if masks[m][b].any():
                accumulator.add(m, per_metric)
        self.batches += 1


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
) -> MinerScores:
    """Stages 1-3: score every sample of every dataset and average (per dataset over the
    samples holding each modality, then over the datasets where it occurs). NaN or inf in an
    activation is an error naming the hook, batch and dataset unless ``allow_nonfinite``."""
    if not datasets:
        raise ValueError("pass at least one dataset: {name: samples}")
    collector = MinerScoreCollector(model, modalities, published_attention=published_attention, allow_nonfinite=allow_nonfinite)
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
