"""Views of a multimodal batch: circuitsvis components that render offline, and per-patch
heatmaps drawn over the input picture.

**Offline circuitsvis.** ``circuitsvis.utils.render`` returns both a CDN version (an ES-module
``import`` from unpkg) and a local one, and picks between them by pinging google.com. We skip
that: a ``CircuitsView`` holds the React component's name and its props, and writes HTML that
inlines circuitsvis' own bundle (``circuitsvis/dist/cdn/iife.js``, which defines the global
``CircuitsVis``) in a classic ``<script>``, then calls ``CircuitsVis.render(id, component, props)``.
Nothing is fetched; ``HTMLReport`` includes the bundle once for all its views.

**Patch geometry** (where a view's grid lies on the original picture) comes from the
architecture: ``mm_lens.model.architectures.geometry``; ``attribution_heatmaps`` draws a
direct logit attribution on it, one panel per component.
"""

from __future__ import annotations

import html
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor
from transformer_lens import ActivationCache

from mm_lens.analysis.direct_attribution import DirectAttribution
from mm_lens.base.display import figure_and_axes, new_figure
from mm_lens.base.hooks import block_hook
from mm_lens.base.modality import ModalityMap
from mm_lens.model.architectures import geometry
from mm_lens.model.architectures.geometry import Extent
from mm_lens.model.hooked import HookedMLLM


# ---------------------------------------------------------------------------------------
# circuitsvis, offline
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis' browser bundle, safe to inline in a ``<script>`` (defines ``CircuitsVis``)."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise FileNotFoundError(f"circuitsvis' bundle is missing at {path}; reinstall circuitsvis (pip install circuitsvis)")
    source = path.read_text(encoding="utf-8")
    source = "\n".join(line for line in source.splitlines() if not line.startswith("//# sourceMappingURL="))
    return source.replace("</script", "<\\/script")


def bundle_script() -> str:
    """The ``<script>`` element that loads circuitsvis from the inlined bundle."""
    return f"<script>\n{circuitsvis_bundle()}\n</script>"


