"""Streaming neuron statistics: one pass over a dataset, reduced inside the hooks.

For every neuron module (``model.neuron_hooks``), layer, neuron and group (domain x position
class) we keep: the count of activations > 0, their sum and sum of squares (float64), the
max and min, and the number of positions. Memory is O(groups x layers x neurons), whatever
the dataset size: activations never leave the hook.

Position classes: ``image`` (image-feature and image-newline positions), ``text`` (text
positions, special tokens excluded), ``all`` (every non-padding position) and ``last`` (the
last non-padding position of each row); ``video`` and ``audio`` may be asked for too.
Encoder positions (vision tower, Q-Former, projector; the audio encoder of an audio model)
belong to the modality of the items the encoder runs on (``model.spec.encoder_calls()``: one
call per kind, e.g. Qwen2-VL's images then videos): they count in that class and ``all``.
Encoder hooks' leading rows are split between items in proportion to their
``ModalityMap.image_tiles`` units, so packed encoders (Qwen2-VL) work as batched ones do;
rows the architecture marks as padding (``spec.encoder_rows``) are left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from einops import rearrange, reduce
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.base.modality import ModalityMap
from mm_lens.model.hooked import HookedMLLM

POSITION_CLASSES: tuple[str, ...] = ("image", "text", "all", "last")
MEDIA_CLASSES: tuple[str, ...] = ("image", "video", "audio")
ALL_POSITION_CLASSES: tuple[str, ...] = POSITION_CLASSES + ("video", "audio", "generated")


def default_classes(model: HookedMLLM) -> tuple[str, ...]:
    """``POSITION_CLASSES`` with the model's encoder modality in place of ``image``
    (``("audio", "text", "all", "last")`` for an audio model)."""
    return (model.spec.encoder_modality, *POSITION_CLASSES[1:])
_FIELDS = ("over_zero", "sum", "sum_sq", "max", "min", "n_tokens")


@dataclass
class ModuleStats:
    """Statistics of one neuron module; tensors are ``[layer, domain, class, neuron]``
    (``n_tokens``: ``[layer, domain, class]``)."""

    over_zero: Int[Tensor, "layer domain cls neuron"]
    sum: Float[Tensor, "layer domain cls neuron"]
    sum_sq: Float[Tensor, "layer domain cls neuron"]
    max: Float[Tensor, "layer domain cls neuron"]
    min: Float[Tensor, "layer domain cls neuron"]
    n_tokens: Int[Tensor, "layer domain cls"]

    @classmethod
    def empty(cls, n_layers: int, n_domains: int, n_classes: int, width: int) -> "ModuleStats":
        shape = (n_layers, n_domains, n_classes, width)
        return cls(
            over_zero=torch.zeros(shape, dtype=torch.int64),
            sum=torch.zeros(shape, dtype=torch.float64),
            sum_sq=torch.zeros(shape, dtype=torch.float64),
            max=torch.full(shape, -torch.inf, dtype=torch.float64),
            min=torch.full(shape, torch.inf, dtype=torch.float64),
            n_tokens=torch.zeros(shape[:3], dtype=torch.int64),
        )

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in _FIELDS}

    def _per_token(self, total: Tensor) -> Tensor:
        """``total`` per position of each group; NaN for a group that saw no position (never
        a silent 0)."""
        n = rearrange(self.n_tokens, "layer domain cls -> layer domain cls 1")
        return torch.where(n > 0, total / n.clamp(min=1), torch.nan)

    def probability(self) -> Float[Tensor, "layer domain cls neuron"]:
        """Share of positions where each neuron fired (NaN for groups with no position)."""
        return self._per_token(self.over_zero.double())

    def mean(self) -> Float[Tensor, "layer domain cls neuron"]:
        return self._per_token(self.sum)

    def std(self) -> Float[Tensor, "layer domain cls neuron"]:
        """Population standard deviation of each neuron's activation per group."""
        return (self._per_token(self.sum_sq) - self.mean() ** 2).clamp(min=0).sqrt()


