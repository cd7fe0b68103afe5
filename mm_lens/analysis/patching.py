"""Activation patching across images: which layers, positions and image patches carry the
difference between a clean and a corrupted picture.

The two batches must differ only in their images: same prompts, same token ids (so the same
number of image tokens at the same positions). A sweep replaces, at one layer and one unit
(a position, an image grid cell, or all chosen positions at once), the target run's
activation with the source run's, and records a metric at the last position. Effects are
normalised so that 0 = corrupted and 1 = clean. Several patches run in one forward, as a
batch of copies of the target run resumed at the patched layer.

TransformerLens' own ``transformer_lens.patching`` calls ``model.run_with_hooks(tokens)``
with tokens only; ``with_inputs(model, batch)`` gives it a model that adds the batch's
images (see docs/patching.md), and refuses cached activations that do not line up with them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache

from mm_lens.base.display import new_figure
from mm_lens.base.fast_path import agreeing
from mm_lens.base.hooks import block_hook, resolve_layers
from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.base.modality import MODALITIES, ModalityMap, position_mask
from mm_lens.model.architectures.bridge_components import CACHE_KEYWORDS
from mm_lens.model.hooked import HookedMLLM, map_difference
from mm_lens.model.inputs import MultimodalBatch

HOOKS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_act")
METRICS = ("logit_diff", "prob", "kl")


def check_counterfactual(clean: MultimodalBatch, corrupted: MultimodalBatch) -> None:
    """Raise ``ValueError`` unless the batches differ only in their images (same token ids
    and masks, and the same layout of every image: tiles, grid cells and features)."""
    a, b = clean["input_ids"], corrupted["input_ids"]
    if a.shape != b.shape:
        raise ValueError(
            f"clean input_ids have shape {tuple(a.shape)} and corrupted {tuple(b.shape)}; patching across "
            "images needs the same prompts and the same number of image tokens (same image sizes for anyres)"
        )
    if not torch.equal(a, b):
        row, pos = (int(i) for i in torch.nonzero(a != b)[0])
        raise ValueError(
            f"clean and corrupted token ids differ (first at row {row}, position {pos}); "
            "use the same prompts so that only the images differ"
        )
    if not torch.equal(clean.get("attention_mask", torch.ones_like(a)), corrupted.get("attention_mask", torch.ones_like(b))):
        raise ValueError("clean and corrupted attention masks differ; build both batches with the same padding side")
    difference = map_difference(clean.modality_map, corrupted.modality_map, ("the clean batch", "the corrupted batch"))
    if difference is not None:
        raise ValueError(
            f"clean and corrupted images are laid out differently ({difference}); "
            "use images of the same size so that every image token means the same patch in both"
        )


@dataclass
class Unit:
    """What one patch replaces: these positions (the same in every row)."""

    positions: Int[Tensor, "n"]
    label: str
    cell: tuple[int, int, int, int] | None = None  # (image, view, row, col) for grid cells


def _units(mm: ModalityMap, positions: str | Sequence[str] | Tensor, per: str, cell_size: int, names: Sequence[str]) -> list[Unit]:
    """The patch units of a batch whose rows all place the chosen positions alike; ``names``
    labels each position of the first row (``position_names``)."""
    chosen = position_mask(mm, positions)
    if not (chosen == chosen[0]).all():
        raise ValueError(
            "the chosen positions differ between rows; patch one row at a time or use prompts "
            "that place them alike (same template, same image sizes)"
        )
    where = torch.nonzero(chosen[0]).flatten()
    if where.numel() == 0:
        raise ValueError(f"no position of the batch is {positions!r}")
    if per == "all":
        return [Unit(where, f"{positions} (all {where.numel()})")]
    if per == "position":
        return [Unit(p[None], names[int(p)]) for p in where]
    if per != "cell":
        raise ValueError(f"per must be 'position', 'cell' or 'all', not {per!r}")
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for p in where.tolist():
        image, tile = int(mm.image[0, p]), int(mm.tile[0, p])
        row, col = int(mm.row[0, p]), int(mm.col[0, p])
        if image < 0 or row < 0 or col < 0:
            continue  # not a grid cell: text, CLS or newline
        key = (image, 0 if tile == 0 else 1, row // cell_size, col // cell_size)
        groups.setdefault(key, []).append(p)
    if not groups:
        raise ValueError("per='cell' needs image positions among the chosen ones")
    return [
        Unit(torch.tensor(ps), f"image {k[0]} view {k[1]} cell ({k[2]},{k[3]})", k) for k, ps in sorted(groups.items())
    ]


def position_names(model: HookedMLLM, batch: MultimodalBatch, row: int = 0) -> list[str]:
    """One label per position of batch row ``row`` naming its place, token and modality:
    ``"7 'car' text"``, ``"1 '<s>' special"``, ``"3 <img 0:r1c2>"``."""
    mm = batch.modality_map
    tokens = model.processor.tokenizer.convert_ids_to_tokens(batch.inputs["input_ids"][row].tolist())
    names = []
    for pos, token in enumerate(tokens):
        media = mm.media_label(row, pos)
        names.append(f"{pos} {media}" if media else f"{pos} {str(token)!r} {MODALITIES[int(mm.modality[row, pos])]}")
    return names


def _check_recoverable(metric: Any, clean_value: float, corrupted_value: float) -> None:
    if abs(clean_value - corrupted_value) < 1e-12:
        raise ValueError(f"the {metric} metric is the same on the clean and corrupted runs; nothing to recover")


@dataclass(frozen=True)
class _SweepPlan:
    """What ``patch_sweep`` and ``attribution_patch`` both settle before running: the two
    runs by name, the layers, the units (labelled by ``position_names``) and hook names."""

    runs: dict[str, MultimodalBatch]
    layers: list[int]
    units: list[Unit]
    names: list[str]
    settings: dict[str, Any]

    @classmethod
    def check(cls, model: HookedMLLM, clean: MultimodalBatch, corrupted: MultimodalBatch, hook: str,
              layers: Sequence[int] | None, positions: str | Sequence[str] | Tensor, per: str, cell_size: int,
              source: str, target: str) -> "_SweepPlan":
        check_counterfactual(clean, corrupted)
        if hook not in HOOKS:
            raise ValueError(f"unknown hook {hook!r}; choose one of {', '.join(HOOKS)}")
        runs = {"clean": clean, "corrupted": corrupted}
        if source not in runs or target not in runs:
            raise ValueError("source and target must each be 'clean' or 'corrupted'")
        layers = resolve_layers(layers, model.cfg.n_layers)
        units = _units(clean.modality_map, positions, per, cell_size, position_names(model, clean))
        settings = {"positions": positions if not isinstance(positions, Tensor) else "mask", "per": per,
                    "cell_size": cell_size, "source": source, "target": target}
        return cls(runs, layers, units, [block_hook(l, hook) for l in layers], settings)

    def result(self, raw: Tensor, clean_value: float, corrupted_value: float, hook: str, metric: Any,
               **metadata: Any) -> "PatchingResult":
        """The sweep's ``PatchingResult`` from the raw metric per layer and unit."""
        return PatchingResult(
            effect=(raw - corrupted_value) / (clean_value - corrupted_value),
            metric=raw,
            clean_metric=clean_value,
            corrupted_metric=corrupted_value,
            layers=self.layers,
            units=self.units,
            hook=hook,
            metric_name=metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
            metadata=self.settings | metadata,
        )