def _js_value(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _props_json(props: Mapping[str, Any]) -> str:
    """Props as a JS literal that cannot close the surrounding ``<script>``."""
    text = json.dumps({k: _js_value(v) for k, v in props.items() if v is not None})
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


@dataclass
class CircuitsView:
    """A circuitsvis component and its props (tensors stored as lists), rendered without
    network access.

    ``to_html()`` is a self-contained fragment (bundle inlined); ``body_html()`` assumes the
    page already loaded the bundle (``bundle_script()``), as ``HTMLReport`` does.
    """

    component: str
    props: dict[str, Any]
    title: str | None = None
    height: str | None = None
    _id: str = field(default_factory=lambda: "mm-lens-cv-" + uuid.uuid4().hex[:12], repr=False)

    def __post_init__(self) -> None:
        self.props = {k: _js_value(v) for k, v in self.props.items()}  # plain lists, JSON-ready

    def body_html(self) -> str:
        heading = f"<h4>{html.escape(self.title)}</h4>\n" if self.title else ""
        style = "margin: 15px 0;" + (f" min-height: {self.height};" if self.height else "")
        return (
            f'{heading}<div id="{self._id}" style="{style}"></div>\n'
            f"<script>CircuitsVis.render({json.dumps(self._id)}, CircuitsVis.{self.component}, "
            f"{_props_json(self.props)});</script>"
        )

    def to_html(self) -> str:
        """Self-contained HTML fragment: the bundle inlined, then this view."""
        return f"{bundle_script()}\n{self.body_html()}"

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page holding this view."""
        path = Path(path)
        title = html.escape(self.title or self.component)
        path.write_text(
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
            f"<body>\n{self.to_html()}\n</body></html>\n",
            encoding="utf-8",
        )
        return path


# ---------------------------------------------------------------------------------------
# Token labels
# ---------------------------------------------------------------------------------------


def _modality_map(model: HookedMLLM, batch: Any) -> ModalityMap:
    mm = getattr(batch, "modality_map", None)
    return mm if mm is not None else model.modality_map(batch)


def _input_ids(batch: Any) -> Tensor:
    return batch["input_ids"] if not isinstance(batch, Tensor) else batch


def _kept_positions(batch: Any, mm: ModalityMap, row: int) -> Tensor:
    """Positions of batch row ``row`` that are not padding."""
    if not 0 <= row < mm.shape[0]:
        raise IndexError(f"row {row} out of range: the batch has {mm.shape[0]} rows")
    return torch.nonzero(~mm.mask("padding")[row]).flatten()


def token_labels(model: HookedMLLM, batch: Any, row: int = 0) -> list[str]:
    """String tokens of the non-padding positions of ``row``; image tokens by their patch."""
    mm = _modality_map(model, batch)
    positions = _kept_positions(batch, mm, row)
    ids = _input_ids(batch)[row, positions].tolist()
    tokens = model.processor.tokenizer.convert_ids_to_tokens(ids)
    labels = []
    for pos, token in zip(positions.tolist(), tokens):
        labels.append(mm.media_label(row, pos) or str(token))
    return labels


# ---------------------------------------------------------------------------------------
# circuitsvis views of a model on a batch
# ---------------------------------------------------------------------------------------


def attention_view(
    model: HookedMLLM,
    batch: Any,
    layer: int,
    row: int = 0,
    heads: Sequence[int] | None = None,
    *,
    pattern: Float[Tensor, "batch head q k"] | None = None,
) -> CircuitsView:
    """Attention patterns of ``layer`` (all heads, or ``heads``) on one batch row, padding
    removed; image tokens labelled by patch. ``pattern`` skips the forward pass (it must be
    this batch's: see ``HookedMLLM.check_aligned``)."""
    mm = _modality_map(model, batch)
    name = block_hook(layer, "pattern")
    if pattern is None:
        _, cache = model.run_with_cache(batch, names_filter=name)
        pattern = cache[name]
    model.check_aligned(pattern, mm, name, (mm.shape[0], pattern.shape[1], mm.shape[1], mm.shape[1]))
    positions = _kept_positions(batch, mm, row).to(pattern.device)
    heads = list(range(pattern.shape[1])) if heads is None else list(heads)
    attention = pattern[row][heads][:, positions][:, :, positions].float()
    return CircuitsView(
        "AttentionHeads",
        {
            "attention": attention,
            "tokens": token_labels(model, batch, row),
            "attentionHeadNames": [f"L{layer}H{h}" for h in heads],
            "maskUpperTri": True,
        },
        title=f"Attention, layer {layer}, row {row}",
    )


def token_logprobs_view(
    model: HookedMLLM,
    batch: Any,
    row: int = 0,
    top_k: int = 10,
    *,
    logits: Float[Tensor, "batch pos vocab"] | None = None,
) -> CircuitsView:
    """Each token coloured by the log-prob the model gave it; hover shows the top-k guesses."""
    mm = _modality_map(model, batch)
    if logits is None:
        logits = model(batch)
    positions = _kept_positions(batch, mm, row).to(logits.device)
    log_probs = logits[row, positions].float().log_softmax(-1)[:-1]
    ids = _input_ids(batch)[row, positions.cpu()].to(logits.device)
    top_values, top_indices = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
    correct = log_probs.gather(-1, ids[1:, None]).squeeze(-1)
    rank = (log_probs > correct[:, None]).sum(-1)
    to_str = model.processor.tokenizer.convert_ids_to_tokens
    return CircuitsView(
        "TokenLogProbs",
        {
            "prompt": token_labels(model, batch, row),
            "topKLogProbs": top_values,
            "topKTokens": [to_str(r) for r in top_indices.tolist()],
            "correctTokenRank": rank,
            "correctTokenLogProb": correct,
        },
        title=f"Token log-probs, row {row}",
    )


def values_view(
    model: HookedMLLM, batch: Any, values: Float[Tensor, "batch pos"], row: int = 0, title: str | None = None
) -> CircuitsView:
    """Tokens of one row coloured by any per-position quantity (e.g. logit-lens entropy)."""
    mm = _modality_map(model, batch)
    positions = _kept_positions(batch, mm, row)
    return CircuitsView(
        "ColoredTokens",
        {"tokens": token_labels(model, batch, row), "values": values[row, positions.to(values.device)].float()},
        title=title,
    )


def top_k_view(
    model: HookedMLLM,
    batch: Any,
    hooks: str | Sequence[str],
    *,
    neurons: Sequence[int] | None = None,
    k: int = 10,
    rows: Sequence[int] | None = None,
    cache: ActivationCache | Mapping[str, Tensor] | None = None,
) -> CircuitsView:
    """Tables of the top-k and bottom-k tokens of every neuron (channel) of ``hooks``
    (``[batch, pos, neuron]`` activations, one hook per layer), per batch row."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if cache is None:
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in hooks)
    missing = [h for h in hooks if h not in cache]
    if missing:
        raise KeyError(f"no activations for {missing}; pass hook names of [batch, pos, neuron] activations")
    mm = _modality_map(model, batch)
    for h in hooks:
        model.check_aligned(cache[h], mm, h, (*mm.shape, cache[h].shape[-1]))
    rows = list(range(mm.shape[0])) if rows is None else list(rows)
    stacked = torch.stack([cache[h].float().cpu() for h in hooks])  # layer batch pos neuron
    if stacked.ndim != 4:
        raise ValueError(f"hooks must hold [batch, pos, neuron] activations; got shape {tuple(stacked.shape[1:])}")
    if neurons is not None:
        stacked = stacked[..., list(neurons)]
    tokens, tops, top_idx, bottoms, bottom_idx = [], [], [], [], []
    for row in rows:
        positions = _kept_positions(batch, mm, row)
        acts = stacked[:, row][:, positions]  # layer token neuron
        kk = min(k, acts.shape[1])
        values, indices = acts.topk(kk, dim=1)
        low_values, low_indices = acts.topk(kk, dim=1, largest=False)
        tokens.append(token_labels(model, batch, row))
        tops.append(values.tolist())
        top_idx.append(indices.tolist())
        bottoms.append(low_values.flip(1).tolist())
        bottom_idx.append(low_indices.flip(1).tolist())
    return CircuitsView(
        "TopkTokens",
        {
            "tokens": tokens,
            "topkVals": tops,
            "topkIdxs": top_idx,
            "bottomkVals": bottoms,
            "bottomkIdxs": bottom_idx,
            "firstDimensionName": "Layer",
            "thirdDimensionName": "Neuron",
            "sampleLabels": [f"row {r}" for r in rows],
            "firstDimensionLabels": hooks,
        },
        title="Top-k tokens per neuron",
    )


def view_extent(model: HookedMLLM, image_size: tuple[int, int], view: int = 0, padded_square: bool = False) -> Extent:
    """Where a view's grid lies on the original picture of ``image_size`` = (height, width):
    ``(left, right, bottom, top)`` in original pixels (``architectures.geometry.view_extent``
    with this model's spec, config and image processor)."""
    return geometry.view_extent(model.spec, model.hf_model.config, model.processor.image_processor, image_size, view, padded_square)


# ---------------------------------------------------------------------------------------
# Heatmaps over the picture
# ---------------------------------------------------------------------------------------


def patch_heatmap(
    image: Image.Image,
    grid: Float[Tensor, "rows cols"],
    *,
    extent: Extent | None = None,
    ax: Any = None,
    alpha: float = 0.5,
    cmap: str = "viridis",
    title: str | None = None,
    colorbar: bool = True,
    limits: tuple[float, float] | None = None,
    over_picture: bool = True,
) -> Any:
    """Draw a per-patch grid over ``image`` (NaN cells transparent); returns the Figure.

    ``extent`` = (left, right, bottom, top) in the picture's pixels; by default the grid is
    stretched over the whole picture. Use ``heatmap_for`` to place a model's grid correctly.
    ``limits``: the colour scale's (low, high), by default the grid's range.
    ``over_picture=False`` draws the grid alone (opaque) in the picture's frame, to sit
    beside the picture rather than over it.
    """
    from matplotlib.patches import Rectangle

    width, height = image.size
    if extent is None:
        extent = (0.0, float(width), float(height), 0.0)
    fig, ax = figure_and_axes(ax, size=(5, 5 * height / max(width, 1) + 0.3))
    if over_picture:
        ax.imshow(np.asarray(image.convert("RGB")), extent=(0, width, height, 0), interpolation="nearest")
    else:
        alpha = 1.0
        ax.add_patch(Rectangle((0, 0), width, height, fill=False, edgecolor="0.6"))
    values = np.ma.masked_invalid(torch.as_tensor(grid).detach().float().cpu().numpy())
    low, high = limits if limits is not None else (None, None)
    shown = ax.imshow(values, extent=extent, alpha=alpha, cmap=cmap, interpolation="nearest", vmin=low, vmax=high)
    left, right, bottom, top = extent
    ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="white" if over_picture else "0.3", linestyle="--"))
    ax.set_xlim(min(0, left), max(width, right))
    ax.set_ylim(max(height, bottom), min(0, top))
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    return fig


def heatmap_for(
    model: HookedMLLM,
    batch: Any,
    values: Float[Tensor, "batch pos"],
    image_index: int,
    view: int = 0,
    image: Image.Image | None = None,
    **kwargs: Any,
) -> Any:
    """Heatmap of per-position ``values`` for image ``image_index`` of the batch, its view's
    grid placed where the processor took those patches from ``image`` (the original picture).
    Extra keyword arguments go to ``patch_heatmap``."""
    if image is None:
        raise ValueError("pass the original picture as image= (the batch holds only processed pixels)")
    mm = _modality_map(model, batch)
    grid = mm.to_grid(values.detach().cpu(), image_index, view)
    image_size = (image.size[1], image.size[0])
    sizes = batch.get("image_sizes") if isinstance(batch, Mapping) else None
    if sizes is not None and tuple(int(s) for s in sizes[image_index]) != image_size:
        raise ValueError(
            f"image {image_index} of the batch was {tuple(int(s) for s in sizes[image_index])} (height, width) "
            f"but the picture given is {image_size}; pass the picture the batch was built from"
        )
    padded_square = len(mm.grids[image_index]) == 1 and bool(getattr(model.processor.image_processor, "image_grid_pinpoints", None))
    extent = view_extent(model, image_size, view, padded_square=padded_square)
    kwargs.setdefault("title", f"image {image_index}, view {view}")
    return patch_heatmap(image, grid, extent=extent, **kwargs)


def patching_pictures(
    model: HookedMLLM,
    batch: Any,
    values: Float[Tensor, "batch pos"],
    clean_image: Image.Image,
    corrupted_image: Image.Image,
    *,
    image_index: int = 0,
    view: int = 0,
    title: str = "effect per image cell",
    label: str = "effect",
) -> Any:
    """Three panels in a row: the clean picture, the corrupted picture and the per-position
    ``values`` of image ``image_index`` (e.g. ``PatchingResult.position_values``) drawn on
    their own, in the clean picture's frame, on a colour scale centred on zero."""
    fig = new_figure(13, 4.6)
    axes = fig.subplots(1, 3)
    for ax, picture, name in ((axes[0], clean_image, "clean"), (axes[1], corrupted_image, "corrupted")):
        ax.imshow(np.asarray(picture.convert("RGB")), interpolation="nearest")
        ax.set_title(f"{name} picture")
        ax.set_xticks([])
        ax.set_yticks([])
    mm = _modality_map(model, batch)
    grid = mm.to_grid(values.detach().cpu(), image_index, view)
    bound = max(float(np.nanmax(np.abs(grid.numpy()))) if torch.isfinite(grid).any() else 0.0, 1e-2)
    heatmap_for(model, batch, values, image_index, view, image=clean_image, ax=axes[2], cmap="RdBu",
                limits=(-bound, bound), over_picture=False, title=title, colorbar=False)
    shown = axes[2].images[-1]
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04, label=label)
    return fig