@dataclass
class NeuronStats:
    """Statistics of every neuron module, for ``domains`` x ``classes`` groups."""

    domains: tuple[str, ...]
    classes: tuple[str, ...]
    modules: dict[str, ModuleStats]
    metadata: dict[str, Any] = field(default_factory=dict)

    def over_zero(self, module: str, position_class: str = "all") -> Int[Tensor, "layer neuron domain"]:
        """Counts in the layout ``lape_select`` takes."""
        c = self._class_index(position_class)
        return rearrange(self.modules[module].over_zero[:, :, c], "layer domain neuron -> layer neuron domain")

    def n_tokens(self, module: str, position_class: str = "all") -> Int[Tensor, "domain"]:
        """Positions counted per domain (the same at every layer)."""
        return self.modules[module].n_tokens[0, :, self._class_index(position_class)]

    def neuron_means(self, position_class: str = "all", domains: Sequence[str] | None = None) -> dict[str, Float[Tensor, "_layer _neuron"]]:
        """Mean activation of every neuron, pooled over ``domains`` (default: all), per
        module (``[layer, neuron]``, each module its own sizes): the ``means`` that
        ``deactivation_hooks(mode="mean")`` takes."""
        c = self._class_index(position_class)
        chosen = list(self.domains) if domains is None else list(domains)
        unknown = [d for d in chosen if d not in self.domains]
        if unknown:
            raise ValueError(f"unknown domains {unknown}; the statistics have {list(self.domains)}")
        index = torch.tensor([self.domains.index(d) for d in chosen])
        means = {}
        for name, stats in self.modules.items():
            total = reduce(stats.sum[:, index, c], "layer domain neuron -> layer neuron", "sum")
            count = reduce(stats.n_tokens[:, index, c], "layer domain -> layer 1", "sum")
            if bool((count == 0).any()):
                raise ValueError(
                    f"{name} saw no {position_class!r} position in domain(s) {chosen}: no mean to ablate with; "
                    "choose another position class or domains"
                )
            means[name] = (total / count).float()
        return means

    def _class_index(self, position_class: str) -> int:
        if position_class not in self.classes:
            raise ValueError(f"position class {position_class!r} was not collected; have {', '.join(self.classes)}")
        return self.classes.index(position_class)

    def equals(self, other: "NeuronStats") -> bool:
        """Bit-identical statistics (same groups, modules and values)."""
        if (self.domains, self.classes, list(self.modules)) != (other.domains, other.classes, list(other.modules)):
            return False
        return all(
            torch.equal(a, b)
            for name in self.modules
            for a, b in zip(self.modules[name].tensors().values(), other.modules[name].tensors().values())
        )

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """One safetensors file (groups, modules and metadata in its header), written atomically
        (an existing file is replaced only with ``overwrite``)."""
        tensors = {f"{i}.{name}": t for i, m in enumerate(self.modules.values()) for name, t in m.tensors().items()}
        header = {"domains": list(self.domains), "classes": list(self.classes), "modules": list(self.modules), "metadata": self.metadata}
        save_tensors(path, tensors, header, "NeuronStats", overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NeuronStats":
        tensors, header = load_tensors(path, "NeuronStats")
        modules = {
            name: ModuleStats(**{f: tensors[f"{i}.{f}"] for f in _FIELDS}) for i, name in enumerate(header["modules"])
        }
        return cls(tuple(header["domains"]), tuple(header["classes"]), modules, header["metadata"])

    def all_reduce(self) -> None:
        """Combine the statistics of every rank of the default ``torch.distributed`` group
        in place: sums for counts and moments, max and min for the extremes."""
        import torch.distributed as dist

        # NCCL reduces CUDA tensors only: the CPU totals travel through the GPU and back
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        for stats in self.modules.values():
            for name in _FIELDS:
                tensor = getattr(stats, name)
                moved = tensor if device is None else tensor.to(device)
                op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(name, dist.ReduceOp.SUM)
                dist.all_reduce(moved, op=op)
                if device is not None:
                    tensor.copy_(moved.cpu())


class NeuronStatsCollector:
    """Accumulates ``NeuronStats`` over batches through TL hooks on a ``HookedMLLM``.

    ``update(batch, domains)`` runs one forward with hooks that reduce each neuron module's
    activation into the running statistics; ``domains[i]`` labels row ``i`` of the batch.
    ``classes`` defaults to ``default_classes(model)``.
    """

    def __init__(
        self,
        model: HookedMLLM,
        domains: Sequence[str],
        modules: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        *,
        allow_nonfinite: bool = False,
    ):
        classes = default_classes(model) if classes is None else classes
        unknown = set(classes) - set(ALL_POSITION_CLASSES)
        if unknown:
            raise ValueError(f"unknown position classes {sorted(unknown)}; choose from {', '.join(ALL_POSITION_CLASSES)}")
        if len(set(domains)) != len(domains) or not domains:
            raise ValueError(f"domains must be a non-empty list of distinct names, got {list(domains)}")
        available = model.neuron_hooks
        modules = list(available) if modules is None else list(modules)
        missing = [m for m in modules if m not in available]
        if missing:
            raise ValueError(f"unknown neuron modules {missing}; this model has {', '.join(available)}")
        self.model = model
        self.allow_nonfinite = allow_nonfinite
        self.batches = 0  # batches added so far, to name the one that goes wrong
        self.hooks = {m: available[m] for m in modules}
        self.stats = NeuronStats(tuple(domains), tuple(classes), {}, {})
        widths = model.neuron_widths
        for module, hooks in self.hooks.items():
            self.stats.modules[module] = ModuleStats.empty(len(hooks), len(domains), len(classes), widths[module])

    def update(self, batch: Any, domains: Sequence[str]) -> None:
        """Run ``batch`` (a ``MultimodalBatch``) once and add its activations; they are
        reduced inside the hooks and never stored. Attention runs through SDPA
        (``HookedMLLM.fast_attention``): no statistic reads the pattern."""
        with torch.no_grad(), self.model.fast_attention():
            self.model.run_with_hooks(batch, fwd_hooks=self._reducers(batch, domains), return_type=None)
        self.batches += 1

    def add_cache(self, cache: ActivationCache | Mapping[str, Tensor], batch: Any, domains: Sequence[str]) -> None:
        """Add activations already cached for ``batch`` (e.g. by ``run_with_cache``). A cache
        keeps the last call of each hook only: encoder modules need batches with one kind of
        media (``update`` takes any). ``update`` runs attention through SDPA
        (``model.fast_attention()``); a cache made outside it differs in the last bits."""
        kinds = set(batch.modality_map.item_modality)
        if len(kinds) > 1 and any(not name.startswith("blocks.") for hooks in self.hooks.values() for name in hooks):
            raise ValueError(
                f"the batch holds {sorted(kinds)} items: the encoder ran once per kind and a cache keeps the last "
                "call only; use update() for such batches"
            )
        for name, reduce_into_stats in self._reducers(batch, domains):
            reduce_into_stats(cache[name], None)
        self.batches += 1

    def _reducers(self, batch: Any, domains: Sequence[str]) -> list[tuple[str, Callable]]:
        mm: ModalityMap = batch.modality_map
        if len(domains) != mm.shape[0]:
            raise ValueError(f"{len(domains)} domain labels for a batch of {mm.shape[0]} rows; pass one label per row")
        unknown = sorted(set(domains) - set(self.stats.domains))
        if unknown:
            raise ValueError(f"domain labels {unknown} are not among the collector's domains {list(self.stats.domains)}")
        domain_of_row = torch.tensor([self.stats.domains.index(d) for d in domains])
        spec = self.model.spec
        stray = sorted(set(mm.item_modality) - set(spec.encoder_calls()))
        if stray:
            raise ValueError(f"the batch holds {stray} items, which {spec.hf_class} does not take")
        # the encoder runs once per kind of media in the batch, in the spec's order
        calls = [kind for kind in spec.encoder_calls() if kind in mm.item_modality] or [spec.encoder_modality]
        segments = [_segments(mm, domain_of_row, self.stats.classes, kind) for kind in calls]
        real_rows = {} if spec.encoder_rows is None else spec.encoder_rows(self.model.hf_model.config, batch.inputs)
        return [
            (name, self._reducer(name, module, layer, segments, name.startswith("blocks."), real_rows.get(module)))
            for module, hooks in self.hooks.items()
            for layer, name in enumerate(hooks)
        ]

    def _reducer(
        self, name: str, module: str, layer: int, segments: list["_Segments"], on_sequence: bool, real_rows: Tensor | None
    ) -> Callable:
        """The hook function of one neuron hook for one batch. An encoder hook fires once per
        kind of media (``segments[k]`` describes its ``k``-th call); a language-model hook once."""
        stats = self.stats.modules[module]
        calls = iter(segments[:1] if on_sequence else segments)

        def reduce_into_stats(act: Tensor, hook: Any) -> None:
            call = next(calls, None)
            if call is None:
                raise ValueError(
                    f"{module} layer {layer} fired more often than the batch's {len(segments)} kind(s) of media; "
                    "a cache keeps one call per hook, so pass batches with one kind of media to add_cache"
                )
            rows, spans = call.select(act, on_sequence, real_rows)
            for start, end, destinations, reduced in _span_reductions(rows, spans):
                fired, total, squares, high, low = (t.to(stats.sum.device) for t in reduced)  # totals live on the CPU
                if not self.allow_nonfinite and not bool(torch.isfinite(squares).all()):  # any NaN or inf reaches the sum of squares
                    raise ValueError(
                        f"hook {name} ({module} layer {layer}) holds NaN or inf activations in batch {self.batches}; "
                        "they would count as never firing. Check the model and inputs, or pass allow_nonfinite=True"
                    )
                for d, c in destinations:
                    stats.over_zero[layer, d, c] += fired
                    stats.sum[layer, d, c] += total
                    stats.sum_sq[layer, d, c] += squares
                    torch.maximum(stats.max[layer, d, c], high, out=stats.max[layer, d, c])
                    torch.minimum(stats.min[layer, d, c], low, out=stats.min[layer, d, c])
                    stats.n_tokens[layer, d, c] += end - start

        return reduce_into_stats


Span = tuple[int, int, list[tuple[int, int]]]  # rows [start, end) and their (domain, class) groups


def _span_reductions(rows: Float[Tensor, "row neuron"], spans: Sequence[Span], chunk: int | None = None):
    """For each span of ``rows``: ``start, end, groups`` and its reductions over the span's
    rows: ``(count > 0, sum, sum of squares, max, min)``, each ``[neuron]``.

    Sums are float64, taken as products with a vector of ones (BLAS, several times faster
    than column reductions), ``chunk`` rows at a time so that the float64 and 0/1 copies stay
    small and in cache (default: 2 MiB of float64, 16 to 256 rows; at LLaVA-7B's 11,008
    neurons 128-row chunks raised the statistics' peak memory by 11%); the count is the same
    product on a float32 0/1 copy (exact below 2^24 rows); max and min are column reductions
    in the activations' dtype. A NaN or inf stays in its own span.
    """
    if rows.shape[0] >= 1 << 24:
        raise ValueError(f"{rows.shape[0]} rows in one hook call: counts would lose precision in float32; use smaller batches")
    width, device = rows.shape[1], rows.device
    chunk = chunk or max(16, min(256, (2 << 20) // (8 * width)))
    ones = torch.ones(chunk, dtype=torch.float64, device=device)
    ones_single = ones.float()
    wide = torch.empty((chunk, width), dtype=torch.float64, device=device)
    positive = torch.empty((chunk, width), dtype=torch.float32, device=device)
    for start, end, groups in spans:
        total = torch.zeros(width, dtype=torch.float64, device=device)
        squares, fired = torch.zeros_like(total), torch.zeros(width, dtype=torch.float32, device=device)
        for first in range(start, end, chunk):
            values = rows[first : min(first + chunk, end)]
            n = values.shape[0]
            w, p = wide[:n], positive[:n]
            w.copy_(values)
            total.addmv_(w.T, ones[:n])
            squares.addmv_(w.square_().T, ones[:n])
            fired.addmv_(torch.gt(values, 0, out=p).T, ones_single[:n])
        values = rows[start:end]
        yield start, end, groups, (fired.long(), total, squares, values.amax(0).double(), values.amin(0).double())


@dataclass
class _Segments:
    """For one batch: the rows of a hooked activation, ordered so that the positions of each
    (domain, kind) form one contiguous span, and the groups each span counts in.

    Language-model positions are split into disjoint kinds (image, text, special) plus the
    last positions, so each activation is reduced once and added to every class it is in
    (``all`` = image + text + special). Vision crops are spans of whole crops.
    """

    positions: tuple[Tensor, Tensor]
    position_spans: list[Span]
    crops: Tensor
    crop_spans: list[Span]
    shape: tuple[int, int]

    def select(
        self, act: Tensor, on_sequence: bool, real_rows: Bool[Tensor, "unit row"] | None = None
    ) -> tuple[Tensor, list[Span]]:
        """Rows ``[m, neuron]`` of ``act`` in span order, and the spans.

        ``on_sequence``: ``act`` is ``[batch, pos, neuron]`` (language model); otherwise an
        encoder tensor whose leading axes hold the items' units (``[crops, tokens, neuron]``
        for LLaVA's vision tower, ``[patches, neuron]`` for a packed encoder), of which only
        ``real_rows`` (``[unit, rows per unit]``, when given) are kept.
        """
        if on_sequence:
            if tuple(act.shape[:2]) != self.shape:
                raise ValueError(f"a language-model hook saw shape {tuple(act.shape)}; the batch is {list(self.shape)}")
            return act[self.positions], self.position_spans
        rows = act.reshape(-1, act.shape[-1])
        batched = act.ndim == 3 and act.shape[0] != len(self.crops)  # [crops, tokens, neuron] must match exactly
        if not len(self.crops) or rows.shape[0] % len(self.crops) or batched:
            raise ValueError(
                f"an encoder hook saw shape {tuple(act.shape)}, which does not split into the batch's "
                f"{len(self.crops)} encoder units"
            )
        per_unit = rows.shape[0] // len(self.crops)
        units = rows.reshape(len(self.crops), per_unit, -1)[self.crops]
        if real_rows is None:
            spans = [(start * per_unit, end * per_unit, groups) for start, end, groups in self.crop_spans]
            return units.flatten(0, 1), spans
        if tuple(real_rows.shape) != (len(self.crops), per_unit):
            raise ValueError(
                f"an encoder hook saw {len(self.crops)} units of {per_unit} rows but its real-row mask is "
                f"{list(real_rows.shape)}"
            )
        keep = real_rows.to(units.device)[self.crops]
        ends = torch.cat([torch.zeros(1, dtype=torch.long), keep.sum(1).cumsum(0).cpu()]).tolist()
        spans = [(ends[start], ends[end], groups) for start, end, groups in self.crop_spans]
        return units[keep], spans


def _segments(mm: ModalityMap, domain_of_row: Tensor, classes: Sequence[str], encoder_modality: str) -> _Segments:
    def targets(*names: str) -> list[int]:
        return [classes.index(n) for n in names if n in classes]

    kinds = [  # disjoint kinds of language-model position, and the classes each counts in
        *[(mm.mask(m), targets(m, "all")) for m in MEDIA_CLASSES],
        (mm.mask("text"), targets("text", "all")),
        (mm.mask("special"), targets("all")),
        (mm.mask("generated"), targets("generated")),  # answer tokens of a Generation's batch: not in "all"
        (mm.last_mask(), targets("last")),
    ]
    batch_index, pos_index, position_spans, start = [], [], [], 0
    for d in domain_of_row.unique().tolist():
        in_domain = rearrange(domain_of_row == d, "batch -> batch 1")
        for mask, class_indices in kinds:
            b, p = torch.nonzero(mask & in_domain, as_tuple=True)
            if len(b) and class_indices:
                batch_index.append(b)
                pos_index.append(p)
                position_spans.append((start, start + len(b), [(d, c) for c in class_indices]))
                start += len(b)
    crop_domain = domain_of_row[mm.tile_rows(encoder_modality)]
    crop_order, crop_spans, start = [], [], 0
    vision_classes = targets(encoder_modality, "all")
    for d in crop_domain.unique().tolist():
        crops = torch.nonzero(crop_domain == d).flatten()
        if vision_classes:
            crop_order.append(crops)
            crop_spans.append((start, start + len(crops), [(d, c) for c in vision_classes]))
            start += len(crops)
    empty = torch.zeros(0, dtype=torch.long)
    return _Segments(
        positions=(torch.cat(batch_index) if batch_index else empty, torch.cat(pos_index) if pos_index else empty),
        position_spans=position_spans,
        crops=torch.cat(crop_order) if crop_order else torch.arange(len(crop_domain)),
        crop_spans=crop_spans,
        shape=mm.shape,
    )