def _tile(inputs: dict[str, Tensor], copies: int) -> dict[str, Tensor]:
    """The batch repeated ``copies`` times along its leading axis (images included)."""
    return {k: torch.cat([v] * copies) for k, v in inputs.items()}


_CACHE_KEYWORDS = frozenset({*CACHE_KEYWORDS, "use_cache", "cache_position"})  # the cache and its flags


def block_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a resumed block needs of the keyword inputs it received: everything but the KV
    cache, under whichever name (``past_key_values`` up to transformers 5.23, ``cache``
    since) or type it came, and the flags that go with it."""
    return {k: v for k, v in kwargs.items() if k not in _CACHE_KEYWORDS and not isinstance(v, Cache)}


class _PrefixCache(DynamicCache):
    """The KV cache of one resumed step: each LM layer's keys and values of the first
    positions of a recorded run (``[rows, kv_head, start, head_dim]``), for ``copies``
    stacked copies of the rows. ``update`` joins them with the new positions' and stores
    nothing (the step is never continued)."""

    def __init__(self, prefix: list[tuple[Tensor, Tensor]], copies: int):
        super().__init__()
        self.prefix, self.copies = prefix, copies

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        keys, values = self.prefix[layer_idx]
        return (
            torch.cat([keys.repeat(self.copies, 1, 1, 1), key_states], dim=-2),
            torch.cat([values.repeat(self.copies, 1, 1, 1), value_states], dim=-2),
        )


class _ResumableRun:
    """One run of a batch that can be resumed at any LM layer: the residual entering each
    block and the keyword inputs each block receives (mask, rotary embeddings, positions;
    they may differ between layers, e.g. Gemma 3's sliding-window and global layers) are
    recorded once; ``logits_from(layer, copies)`` reruns blocks ``layer..`` on ``copies``
    stacked copies, then the final norm and unembedding, with the model's hooks active.

    ``logits_from(..., start=p)`` reruns positions ``p..`` only: a change at positions
    ``>= p`` leaves the earlier ones as they were (causal attention), so their keys and
    values come from the recorded run's KV cache. Available (``suffix``) when the run kept a
    full-length cache for every layer and the block inputs are ones whose positions this
    class knows how to cut (mask, rotary embeddings, position ids); otherwise ``start`` is
    ignored (``suffix_start`` says 0)."""

    def __init__(self, model: HookedMLLM, batch: MultimodalBatch):
        self.bridge = model.bridge
        blocks = self.bridge.blocks
        self.rows, self.length = batch["input_ids"].shape
        self.last = batch.modality_map.last
        self.inputs: list[Tensor] = [None] * len(blocks)  # type: ignore[list-item]
        self.kwargs: list[dict[str, Any]] = [{} for _ in blocks]
        caches: list[tuple[str, Cache]] = []

        def record(layer: int):
            def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
                self.inputs[layer] = args[0].detach()
                self.kwargs[layer] = block_kwargs(kwargs)
                if layer == 0:
                    caches.extend((k, v) for k, v in kwargs.items() if isinstance(v, Cache))
            return pre_hook

        handles = [block.register_forward_pre_hook(record(l), with_kwargs=True) for l, block in enumerate(blocks)]
        try:
            with torch.no_grad():
                self.logits = model(batch)
        finally:
            for handle in handles:
                handle.remove()
        self.prefix: list[tuple[Tensor, Tensor]] | None = None
        self.cache_keyword = caches[0][0] if caches else None
        layers = getattr(caches[0][1], "layers", []) if caches else []
        full = len(layers) == len(blocks) and all(
            getattr(l, "keys", None) is not None and l.keys.dim() == 4 and l.keys.shape[-2] == self.length for l in layers
        )
        if full and all(_suffix_kwargs(k, 1, self.length) is not None for k in self.kwargs):
            self.prefix = [(l.keys, l.values) for l in layers]

    def suffix_start(self, positions: Sequence[Tensor]) -> int:
        """The first position a patch at ``positions`` can change (0 without a suffix path)."""
        firsts = [int(p.min()) for p in positions if p.numel()]
        if self.prefix is None or not firsts:
            return 0
        return max(0, min(min(firsts), int(self.last.min())))

    def _stack(self, value: Any, copies: int) -> Any:
        """Copies along the batch axis; tensors broadcast over the batch (leading 1) stay, and
        so does a one-row run's ``[1, 1, T, T]`` mask (copying it costs more than the
        attention it masks at image lengths, and a plain causal one then stays SDPA's
        ``is_causal``)."""
        if isinstance(value, Tensor):
            if value.dim() == 4 and value.shape[0] == 1:
                return value
            return torch.cat([value] * copies) if value.shape[0] == self.rows else value
        if isinstance(value, tuple):
            return tuple(self._stack(v, copies) for v in value)
        return value

    def logits_from(self, layer: int, copies: int, at: Tensor | None = None, start: int = 0) -> Float[Tensor, "batch pos vocab"]:
        """Logits of the copies, at every position or, with ``at`` ([rows] positions), only
        there (``[batch, 1, vocab]``: the unembedding is most of a resumed run's cost).
        ``start``: rerun positions ``start..`` only (see the class); the hooks then see
        activations of those positions."""
        start = start if self.prefix is not None else 0
        hidden = self._stack(self.inputs[layer][:, start:], copies)
        stacked: dict[int, Any] = {}  # layers mostly share their inputs' objects: stack each once
        cut: dict[int, dict[str, Any]] = {}
        cache = {}
        if start:
            cache = {self.cache_keyword: _PrefixCache([(k[..., :start, :], v[..., :start, :]) for k, v in self.prefix], copies)}
        for block, kwargs in zip(self.bridge.blocks[layer:], self.kwargs[layer:]):
            if start:
                if id(kwargs) not in cut:
                    cut[id(kwargs)] = _suffix_kwargs(kwargs, start, self.length)
                    if "attention_mask" not in cut[id(kwargs)]:
                        cut[id(kwargs)]["attention_mask"] = _causal_suffix_mask(start, self.length, hidden)
                kwargs = cut[id(kwargs)]
            for value in kwargs.values():
                if id(value) not in stacked:
                    stacked[id(value)] = self._stack(value, copies)
            out = block(hidden, **{k: stacked[id(v)] for k, v in kwargs.items()}, **cache)
            hidden = out[0] if isinstance(out, tuple) else out
        if at is not None:
            hidden = hidden[torch.arange(hidden.shape[0]), (at - start).repeat(copies)][:, None]
            return self.bridge.unembed(self.bridge.ln_final(hidden))
        logits = self.bridge.unembed(self.bridge.ln_final(hidden))
        if not start:
            return logits
        return torch.cat([self._stack(self.logits[:, :start], copies), logits], dim=1)  # earlier positions: unchanged


def _causal_suffix_mask(start: int, length: int, like: Tensor) -> Float[Tensor, "1 1 query key"]:
    """Additive causal mask of queries ``start..length-1`` over keys ``0..length-1``."""
    later = torch.arange(length, device=like.device) > torch.arange(start, length, device=like.device)[:, None]
    return torch.zeros(later.shape, dtype=like.dtype, device=like.device).masked_fill_(later, torch.finfo(like.dtype).min)[None, None]


def _suffix_kwargs(kwargs: dict[str, Any], start: int, length: int) -> dict[str, Any] | None:
    """A block's keyword inputs for positions ``start..`` of a ``length``-long run whose
    earlier positions come from a KV cache; ``None`` when an input is not one this knows
    how to cut. The mask keeps its key axis whole; a missing one (plain causal attention) is
    left out, for the caller to give an explicit one (SDPA's ``is_causal`` would align the
    shorter query axis with the first keys)."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "attention_mask":
            if value is None:
                continue
            if not (isinstance(value, Tensor) and value.dim() == 4 and tuple(value.shape[-2:]) == (length, length)):
                return None
            out[key] = value[..., start:, :]
        elif key == "position_embeddings":
            if not (isinstance(value, tuple) and all(isinstance(t, Tensor) and t.dim() >= 2 and t.shape[-2] == length for t in value)):
                return None
            out[key] = tuple(t[..., start:, :] for t in value)
        elif key == "position_ids":
            if value is not None and not (isinstance(value, Tensor) and value.shape[-1] == length):
                return None
            out[key] = None if value is None else value[..., start:]
        elif isinstance(value, (Tensor, tuple, list, dict)):
            return None
        else:
            out[key] = value
    return out


@dataclass
class PatchingResult:
    """``effect[layer, unit]``: normalised metric (0 = corrupted, 1 = clean) with the source
    activation patched into the target run; ``metric`` the raw values."""

    effect: Float[Tensor, "layer unit"]
    metric: Float[Tensor, "layer unit"]
    clean_metric: float
    corrupted_metric: float
    layers: list[int]
    units: list[Unit]
    hook: str
    metric_name: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_grid(self, layer: int, image: int = 0, view: int = 0, grid_shape: tuple[int, int] | None = None) -> Float[Tensor, "rows cols"]:
        """Effects of the grid-cell units of one image and view at ``layer`` (NaN elsewhere)."""
        cells = [(i, u.cell) for i, u in enumerate(self.units) if u.cell is not None and u.cell[:2] == (image, view)]
        if not cells:
            raise ValueError(f"no grid-cell unit for image {image}, view {view}; run the sweep with per='cell'")
        rows = grid_shape[0] if grid_shape else max(c[2] for _, c in cells) + 1
        cols = grid_shape[1] if grid_shape else max(c[3] for _, c in cells) + 1
        grid = torch.full((rows, cols), torch.nan)
        li = self.layers.index(layer)
        for i, cell in cells:
            grid[cell[2], cell[3]] = self.effect[li, i]
        return grid

    def position_values(self, layer: int, shape: tuple[int, int]) -> Float[Tensor, "batch pos"]:
        """Each unit's effect at ``layer`` written at its positions (NaN elsewhere), e.g. for
        ``ModalityMap.to_grid`` or ``visualize.heatmap_for``."""
        values = torch.full(shape, torch.nan)
        li = self.layers.index(layer)
        for i, unit in enumerate(self.units):
            values[:, unit.positions] = self.effect[li, i]
        return values

    def plot(self, ax=None):
        """Heatmap of the normalised effect, layer x unit."""
        figure = new_figure(max(6, 0.25 * len(self.units) + 2), 0.35 * len(self.layers) + 2) if ax is None else ax.figure
        ax = ax or figure.subplots()
        image = ax.imshow(self.effect.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
        ax.set_yticks(range(len(self.layers)), [str(l) for l in self.layers])
        if len(self.units) <= 40:
            ax.set_xticks(range(len(self.units)), [u.label for u in self.units], rotation=90, fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"patching {self.hook}: {self.metric_name} (0 = corrupted, 1 = clean)")
        figure.colorbar(image, ax=ax)
        return figure

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> None:
        """``folder/patching.safetensors``: effects, metrics, units and settings."""
        tensors = {"effect": self.effect, "metric": self.metric} | {f"unit{i}": u.positions for i, u in enumerate(self.units)}
        header = {
            "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric, "layers": self.layers,
            "units": [{"label": u.label, "cell": u.cell} for u in self.units], "hook": self.hook,
            "metric_name": self.metric_name, "metadata": self.metadata,
        }
        save_tensors(Path(folder) / "patching.safetensors", tensors, header, "PatchingResult", overwrite)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PatchingResult":
        tensors, header = load_tensors(Path(folder) / "patching.safetensors", "PatchingResult")
        units = [
            Unit(tensors[f"unit{i}"], u["label"], None if u["cell"] is None else tuple(u["cell"]))
            for i, u in enumerate(header["units"])
        ]
        return cls(tensors["effect"], tensors["metric"], header["clean_metric"], header["corrupted_metric"],
                   header["layers"], units, header["hook"], header["metric_name"], header["metadata"])


def _metric_fn(name: str | Callable, clean_logits: Tensor, corrupted_logits: Tensor, last: Tensor,
               answer: Tensor | None, wrong: Tensor | None, relative: bool = False) -> Callable[[Tensor], Tensor]:
    """``logits [batch, pos, vocab] -> [batch]`` for a named metric at the last positions
    (``relative``: the logits passed in hold only the last positions, ``[batch, 1, vocab]``)."""
    if callable(name):
        return name
    rows = torch.arange(len(last))
    clean_last, corrupted_last = clean_logits[rows, last].float(), corrupted_logits[rows, last].float()
    last = torch.zeros_like(last) if relative else last
    answer = clean_last.argmax(-1) if answer is None else answer
    if wrong is None:
        ranked = corrupted_last.topk(2, dim=-1).indices
        wrong = torch.where(ranked[:, 0] == answer, ranked[:, 1], ranked[:, 0])
    if name == "logit_diff":
        return lambda logits: logits[rows, last, answer].float() - logits[rows, last, wrong].float()
    if name == "prob":
        return lambda logits: logits[rows, last].float().softmax(-1)[rows, answer]
    if name == "kl":
        reference = clean_last.log_softmax(-1)
        # negative KL(clean || patched): rises to 0 as the patched run recovers the clean one
        return lambda logits: -(reference.exp() * (reference - logits[rows, last].float().log_softmax(-1))).sum(-1)
    raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)} or pass a callable")


