"""Attention between modalities: where the query positions look, and what cutting edges does.

``attention_to_modalities`` measures, per layer and head, the share of attention that the
query positions (by default the last position of every row) pay to each modality's keys.
``knockout_hooks`` / ``knocked_out`` cut attention edges query -> key (e.g. last token ->
image tokens) in chosen layers, all heads; ``knockout_effect`` runs a metric with the edges
cut in each single layer (or all at once) next to the clean value.

Both work on the language model's attention, which TransformerLens' bridge recomputes with
``blocks.{l}.attn.hook_attn_scores`` (pre-softmax, causal and padding mask already added) and
``blocks.{l}.attn.hook_pattern`` (post-softmax) in the path, so edits there reach the output.

Decisions:

- Positions (``query``, ``keys``): a modality name of ``ModalityMap`` (``"image"``,
  ``"text"``, ...), ``"last"`` (the last non-padding position of each row), a tuple of them,
  or a bool mask ``[batch, pos]`` of the prompt.
- Shares: per row, the mean over that row's query positions of the attention paid to each
  modality's keys; the overall share is the mean over the rows that have a query position
  (each row weighs the same). Rows without one hold NaN in ``per_row``. Shares over all of
  ``MODALITIES`` sum to 1 per query (padding keys get ~0 from a non-padding query).
- Shares are reduced inside hooks on ``hook_pattern`` (``[batch, head, modality]`` kept per
  layer), not read from ``run_with_cache``: a cached pattern of a LLaVA-NeXT prompt is
  ``layers x heads x pos^2`` floats, tens of GB for a 7B model.
- Edges cut are query -> key pairs the model can attend along: the selected pairs the
  model's own mask leaves open, read from the hooked tensor itself (causal, sliding windows,
  Gemma 3's bidirectional image blocks alike); keys that are padding are never cut, and
  padding queries are never touched.
- ``renormalize=False`` (default): the edges' pattern entries are set to 0 after the softmax
  (``hook_pattern``), the same as removing those keys' value vectors for those queries only;
  the query's other weights are unchanged, so its row sums to less than 1.
  ``renormalize=True``: the edges' scores are set to ``-inf`` before the softmax
  (``hook_attn_scores``), so the query's weight is spread again over its other keys (Geva et
  al. 2023, "Dissecting recall of factual associations"). A query whose every key would be
  cut has nothing to renormalise over (its softmax would be NaN or, with HF's finite mask
  value, spread over masked keys): under ``renormalize=True`` such rows are left unchanged.
- Knockout is for prefill analysis: a hook that sees another batch size or length than the
  map's (a decode step with KV cache, generation without cache) raises ``ValueError``.
- Hooks never change the hooked tensor in place (``masked_fill`` returns a copy), so a cache
  taken by an earlier hook keeps the clean values.
- Plots build a ``matplotlib.figure.Figure`` directly (no pyplot, nothing shown).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from einops import einsum, rearrange, reduce
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mm_lens.base.display import figure_and_axes, text_table
from mm_lens.base.hooks import block_hook, resolve_layers
from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.base.modality import MODALITIES, ModalityMap, position_mask
from mm_lens.model.hooked import HookedMLLM

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "AttentionShare",
    "KnockoutEffect",
    "attention_to_modalities",
    "knocked_out",
    "knockout_effect",
    "knockout_hooks",
]

SHARE_NAME = "attention_share"

# a modality name, "last", a tuple of them, or a bool mask [batch, pos]; the mask is a
# plain Tensor here: position_mask checks its dtype and shape against the batch's map,
# with a message that says what was expected
Positions = str | Sequence[str] | Tensor
HookFn = Callable[[Tensor, Any], Tensor]


# ---- selections ----------------------------------------------------------------------
def _map_of(batch: Any) -> ModalityMap:
    if isinstance(batch, ModalityMap):
        return batch
    if hasattr(batch, "modality_map"):
        return batch.modality_map
    raise ValueError(
        f"got a {type(batch).__name__}; pass a MultimodalBatch (model.prepare_inputs) or its "
        "ModalityMap, so the positions' modalities are known"
    )


def _describe(spec: Positions) -> str:
    if isinstance(spec, Tensor):
        return "mask"
    return spec if isinstance(spec, str) else "+".join(spec)


def _hook_names(model: HookedMLLM, point: str, layers: Sequence[int]) -> list[str]:
    names = [block_hook(layer, point) for layer in layers]
    missing = [name for name in names if name not in model.hook_dict]
    if missing:
        raise ValueError(
            f"the model has no hook {missing[0]}; attention analysis needs TransformerLens' recomputed "
            "attention (hook_attn_scores, hook_pattern)"
        )
    return names


def _check_attention_shape(act: Tensor, shape: tuple[int, int], hook: Any) -> None:
    batch, pos = shape
    if act.shape[0] != batch or tuple(act.shape[-2:]) != (pos, pos):
        name = getattr(hook, "name", None) or "an attention hook"
        raise ValueError(
            f"{name} saw batch {act.shape[0]} with {act.shape[-2]} queries x {act.shape[-1]} keys, but the "
            f"modality map describes {batch} rows of {pos} positions; attention analysis is for prefill: run "
            "the prompt of that map in one forward pass (no generate, no KV cache)"
        )


# ---- attention shares ----------------------------------------------------------------
@dataclass
class AttentionShare:
    """Share of attention the query positions pay to each modality's keys.

    ``shares``: ``[layer, head, modality]``, mean over rows with a query position;
    ``per_row``: ``[batch, layer, head, modality]`` (NaN for rows with none); ``layers``: the
    model layer of each entry; ``n_queries``: query positions per row.
    """

    shares: Float[Tensor, "layer head modality"]
    per_row: Float[Tensor, "batch layer head modality"]
    layers: list[int]
    modalities: list[str]
    n_queries: Int[Tensor, "batch"]
    query: str = "last"
    metadata: dict[str, Any] = field(default_factory=dict)

    def by_layer(self) -> Float[Tensor, "layer modality"]:
        """Head-averaged shares."""
        return reduce(self.shares, "layer head modality -> layer modality", "mean")

    def table(self) -> str:
        """Per layer and modality: the head mean and, in brackets, the lowest and highest head."""
        low = reduce(self.shares, "layer head modality -> layer modality", "min")
        high = reduce(self.shares, "layer head modality -> layer modality", "max")
        header = ["layer", *self.modalities]
        rows = [
            [str(layer), *(f"{m:.3f} [{lo:.3f}-{hi:.3f}]" for m, lo, hi in zip(mean, lows, highs))]
            for layer, mean, lows, highs in zip(self.layers, self.by_layer().tolist(), low.tolist(), high.tolist())
        ]
        title = f"share of attention from {self.query} positions (head mean [min-max over heads])"
        return title + "\n" + text_table(header, rows)

    def plot(self, ax: Axes | None = None) -> Figure:
        """One line per modality over layers (head mean), the heads' min-max range shaded."""
        fig, ax = figure_and_axes(ax)
        low = reduce(self.shares, "layer head modality -> layer modality", "min")
        high = reduce(self.shares, "layer head modality -> layer modality", "max")
        for m, name in enumerate(self.modalities):
            (line,) = ax.plot(self.layers, self.by_layer()[:, m].tolist(), marker="o", label=name)
            ax.fill_between(self.layers, low[:, m].tolist(), high[:, m].tolist(), color=line.get_color(), alpha=0.2)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("attention share")
        ax.set_ylim(0, 1)
        ax.set_title(f"attention from {self.query} positions (shaded: spread over heads)")
        ax.legend()
        return fig

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``path/attention_share.safetensors`` (tensors and settings)."""
        tensors = {"shares": self.shares, "per_row": self.per_row, "n_queries": self.n_queries}
        header = {"layers": self.layers, "modalities": self.modalities, "query": self.query, "metadata": self.metadata}
        save_tensors(Path(path) / f"{SHARE_NAME}.safetensors", tensors, header, "AttentionShare", overwrite)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionShare:
        """Read a folder written by ``save``."""
        file = Path(path) / f"{SHARE_NAME}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found; pass a folder written by AttentionShare.save")
        tensors, header = load_tensors(file, "AttentionShare")
        return cls(tensors["shares"], tensors["per_row"], n_queries=tensors["n_queries"], **header)


def attention_to_modalities(
    model: HookedMLLM,
    batch: Any,
    *,
    query: Positions = "last",
    modalities: Sequence[str] = ("image", "text", "special"),
    layers: int | Sequence[int] | None = None,
) -> AttentionShare:
    """Per layer and head, the share of attention ``query`` positions pay to each modality.

    ``batch``: a ``MultimodalBatch``. ``query``: ``"last"``, a modality name, a tuple of
    them, or a bool mask ``[batch, pos]``. ``layers``: indices (all by default).
    """
    modality_map = _map_of(batch)
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    if not modalities:
        raise ValueError(f"modalities is empty; name some of {', '.join(MODALITIES)}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality(ies) {unknown}; expected any of {', '.join(MODALITIES)}")
    queries = position_mask(modality_map, query, "query position(s)")
    n_queries = queries.sum(dim=1)
    if not bool(n_queries.any()):
        raise ValueError(f"query={_describe(query)!r} selects no position in any row of the batch")
    layers = resolve_layers(layers, model.cfg.n_layers)
    keys = torch.stack([modality_map.mask(m) for m in modalities], dim=-1)  # [batch, pos, modality]
    on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}
    summed: dict[int, Float[Tensor, "batch head modality"]] = {}

    def record(layer: int) -> HookFn:
        def hook(pattern: Float[Tensor, "batch head q k"], hook: Any) -> None:
            _check_attention_shape(pattern, modality_map.shape, hook)
            if pattern.device not in on_device:
                on_device[pattern.device] = (queries.float().to(pattern.device), keys.float().to(pattern.device))
            q_mask, k_mask = on_device[pattern.device]
            attended = einsum(pattern.float(), q_mask, "batch head q k, batch q -> batch head k")
            summed[layer] = einsum(attended, k_mask, "batch head k, batch k modality -> batch head modality").cpu()

        return hook

    names = _hook_names(model, "pattern", layers)
    model.run_with_hooks(batch, fwd_hooks=[(name, record(layer)) for name, layer in zip(names, layers)], return_type=None)
    stacked = torch.stack([summed[layer] for layer in layers], dim=1)  # [batch, layer, head, modality]
    per_row = stacked / rearrange(n_queries.float(), "batch -> batch 1 1 1")
    shares = reduce(per_row[n_queries > 0], "batch layer head modality -> layer head modality", "mean")
    return AttentionShare(shares, per_row, layers, modalities, n_queries, query=_describe(query))


# ---- knockout --------------------------------------------------------------------------
def _edges(modality_map: ModalityMap, query: Positions, keys: Positions) -> Bool[Tensor, "batch q k"]:
    """Query -> key pairs to cut, if the model attends along them: selected, key not padding
    (the model's mask is applied by the hook, see ``_Knockout``)."""
    queries, keyed = position_mask(modality_map, query, "query position(s)"), position_mask(modality_map, keys, "keys position(s)")
    keyed = keyed & ~modality_map.mask("padding")
    return rearrange(queries, "batch q -> batch q 1") & rearrange(keyed, "batch k -> batch 1 k")


class _Knockout:
    """Hook function cutting ``edges`` (``[batch, q, k]``) in every head of a
    ``hook_pattern`` (fill 0; entries the mask closed are 0 already) or ``hook_attn_scores``
    (fill -inf) tensor. On scores, only pairs the model's mask leaves open are cut, and a
    query that would be left with no open key is left whole (nothing to renormalise over)."""

    def __init__(self, edges: Bool[Tensor, "batch q k"], fill: float):
        self.edges, self.fill, self.shape = edges, fill, (edges.shape[0], edges.shape[1])
        self.any = bool(edges.any())
        self._on_device: dict[torch.device, Tensor] = {}

    def __call__(self, act: Float[Tensor, "batch head q k"], hook: Any = None) -> Tensor:
        _check_attention_shape(act, self.shape, hook)
        if not self.any:
            return act
        if act.device not in self._on_device:
            self._on_device[act.device] = rearrange(self.edges.to(act.device), "batch q k -> batch 1 q k")
        cut = self._on_device[act.device]
        if self.fill == float("-inf"):
            open_ = act > torch.finfo(act.dtype).min / 2  # HF masks with -inf or the dtype's minimum
            cut = cut & open_
            cut = cut & (open_ & ~cut).any(dim=-1, keepdim=True)
        return act.masked_fill(cut, self.fill)


def _knockout_pairs(
    model: HookedMLLM, edges: Tensor, layers: Sequence[int], renormalize: bool
) -> list[tuple[str, HookFn]]:
    point, fill = ("attn_scores", float("-inf")) if renormalize else ("pattern", 0.0)
    hook = _Knockout(edges, fill)
    return [(name, hook) for name in _hook_names(model, point, layers)]


def knockout_hooks(
    model: HookedMLLM,
    modality_map: ModalityMap | Any,
    *,
    query: Positions = "last",
    keys: Positions = "image",
    layers: int | Sequence[int] | None = None,
    renormalize: bool = False,
) -> list[tuple[str, HookFn]]:
    """``(hook_name, hook_fn)`` pairs that block attention ``query`` -> ``keys`` in ``layers``
    (all by default), every head.

    ``modality_map``: the map of the batch to run (a ``MultimodalBatch`` is accepted).
    ``query``/``keys``: a modality name, ``"last"``, a tuple of them, or a bool mask
    ``[batch, pos]``. ``renormalize``: cut before the softmax (the query's other keys share
    its weight) instead of after it; see the module docstring.
    """
    modality_map = _map_of(modality_map)
    return _knockout_pairs(model, _edges(modality_map, query, keys), resolve_layers(layers, model.cfg.n_layers), renormalize)


@contextlib.contextmanager
def knocked_out(model: HookedMLLM, modality_map: ModalityMap | Any, **kwargs: Any) -> Iterator[Any]:
    """Block attention edges in every call made inside; keyword arguments as in ``knockout_hooks``."""
    with model.hooks(fwd_hooks=knockout_hooks(model, modality_map, **kwargs)):
        yield model


@dataclass
class KnockoutEffect:
    """A metric clean and with attention edges cut.

    ``clean``: scalar; ``knocked``: ``[layer]`` (edges cut in that layer alone, layers as in
    ``layers``) when ``per_layer``, else a scalar (cut in all of ``layers`` at once).
    """

    clean: Float[Tensor, ""]
    knocked: Float[Tensor, "layer"] | Float[Tensor, ""]
    layers: list[int]
    per_layer: bool = True
    description: str = ""

    @property
    def delta(self) -> Tensor:
        """Knocked minus clean."""
        return self.knocked - self.clean

    def table(self) -> str:
        rows = [["clean", f"{float(self.clean):.4f}", ""]]
        if self.per_layer:
            rows += [[f"layer {l}", f"{v:.4f}", f"{d:+.4f}"] for l, v, d in zip(self.layers, self.knocked.tolist(), self.delta.tolist())]
        else:
            rows.append([f"layers {self.layers}", f"{float(self.knocked):.4f}", f"{float(self.delta):+.4f}"])
        return self.description + "\n" + text_table(["", "metric", "change"], rows)

    def plot(self, ax: Axes | None = None) -> Figure:
        """Per layer: the metric with that layer's edges cut, the clean value as a line
        (all layers at once: two bars)."""
        fig, ax = figure_and_axes(ax)
        if self.per_layer:
            ax.plot(self.layers, self.knocked.tolist(), marker="o", label="knocked out")
            ax.axhline(float(self.clean), color="gray", linestyle="--", label="clean")
            ax.set_xlabel("layer with edges cut")
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
        else:
            ax.bar(["clean", "knocked out"], [float(self.clean), float(self.knocked)], color=["gray", "C0"])
        ax.set_ylabel("metric")
        ax.set_title(self.description or "attention knockout")
        return fig


def _scalar(value: Any) -> Float[Tensor, ""]:
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(
            f"metric returned a tensor of shape {tuple(value.shape)}; pass a callable logits [batch, pos, vocab] "
            "-> scalar (e.g. the mean answer-logit difference)"
        )
    return value.detach().float().cpu().reshape(())


def knockout_effect(
    model: HookedMLLM,
    batch: Any,
    *,
    metric: Callable[[Float[Tensor, "batch pos vocab"]], Tensor],
    query: Positions = "last",
    keys: Positions = "image",
    layers: int | Sequence[int] | None = None,
    per_layer: bool = True,
    renormalize: bool = False,
) -> KnockoutEffect:
    """``metric(logits)`` clean and with ``query`` -> ``keys`` attention cut, in each single
    layer of ``layers`` (``per_layer=True``) or in all of them at once.

    ``batch``: a ``MultimodalBatch``; other arguments as in ``knockout_hooks``.
    """
    modality_map = _map_of(batch)
    edges = _edges(modality_map, query, keys)
    layers = resolve_layers(layers, model.cfg.n_layers)
    clean = _scalar(metric(model(batch)))
    groups = [[layer] for layer in layers] if per_layer else [layers]
    values = [
        _scalar(metric(model.run_with_hooks(batch, fwd_hooks=_knockout_pairs(model, edges, group, renormalize))))
        for group in groups
    ]
    knocked = torch.stack(values) if per_layer else values[0]
    how = "scores -inf, renormalised" if renormalize else "pattern zeroed"
    description = f"{_describe(query)} -> {_describe(keys)} attention cut ({how})"
    return KnockoutEffect(clean, knocked, layers, per_layer, description)


# ---- formatting ------------------------------------------------------------------------