def attribution_heatmaps(
    model: HookedMLLM,
    batch: Any,
    attribution: DirectAttribution,
    image: Image.Image,
    image_index: int = 0,
    *,
    components: Sequence[str] | None = None,
    k: int = 4,
    view: int = 0,
    columns: int = 4,
) -> Any:
    """One heatmap over the picture per component of a direct logit attribution: its share
    of the logit difference at each patch of image ``image_index`` (``components``, or the
    ``k`` of largest mean |share| over that image), on one colour scale centred on 0."""
    mm = attribution.modality_map
    on_image = mm.image == image_index
    if not on_image.any():
        raise ValueError(f"image {image_index} is not in the batch ({mm.n_images} media items)")
    labels = list(components) if components is not None else attribution.top(on_image, k)
    limit = max(float(attribution[label][on_image].abs().max()) for label in labels) or 1.0
    rows = -(-len(labels) // columns)
    width, height = image.size
    fig = new_figure(4 * min(columns, len(labels)), 4 * rows * height / max(width, 1) + 0.6)
    axes = fig.subplots(rows, min(columns, len(labels)), squeeze=False).flatten()
    for n, (ax, label) in enumerate(zip(axes, labels)):
        heatmap_for(
            model, batch, attribution[label], image_index, view, image=image, ax=ax, cmap="RdBu",
            limits=(-limit, limit), title=label, colorbar=n == len(labels) - 1,
        )
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    row = int(mm.image_row[image_index])
    fig.suptitle(f"direct logit attribution of {attribution.answer_text[row]!r} - {attribution.wrong_text[row]!r}, image {image_index}")
    return fig