def _chunks(
    units: Sequence[Unit], size: int, rows_from: Callable[[Sequence[Tensor]], int] | None, length: int
) -> list[tuple[int, list[Unit]]]:
    """Consecutive runs of at most ``size`` units, each with the index of its first unit.
    ``rows_from`` (a resumed run's ``suffix_start``): the stacked copies of a run all rerun
    from its earliest position, so a run also ends before a unit that starts more than 5% of
    the rerun length past it (a sweep over every position keeps full runs; one over every
    128th image token of 2,928 reruns each patch from its own position)."""
    chunks: list[tuple[int, list[Unit]]] = []
    for index, unit in enumerate(units):
        if chunks and len(chunks[-1][1]) < size:
            run = chunks[-1][1]
            if rows_from is None:
                run.append(unit)
                continue
            start = rows_from([u.positions for u in run])
            if rows_from([unit.positions]) - start <= 0.05 * (length - start):
                run.append(unit)
                continue
        chunks.append((index, [unit]))
    return chunks


def patch_sweep(
    model: HookedMLLM,
    clean: MultimodalBatch,
    corrupted: MultimodalBatch,
    *,
    hook: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: str | Sequence[str] | Tensor = "image",
    per: str = "position",
    cell_size: int = 1,
    metric: str | Callable[[Tensor], Tensor] = "logit_diff",
    answer_tokens: Tensor | None = None,
    wrong_tokens: Tensor | None = None,
    source: str = "clean",
    target: str = "corrupted",
    patches_per_forward: int = 8,
    fast: bool = True,
    progress: bool = True,
) -> PatchingResult:
    """Patch ``hook`` (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
    ``mlp_out``, ``mlp_act``) at each layer and unit from the ``source`` run into the
    ``target`` run.

    ``positions``: ``"image"``, ``"text"``, ``"last"``, ``"all"``, names of modalities or a
    bool mask. ``per``: one unit per ``position``, per image grid ``cell`` (``cell_size`` x
    ``cell_size`` patches), or ``all`` chosen positions at once. ``metric`` at the last
    position: ``logit_diff`` (answer minus wrong token; by default the clean run's top token
    and the corrupted run's best other token), ``prob`` (of the answer), ``kl`` (negative
    KL from the clean distribution), or a callable ``logits -> [batch]``; averaged over rows.

    ``fast`` (default): each patched forward starts at the patched layer from the target
    run's cached residual instead of recomputing the vision tower and the layers below, and
    at the patch's first position: earlier positions cannot change (causal attention), so
    their keys and values come from the target run's KV cache (where the model keeps a
    full-length one; Gemma 3's sliding-window layers do not). Patches that start close
    together share a forward (``patches_per_forward`` at most). The first forward checks
    itself against full forwards. ``fast=False`` runs every patch as a full forward, as
    TransformerLens does (same results).
    Attention runs through SDPA unless a hook needs its pattern (``HookedMLLM.fast_attention``).
    """
    # attention through SDPA wherever no hook needs its pattern: at image lengths the eager
    # pattern of every patched copy would dominate time and memory (use_sdpa = False: eager)
    with model.fast_attention():
        plan = _SweepPlan.check(model, clean, corrupted, hook, layers, positions, per, cell_size, source, target)
        runs, layers, units, names, mm = plan.runs, plan.layers, plan.units, plan.names, clean.modality_map
        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(clean, names_filter=names)
            corrupted_logits, corrupted_cache = model.run_with_cache(corrupted, names_filter=names)
        caches = {"clean": clean_cache, "corrupted": corrupted_cache}
        measure = _metric_fn(metric, clean_logits, corrupted_logits, mm.last, answer_tokens, wrong_tokens)
        # named metrics read only the last positions: the fast path unembeds just those
        at_last = fast and not callable(metric)
        measure_last = _metric_fn(metric, clean_logits, corrupted_logits, mm.last, answer_tokens, wrong_tokens, relative=True) if at_last else measure
        clean_value, corrupted_value = float(measure(clean_logits).mean()), float(measure(corrupted_logits).mean())
        _check_recoverable(metric, clean_value, corrupted_value)

        rows = mm.shape[0]
        resume = _ResumableRun(model, runs[target]) if fast else None
        raw = torch.zeros(len(layers), len(units))
        chunks = _chunks(units, patches_per_forward, rows_from=None if resume is None else resume.suffix_start, length=mm.shape[1])
        bar = tqdm(total=len(layers) * len(chunks), desc=f"patching {hook}", disable=not progress, unit="forward")
        for li, name in enumerate(names):
            source_act = caches[source][name]
            for ci, (first_unit, chunk) in enumerate(chunks):
                copies = len(chunk)

                def patch(act: Tensor, hook: Any, chunk=chunk, offset: int = 0) -> Tensor:
                    """``offset``: ``act`` holds positions ``offset..`` (a resumed suffix)."""
                    act = act.clone()
                    for k, unit in enumerate(chunk[: act.shape[0] // rows]):  # a check runs the first copies only
                        act[k * rows : (k + 1) * rows, unit.positions - offset] = source_act[:, unit.positions]
                    return act

                def plain(patch=patch, n=copies) -> Tensor:
                    return model.run_with_hooks(fwd_hooks=[(name, patch)], **_tile(runs[target].inputs, n))

                def fast(patch=patch, layer=layers[li], chunk=chunk) -> Tensor:
                    # positions before the chunk's first patched one are the target run's: rerun the rest
                    start = resume.suffix_start([unit.positions for unit in chunk])
                    with model.hooks(fwd_hooks=[(name, functools.partial(patch, offset=start))]):
                        return resume.logits_from(layer, copies, at=mm.last if at_last else None, start=start)

                with torch.no_grad():
                    if resume is None:
                        logits = plain()
                    elif li == 0 and ci == 0:  # the first forward checks the fast path against the plain one
                        # on its first two copies (stacking included): full forwards of the whole chunk
                        # would cost as much as the naive sweep's first patches at image lengths
                        n = min(2, copies)
                        last = mm.last.repeat(n)
                        expected = plain(n=n)[torch.arange(len(last)), last]
                        view = (lambda fast_logits: fast_logits[: len(last), 0]) if at_last else (lambda fast_logits: fast_logits[torch.arange(len(last)), last])
                        checked_logits = agreeing("patching resume", fast, expected, view)
                        if checked_logits is None:
                            resume = None
                            logits = plain()
                        else:
                            logits = checked_logits
                    else:
                        logits = fast()
                scorer = measure_last if resume is not None else measure
                # a metric may return [rows] or one number: either way one value per patch
                per_copy = torch.stack([torch.as_tensor(scorer(logits[k * rows : (k + 1) * rows])).float().mean() for k in range(copies)])
                raw[li, first_unit : first_unit + copies] = per_copy.cpu()
                bar.update(1)
        bar.close()
        return plan.result(raw, clean_value, corrupted_value, hook, metric)


def attribution_patch(
    model: HookedMLLM,
    clean: MultimodalBatch,
    corrupted: MultimodalBatch,
    *,
    hook: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: str | Sequence[str] | Tensor = "image",
    per: str = "position",
    cell_size: int = 1,
    metric: str | Callable[[Tensor], Tensor] = "logit_diff",
    answer_tokens: Tensor | None = None,
    wrong_tokens: Tensor | None = None,
    source: str = "clean",
    target: str = "corrupted",
) -> PatchingResult:
    """Attribution patching: ``patch_sweep``'s effects estimated to first order, for every
    layer and unit at once from one forward of the source run, one forward of the target run
    and one backward: the metric's change when a unit is patched is taken as
    ``sum over its positions of (source - target activation) . d metric / d activation``.

    Same arguments, hooks, metrics, normalisation (0 = corrupted, 1 = clean) and result type
    as ``patch_sweep``, so the same tables and heatmaps. Exact where the metric is linear in
    the patched activation; elsewhere an estimate to compare with ``patch_sweep`` (see
    ``layer_agreement``), much cheaper for many units.
    """
    plan = _SweepPlan.check(model, clean, corrupted, hook, layers, positions, per, cell_size, source, target)
    runs, layers, units, names, mm = plan.runs, plan.layers, plan.units, plan.names, clean.modality_map
    with torch.no_grad():
        source_logits, source_cache = model.run_with_cache(runs[source], names_filter=names)
    kept: dict[str, Tensor] = {}

    def leaf(embedding: Tensor, hook: Any) -> Tensor:
        return embedding.detach().requires_grad_(True)  # gradients of the LM only, whatever the parameters ask

    def keep(name: str) -> Callable[[Tensor, Any], Tensor]:
        def retain(act: Tensor, hook: Any) -> Tensor:  # hook.name may be the alias' target: key by our name
            act.retain_grad()
            kept[name] = act
            return act
        return retain

    logits = {source: source_logits}
    if target == source:  # the identity: no change anywhere; the metric still needs the other run
        with torch.no_grad():
            other = "corrupted" if source == "clean" else "clean"
            logits[other] = model(runs[other])
    with torch.enable_grad():
        target_logits = model.run_with_hooks(runs[target], fwd_hooks=[("hook_embed", leaf)] + [(n, keep(n)) for n in names])
        logits[target] = target_logits.detach()
        measure = _metric_fn(metric, logits["clean"], logits["corrupted"], mm.last, answer_tokens, wrong_tokens)
        value = torch.as_tensor(measure(target_logits)).float().mean()
        value.backward()
    clean_value = float(torch.as_tensor(measure(logits["clean"])).float().mean())
    corrupted_value = float(torch.as_tensor(measure(logits["corrupted"])).float().mean())
    _check_recoverable(metric, clean_value, corrupted_value)
    raw = torch.zeros(len(layers), len(units))
    for li, name in enumerate(names):
        act = kept[name]
        if act.grad is None:
            raise ValueError(f"the metric does not depend on {name}; nothing flows back to it")
        change = ((source_cache[name].float() - act.detach().float()) * act.grad.float()).flatten(2).sum(-1)  # [batch, pos]
        change = change.sum(0)
        raw[li] = torch.stack([change[u.positions.to(change.device)].sum() for u in units]).cpu() + float(value.detach())
    return plan.result(raw, clean_value, corrupted_value, hook, metric, method="attribution")


def layer_agreement(estimate: PatchingResult, exact: PatchingResult) -> Float[Tensor, "layer"]:
    """Pearson correlation, per layer, of two sweeps' effects over the same units (e.g.
    ``attribution_patch`` against ``patch_sweep``); NaN where either is constant."""
    if estimate.layers != exact.layers or [u.label for u in estimate.units] != [u.label for u in exact.units]:
        raise ValueError("the two results cover different layers or units; run both with the same settings")
    a = estimate.effect - estimate.effect.mean(1, keepdim=True)
    b = exact.effect - exact.effect.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


class FixedInputs:
    """A view of a HookedMLLM for ``transformer_lens.patching``: its ``run_with_hooks`` and
    ``run_with_cache`` take token ids only and add the batch's images and attention mask.

    The token ids passed in must be the batch's own (TL passes the corrupted tokens back).
    A hook carrying cached activations (TL's patching binds the clean cache's with
    ``functools.partial``) is refused, with a ``ValueError`` naming what differs, when they
    do not line up with the batch: another shape, or a cache (of ``model.run_with_cache``)
    whose batch places media or padding elsewhere (``HookedMLLM.check_aligned``).
    """

    def __init__(self, model: HookedMLLM, batch: MultimodalBatch | Mapping[str, Any]):
        if not isinstance(batch, MultimodalBatch):
            batch = MultimodalBatch(dict(batch), model.modality_map(batch))
        self.model, self.batch = model, batch
        self.cfg = model.cfg
        self.training = False

    def _inputs(self, tokens: Tensor) -> dict[str, Tensor]:
        if not torch.equal(tokens.to(self.batch["input_ids"].device), self.batch["input_ids"]):
            raise ValueError("these token ids are not the batch's; build FixedInputs with the batch you patch into")
        return dict(self.batch.inputs)

    def _checked(self, name: str, fn: Callable) -> Callable:
        """``fn``, first checking the cached activations bound to it against what it hooks."""
        bound = [*fn.args, *fn.keywords.values()] if isinstance(fn, functools.partial) else []
        cached = [value for value in bound if isinstance(value, Tensor)]

        def checked(activation: Tensor, hook: Any) -> Any:
            for value in cached:
                self.model.check_aligned(value, self.batch.modality_map, name, activation.shape)
            return fn(activation, hook=hook)

        return checked

    def run_with_hooks(self, tokens: Tensor, fwd_hooks=(), **kwargs: Any) -> Any:
        hooks = [(name, self._checked(name if isinstance(name, str) else "activation", hook)) for name, hook in fwd_hooks]
        return self.model.run_with_hooks(fwd_hooks=hooks, **self._inputs(tokens), **kwargs)

    def run_with_cache(self, tokens: Tensor, **kwargs: Any) -> Any:
        return self.model.run_with_cache(**self._inputs(tokens), **kwargs)

    def __call__(self, tokens: Tensor, **kwargs: Any) -> Any:
        return self.model(**self._inputs(tokens), **kwargs)

    def eval(self) -> "FixedInputs":
        return self


def with_inputs(model: HookedMLLM, batch: MultimodalBatch | Mapping[str, Any]) -> FixedInputs:
    """``model`` with ``batch``'s images bound, for ``transformer_lens.patching`` functions;
    cached activations that do not line up with ``batch`` are refused (see ``FixedInputs``)."""
    return FixedInputs(model, batch)
