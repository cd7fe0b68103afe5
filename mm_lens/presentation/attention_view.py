"""The multimodal attention view: one prompt's language-model attention, drawn over its
pictures, in a self-contained HTML page (plain JS and CSS, nothing fetched).

Pick a layer and a head (or the mean of the layer's heads). Hover a text token: its
attention to every patch is painted on the picture(s) where each patch comes from (anyres
base view and high-resolution grid side by side, tiles outlined), and its attention to the
other tokens colours them. Hover a patch on a picture: its attention to the text tokens
colours them. "attended by" turns the question around (which queries read the hovered
position). A click pins the selection.

**Geometry in Python.** Every patch position becomes a rectangle in the original picture's
pixels (``model.architectures.geometry`` through ``visualize.view_extent``), so the page
only fills rectangles and tests which rectangle is under the pointer. Positions with no place
on a picture (image newlines, Q-Former queries, audio frames, videos) are tokens in the
token strip; an architecture with no patch grid (InstructBLIP, Qwen2-Audio) gets
token-to-token attention only, and the page says so.

**What is stored.** The view keeps, per (layer, head) and per layer's mean of heads, the rows
of every token query (attention to all positions) and the rows of every patch query over the
token keys: patch-to-patch attention, by far the largest block, is left out. Each row is
scaled by its maximum (float32) and quantised to 8 bits (an error of at most 1/510 of the
row's maximum), the whole compressed with zlib and base64-encoded; the browser inflates it
with its built-in ``DecompressionStream``. Pictures are embedded once each as base64 PNG.
A LLaVA-NeXT prompt (one 672 x 672 picture: 2,928 image positions, 19 text tokens) stores
about 0.4 MB per head before compression and 100 to 175 kB in the page, some 5 MB per layer
of 32 heads: ``max_megabytes`` refuses larger pages (pass fewer ``layers``/``heads``); see
docs/attention-view.md for the measured sizes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from PIL import Image
from torch import Tensor

from mm_lens.base.hooks import block_hook
from mm_lens.base.modality import MODALITIES, ModalityMap
from mm_lens.model.architectures.geometry import cell_extent
from mm_lens.model.hooked import HookedMLLM
from mm_lens.presentation.visualize import view_extent

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in a picture's pixels


# ---------------------------------------------------------------------------------------
# The stored attention: token rows in full, patch rows over the token keys
# ---------------------------------------------------------------------------------------


def pack_blocks(
    token_rows: Float[Tensor, "token k"], picture_rows: Float[Tensor, "patch token"], on_picture: Bool[Tensor, "k"]
) -> bytes:
    """One head's attention as the page stores it, zlib-compressed: the rows' maxima
    (float32, one per query in position order), then ``token_rows`` (the token queries,
    ``~on_picture``, over all keys), then ``picture_rows`` (the patch queries over the token
    keys), each row quantised to 8 bits of its maximum."""
    on_picture = on_picture.cpu().numpy()
    blocks = [rows.detach().float().cpu().numpy().clip(min=0.0) for rows in (token_rows, picture_rows)]
    scale = np.zeros(on_picture.shape[0], dtype="<f4")
    quantised = []
    for block, rows in zip(blocks, (~on_picture, on_picture)):
        if block.size:
            scale[rows] = block.max(-1)
        factor = 255 / np.where(scale[rows] > 0, scale[rows], 1.0)
        quantised.append(np.rint(block * factor[:, None]).clip(0, 255).astype(np.uint8).tobytes())
    return zlib.compress(scale.tobytes() + b"".join(quantised), 6)


def pack_pattern(pattern: Float[Tensor, "q k"], on_picture: Bool[Tensor, "k"]) -> bytes:
    """``pack_blocks`` of a whole ``[query, key]`` pattern: what the page keeps of it."""
    tokens = ~on_picture.to(pattern.device)
    return pack_blocks(pattern[tokens], pattern[~tokens][:, tokens], on_picture)


def unpack_pattern(blob: bytes, on_picture: Bool[Tensor, "k"]) -> Float[Tensor, "q k"]:
    """The attention ``pack_pattern`` stored, NaN where nothing is stored (patch queries to
    patch keys): what the page shows."""
    raw = zlib.decompress(blob)
    n = int(on_picture.shape[0])
    tokens = ~on_picture.cpu()
    m = int(tokens.sum())
    scale = torch.from_numpy(np.frombuffer(raw[: 4 * n], dtype="<f4").copy())
    values = torch.from_numpy(np.frombuffer(raw[4 * n :], dtype=np.uint8).copy()).float() / 255
    out = torch.full((n, n), float("nan"))
    out[tokens] = values[: m * n].reshape(m, n)
    picture_rows = values[m * n :].reshape(n - m, m)
    out[torch.nonzero(~tokens).flatten()[:, None], torch.nonzero(tokens).flatten()[None, :]] = picture_rows
    return out * scale[:, None]


# ---------------------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------------------


@dataclass
class Panel:
    """One view of one picture: its grid's cells as rectangles in the picture's pixels.

    ``image``: the media item's index in the batch (``ModalityMap.image``); ``picture``:
    index into ``AttentionView.pictures``; ``frame``: the part of the plane the
    canvas shows (the picture and the grid's extent, which may reach past it); ``scale``:
    canvas pixels per picture pixel; ``cells``: ``(position index, box)`` for every patch;
    ``tiles``: the box of each high-resolution tile (anyres) or crop.
    """

    title: str
    image: int
    picture: int
    frame: Box
    scale: float
    extent: Box | None
    cells: list[tuple[int, Box]]
    tiles: list[Box] = field(default_factory=list)

    def canvas_point(self, box: Box) -> tuple[float, float]:
        """Centre of a box, in canvas pixels (CSS pixels of the page)."""
        return ((box[0] + box[2]) / 2 - self.frame[0]) * self.scale, ((box[1] + box[3]) / 2 - self.frame[1]) * self.scale


@dataclass
class AttentionView:
    """The attention of one prompt, ready for the page: ``to_html()`` (a fragment, also
    ``_repr_html_`` for Jupyter), ``save(path)`` (a standalone page); ``HTMLReport.add_view``
    takes it. ``labels``: one per kept (non-padding) position, ``positions`` their batch
    positions; ``on_picture``: which of them are drawn as patches, ``runs`` the strip's
    stand-ins for them (first, last, label); ``blobs``: (layer, head or
    ``"mean"``) -> ``pack_pattern`` bytes; ``pattern(layer, head)`` reads one back."""

    title: str
    layers: list[int]
    heads: list[int]
    n_heads: int
    labels: list[str]
    kinds: list[str]
    positions: list[int]
    on_picture: list[bool]
    runs: list[tuple[int, int, str]]
    pictures: list[bytes]
    picture_sizes: list[tuple[int, int]]
    panels: list[Panel]
    blobs: dict[tuple[int, int | str], bytes]
    notes: list[str] = field(default_factory=list)
    _id: str = field(default_factory=lambda: "mm-lens-av-" + uuid.uuid4().hex[:12], repr=False)

    def pattern(self, layer: int, head: int | str = "mean") -> Float[Tensor, "q k"]:
        """The stored attention of ``layer`` and ``head`` (or ``"mean"``) over the kept
        positions, NaN for patch-to-patch pairs (not stored)."""
        if (layer, head) not in self.blobs:
            raise KeyError(f"the view holds layers {self.layers} and heads {self.heads} (and 'mean'); not ({layer}, {head!r})")
        return unpack_pattern(self.blobs[(layer, head)], torch.tensor(self.on_picture, dtype=torch.bool))

    def _data(self) -> dict[str, Any]:
        return {
            "id": self._id,
            "title": self.title,
            "layers": self.layers,
            "heads": self.heads,
            "nHeads": self.n_heads,
            "labels": self.labels,
            "kinds": self.kinds,
            "positions": self.positions,
            "onPicture": [int(p) for p in self.on_picture],
            "runs": [list(run) for run in self.runs],
            "pictures": ["data:image/png;base64," + base64.b64encode(png).decode("ascii") for png in self.pictures],
            "pictureSizes": [list(size) for size in self.picture_sizes],
            "panels": [
                {
                    "title": p.title,
                    "image": p.image,
                    "picture": p.picture,
                    "frame": [round(v, 3) for v in p.frame],
                    "scale": p.scale,
                    "extent": None if p.extent is None else [round(v, 3) for v in p.extent],
                    "cells": [[i, *(round(v, 3) for v in box)] for i, box in p.cells],
                    "tiles": [[round(v, 3) for v in box] for box in p.tiles],
                }
                for p in self.panels
            ],
            "blobs": {f"{layer}:{head}": base64.b64encode(blob).decode("ascii") for (layer, head), blob in self.blobs.items()},
            "notes": self.notes,
        }

    def to_html(self) -> str:
        """A self-contained fragment: style, markup, data and script of this view."""
        data = json.dumps(self._data(), separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")
        return (
            f'<div class="mmav" id="{self._id}"><style>{_CSS}</style>'
            f"<div class=\"mmav-title\">{html.escape(self.title)}</div>"
            f'<noscript>This attention view needs JavaScript.</noscript></div>\n'
            f'<script type="application/json" id="{self._id}-data">{data}</script>\n'
            f"<script>({_JS})({json.dumps(self._id)});</script>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page holding this view (no remote references)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title></head>\n'
            f'<body style="margin: 1em">\n{self.to_html()}\n</body></html>\n',
            encoding="utf-8",
        )
        return path


# ---------------------------------------------------------------------------------------
# Building it from a model and a batch
# ---------------------------------------------------------------------------------------


def _token_text(token: str) -> str:
    return token.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\u21b5").replace("\n", "\u21b5")


def _labels(model: HookedMLLM, batch: Mapping[str, Any], mm: ModalityMap, row: int, kept: Tensor) -> list[str]:
    """A label per kept position: the token, or where a media position comes from
    (``<img 0:hi r2c5>``, ``<img 0:nl>``, ``<query 0:3>``, ``<audio 0:12>``, ``<video 1:40>``)."""
    ids = batch["input_ids"][row, kept.to(batch["input_ids"].device)].tolist()
    tokens = model.processor.tokenizer.convert_ids_to_tokens(ids)
    labels = []
    for pos, token in zip(kept.tolist(), tokens):
        item = int(mm.image[row, pos])
        if item < 0:
            labels.append(_token_text(str(token)))
            continue
        kind = MODALITIES[int(mm.modality[row, pos])]
        r, c, tile = int(mm.row[row, pos]), int(mm.col[row, pos]), int(mm.tile[row, pos])
        if kind == "image" and bool(mm.newline[row, pos]):
            labels.append(f"<img {item}:nl>")
        elif kind == "image" and r >= 0 and c >= 0:
            labels.append(f"<img {item}:{'hi ' if tile >= 1 else ''}r{r}c{c}>")
        elif kind == "image" and mm.grids[item]:
            labels.append(f"<img {item}:cls>")
        else:
            first = int(mm.feature[row, mm.image[row] == item].min())
            labels.append(f"<{'query' if kind == 'image' else kind} {item}:{int(mm.feature[row, pos]) - first}>")
    return labels


def _kinds(mm: ModalityMap, row: int, kept: Tensor, drawn: Mapping[int, str]) -> list[str]:
    """The strip's class of each kept position: ``patch`` (drawn on a picture), ``newline``
    (an image-newline token), ``media`` (another media position), ``special`` or ``text``."""
    kinds = []
    for i, pos in enumerate(kept.tolist()):
        kind = MODALITIES[int(mm.modality[row, pos])]
        if i in drawn:
            kinds.append("patch")
        elif int(mm.image[row, pos]) >= 0:
            kinds.append("newline" if bool(mm.newline[row, pos]) else "media")
        else:
            kinds.append("special" if kind == "special" else "text")
    return kinds


def _png(picture: Image.Image, longest: int) -> bytes:
    picture = picture.convert("RGB")
    if max(picture.size) > longest:
        factor = longest / max(picture.size)
        picture = picture.resize((max(1, round(picture.size[0] * factor)), max(1, round(picture.size[1] * factor))), Image.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _as_box(extent: tuple[float, float, float, float]) -> Box:
    left, right, bottom, top = extent
    return (float(left), float(top), float(right), float(bottom))


def _view_title(item: int, view: int, n_views: int, grid: tuple[int, int], n_tiles: int) -> str:
    patches = f"{grid[0]}x{grid[1]} patches"
    if n_views == 1:
        return f"image {item} ({patches})"
    if view == 0:
        return f"image {item}: base view ({patches})"
    return f"image {item}: high-resolution view ({patches}, {n_tiles} tile{'s' if n_tiles != 1 else ''})"


def _panels(
    model: HookedMLLM,
    batch: Mapping[str, Any],
    mm: ModalityMap,
    row: int,
    kept: Tensor,
    items: list[int],
    pictures: list[Image.Image],
    panel_px: int,
) -> tuple[list[Panel], dict[int, str]]:
    """One panel per view of each picture, and the kept positions they draw (index -> the
    view's name, for the token strip)."""
    index = {int(p): i for i, p in enumerate(kept.tolist())}
    drawn: dict[int, str] = {}
    sizes = batch.get("image_sizes")
    panels = []
    for n, (item, picture) in enumerate(zip(items, pictures)):
        width, height = picture.size
        if sizes is not None and tuple(int(s) for s in sizes[item]) != (height, width):
            raise ValueError(
                f"image {item} of the batch was {tuple(int(s) for s in sizes[item])} (height, width) but the picture "
                f"given is {(height, width)}; pass the pictures the batch was built from, in prompt order"
            )
        grids = mm.grids[item]
        if model.spec.image_geometry is None or not grids:
            whole = (0.0, 0.0, float(width), float(height))
            panels.append(Panel(f"image {item} (no patch grid)", item, n, whole, panel_px / max(width, height), None, []))
            continue
        _, positions = mm.image_positions(item)
        padded_square = len(grids) == 1 and bool(getattr(model.processor.image_processor, "image_grid_pinpoints", None))
        for view, grid in enumerate(grids):
            extent = _as_box(view_extent(model, (height, width), view, padded_square=padded_square))
            tiles_of = mm.tile[row, positions]
            on_grid = (mm.row[row, positions] >= 0) & (mm.col[row, positions] >= 0)
            in_view = positions[((tiles_of == 0) if view == 0 else (tiles_of >= 1)) & on_grid]
            cells, tiles = [], {}
            for pos in in_view.tolist():
                r, c = int(mm.row[row, pos]), int(mm.col[row, pos])
                box = _as_box(cell_extent((extent[0], extent[2], extent[3], extent[1]), grid, r, c))
                cells.append((index[pos], box))
                drawn[index[pos]] = f"image {item}" + ("" if len(grids) == 1 else ", base view" if view == 0 else ", high-res")
                if view > 0:
                    t = int(mm.tile[row, pos])
                    old = tiles.get(t, box)
                    tiles[t] = (min(old[0], box[0]), min(old[1], box[1]), max(old[2], box[2]), max(old[3], box[3]))
            frame = (min(0.0, extent[0]), min(0.0, extent[1]), max(float(width), extent[2]), max(float(height), extent[3]))
            scale = panel_px / max(frame[2] - frame[0], frame[3] - frame[1])
            outlines = list(tiles.values()) if len(tiles) > 1 else []
            panels.append(Panel(_view_title(item, view, len(grids), grid, len(tiles)), item, n, frame, scale, extent, cells, outlines))
    return panels, drawn


def _runs(drawn: Mapping[int, str], newlines: set[int]) -> list[tuple[int, int, str]]:
    """The token strip's stand-ins for the drawn positions: one per run of one view's
    positions, a run going on over that image's newline tokens (shown after it): (first,
    last, label)."""
    runs: list[tuple[int, int, str, int]] = []  # first, last, view name, patches
    for i in sorted(drawn):
        if runs and runs[-1][2] == drawn[i] and all(j in newlines for j in range(runs[-1][1] + 1, i)):
            runs[-1] = (runs[-1][0], i, drawn[i], runs[-1][3] + 1)
        else:
            runs.append((i, i, drawn[i], 1))
    return [(first, last, f"{count} patch{'es' if count > 1 else ''}: {name}") for first, last, name, count in runs]


def _notes(model: HookedMLLM, mm: ModalityMap, row: int, items: list[int], others: list[int]) -> list[str]:
    notes = []
    name = model.spec.hf_class
    for item in others:
        kind = mm.item_modality[item] if mm.item_modality else "image"
        count = int((mm.image[row] == item).sum())
        if kind == "audio":
            notes.append(
                f"Audio clip {item} enters the language model as {count} frame tokens with no place on a picture: "
                f"token-to-token attention only (the <audio {item}:k> tokens)."
            )
        elif kind == "video":
            notes.append(f"Video {item} is shown as its {count} tokens (<video {item}:k>), not over its frames.")
        else:
            notes.append(
                f"{name} gives image {item} to the language model as {count} query tokens with no place on the picture: "
                f"token-to-token attention only (the <query {item}:k> tokens)."
            )
    if items:
        notes.append("Patch-to-patch attention is not stored: hovering a patch colours the tokens, not the picture.")
    return notes


def attention_view(
    model: HookedMLLM,
    batch: Mapping[str, Any],
    images: Sequence[Image.Image] | Image.Image | None = None,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    row: int = 0,
    panel_px: int = 320,
    max_megabytes: float = 64.0,
    title: str | None = None,
) -> AttentionView:
    """The multimodal attention view of batch row ``row``: one forward pass reads
    ``blocks.{layer}.attn.hook_pattern`` of ``layers`` (default all) and keeps ``heads``
    (default all) and the mean of all heads. ``images``: the pictures of that row, in prompt
    order, as given to ``prepare_inputs`` (the batch holds only processed pixels); they may be
    left out only where no image has a patch grid. Hooks attached around the call (``with
    model.hooks(...)``, e.g. ``knockout_hooks``) are in force. ``panel_px``: the longest side
    of each picture on the page; ``max_megabytes``: refuse a larger page (pass fewer layers
    or heads)."""
    mm = batch.modality_map if hasattr(batch, "modality_map") else model.modality_map(batch)
    if not 0 <= row < mm.shape[0]:
        raise IndexError(f"row {row} out of range: the batch has {mm.shape[0]} rows")
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    heads = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    if not layers or any(not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"layers must name at least one of the model's layers 0..{n_layers - 1}; got {layers}")
    if any(not 0 <= h < n_heads for h in heads):
        raise ValueError(f"heads must be among the model's heads 0..{n_heads - 1}; got {heads}")

    kept = torch.nonzero(~mm.mask("padding")[row]).flatten()
    row_items = [i for i in range(mm.n_images) if int(mm.image_row[i]) == row]
    kinds = mm.item_modality or ("image",) * mm.n_images
    image_items = [i for i in row_items if kinds[i] == "image"]
    spatial = model.spec.image_geometry is not None
    pictures = [images] if isinstance(images, Image.Image) else list(images or [])
    if images is None and spatial and any(mm.grids[i] for i in image_items):
        raise ValueError(
            f"row {row} holds {len(image_items)} image(s) with a patch grid; pass the pictures the batch was built from "
            "as images=[...] (one per image of the row, in prompt order): the batch holds only processed pixels"
        )
    if pictures and len(pictures) != len(image_items):
        raise ValueError(
            f"row {row} holds {len(image_items)} image(s) but {len(pictures)} picture(s) were given; pass one per image, in prompt order"
        )
    panels, drawn_positions = _panels(model, batch, mm, row, kept, image_items, pictures, panel_px)
    on_picture = torch.zeros(len(kept), dtype=torch.bool)
    on_picture[list(drawn_positions)] = True
    drawn = [i for i in image_items if spatial and mm.grids[i]] if pictures else []
    others = [i for i in row_items if i not in drawn]

    blobs: dict[tuple[int, int | str], bytes] = {}
    token_positions, picture_positions = kept[~on_picture], kept[on_picture]

    def keep(pattern: Tensor, hook: Any) -> None:  # only the stored blocks leave the device
        layer = int(hook.name.split(".")[1])
        device = pattern.device
        token_rows = pattern[row][:, token_positions.to(device)][:, :, kept.to(device)].detach().float()
        picture_rows = pattern[row][:, picture_positions.to(device)][:, :, token_positions.to(device)].detach().float()
        for h in heads:
            blobs[(layer, h)] = pack_blocks(token_rows[h], picture_rows[h], on_picture)
        blobs[(layer, "mean")] = pack_blocks(token_rows.mean(0), picture_rows.mean(0), on_picture)
        megabytes = sum(len(blob) for blob in blobs.values()) * 4 / 3 / 2**20
        if megabytes > max_megabytes:  # stop the forward pass here
            raise ValueError(
                f"the view of {len(layers)} layer(s) x {len(heads)} head(s) (+ mean) passes max_megabytes={max_megabytes:g} "
                f"at layer {layer} ({megabytes:.2f} MB of attention so far); pass fewer layers= or heads= "
                f"(e.g. layers=[{layers[len(layers) // 2]}]) or raise max_megabytes"
            )

    kinds = _kinds(mm, row, kept, drawn_positions)
    with torch.no_grad():
        model.run_with_hooks(batch, fwd_hooks=[(block_hook(layer, "attn.hook_pattern"), keep) for layer in layers], return_type=None)
    missing = [layer for layer in layers if (layer, "mean") not in blobs]
    if missing:
        raise RuntimeError(
            f"blocks.<layer>.attn.hook_pattern did not fire for layers {missing}; this model's attention hides its pattern"
        )
    return AttentionView(
        title=title or f"{model.spec.hf_class}: attention of row {row}",
        layers=layers,
        heads=heads,
        n_heads=n_heads,
        labels=_labels(model, batch, mm, row, kept),
        kinds=kinds,
        positions=kept.tolist(),
        on_picture=on_picture.tolist(),
        runs=_runs(drawn_positions, {i for i, kind in enumerate(kinds) if kind == "newline"}),
        pictures=[_png(p, 2 * panel_px) for p in pictures],
        picture_sizes=[p.size for p in pictures],
        panels=panels,
        blobs=blobs,
        notes=_notes(model, mm, row, drawn, others),
    )


# ---------------------------------------------------------------------------------------
# The page: plain CSS and JS, scoped to one view's root element
# ---------------------------------------------------------------------------------------

_CSS = """
.mmav { font-family: system-ui, sans-serif; font-size: 13px; color: #222; margin: 12px 0; }
.mmav-title { font-weight: 600; margin-bottom: 6px; }
.mmav-controls { display: flex; flex-wrap: wrap; gap: 14px; align-items: center; margin-bottom: 8px; }
.mmav-controls select { font-size: 13px; }
.mmav-note { background: #fff6d5; border-left: 3px solid #e0b000; padding: 4px 8px; margin: 4px 0; }
.mmav-panels { display: flex; flex-wrap: wrap; gap: 14px; margin: 8px 0; }
.mmav-panel { margin: 0; }
.mmav-panel canvas { display: block; cursor: crosshair; border: 1px solid #ccc; }
.mmav-panel figcaption { font-size: 12px; color: #555; margin-top: 3px; }
.mmav-strip { line-height: 2.0; max-height: 18em; overflow: auto; border: 1px solid #ddd; padding: 4px 6px; }
.mmav-tok { padding: 1px 2px; border-radius: 3px; cursor: pointer; white-space: pre; border: 1px solid transparent; }
.mmav-tok.mmav-special, .mmav-tok.mmav-media, .mmav-tok.mmav-newline { color: #666; font-size: 11px; }
.mmav-tok.mmav-newline { padding: 1px 0; }
.mmav-tok.mmav-sel { border-color: #00a0b0; box-shadow: 0 0 0 1px #00a0b0; }
.mmav-run { white-space: nowrap; background: #e8ecf7; color: #445; font-size: 11px; padding: 1px 4px; border-radius: 3px; }
.mmav-info { min-height: 2.6em; margin: 6px 0; color: #333; }
.mmav-legend { display: inline-block; width: 90px; height: 10px; vertical-align: middle;
  background: linear-gradient(to right, rgba(220,30,30,0), rgba(220,30,30,0.9)); border: 1px solid #ccc; }
"""

_JS = r"""
function (id) {
  const root = document.getElementById(id);
  const data = JSON.parse(document.getElementById(id + "-data").textContent);
  const n = data.labels.length;
  const tokenRow = new Int32Array(n).fill(-1), pictureRow = new Int32Array(n).fill(-1);
  let m = 0, s = 0;
  for (let i = 0; i < n; i++) { if (data.onPicture[i]) pictureRow[i] = s++; else tokenRow[i] = m++; }
  const state = { layer: data.layers[0], head: "mean", mode: "query", scale: "zero", selected: -1, pinned: false };
  const cache = new Map();
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const pct = (v) => (100 * v).toFixed(v < 0.001 ? 3 : v < 0.1 ? 2 : 1) + "%";

  // ---- controls, notes, panels, token strip, info ----
  const controls = el("div", "mmav-controls");
  const select = (label, options, onChange) => {
    const wrap = el("label", null, label + " "), box = el("select");
    for (const [value, text] of options) { const o = el("option", null, text); o.value = value; box.appendChild(o); }
    box.addEventListener("change", () => onChange(box.value)); wrap.appendChild(box); controls.appendChild(wrap); return box;
  };
  const layerBox = select("layer", data.layers.map((l) => [String(l), String(l)]), (v) => { state.layer = Number(v); show(); });
  const headBox = select("head", [["mean", "mean of " + data.nHeads + " heads"]].concat(data.heads.map((h) => [String(h), String(h)])),
    (v) => { state.head = v === "mean" ? "mean" : Number(v); show(); });
  const modeBox = select("hovered position", [["query", "attends to"], ["key", "is attended by"]], (v) => { state.mode = v; render(); });
  layerBox.className = "mmav-layer"; headBox.className = "mmav-head"; modeBox.className = "mmav-mode";
  const scaleBox = select("colours", [["zero", "0 to max"], ["range", "min to max"], ["sqrt", "square root, 0 to max"]],
    (v) => { state.scale = v; render(); });
  scaleBox.className = "mmav-scale";
  const legend = el("span");
  legend.append("low ", el("span", "mmav-legend"), " high");
  controls.appendChild(legend);
  root.appendChild(controls);
  for (const note of data.notes) root.appendChild(el("div", "mmav-note", note));

  const pictures = data.pictures.map((src) => { const img = new Image(); img.src = src; return img; });
  const panelsBox = el("div", "mmav-panels"), panels = [];
  data.panels.forEach((p, k) => {
    const fig = el("figure", "mmav-panel"), canvas = el("canvas");
    const w = Math.round((p.frame[2] - p.frame[0]) * p.scale), h = Math.round((p.frame[3] - p.frame[1]) * p.scale);
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    canvas.style.width = w + "px"; canvas.style.height = h + "px"; canvas.dataset.panel = String(k);
    fig.appendChild(canvas); fig.appendChild(el("figcaption", null, p.title)); panelsBox.appendChild(fig);
    const cellAt = (event) => {
      const r = canvas.getBoundingClientRect();
      const x = (event.clientX - r.left - canvas.clientLeft) / p.scale + p.frame[0];
      const y = (event.clientY - r.top - canvas.clientTop) / p.scale + p.frame[1];
      for (const c of p.cells) if (x >= c[1] && x < c[3] && y >= c[2] && y < c[4]) return c[0];
      return -1;
    };
    canvas.addEventListener("mousemove", (e) => hover(cellAt(e)));
    canvas.addEventListener("mouseleave", () => hover(-1));
    canvas.addEventListener("click", (e) => pin(cellAt(e)));
    panels.push({ p, canvas, ctx: canvas.getContext("2d"), dpr });
  });
  if (panels.length) root.appendChild(panelsBox);

  const info = el("div", "mmav-info", "Hover a token or a patch (click to pin).");
  const strip = el("div", "mmav-strip"), tokens = new Map(), runs = new Map(data.runs.map((r) => [r[0], r]));
  for (let i = 0; i < n; i++) {
    if (runs.has(i)) {  // a view's patches, then the image-newline tokens among them
      const [first, last, label] = runs.get(i);
      strip.appendChild(el("span", "mmav-run", "[" + label + "]")); strip.appendChild(document.createTextNode(" "));
      for (let j = first; j <= last; j++) if (!data.onPicture[j]) addToken(j);
      i = last; continue;
    }
    addToken(i);
  }
  function addToken(i) {
    const t = el("span", "mmav-tok mmav-" + data.kinds[i], data.kinds[i] === "newline" ? "\u21b5" : data.labels[i]);
    t.dataset.index = String(i); t.title = data.labels[i] + " (position " + data.positions[i] + ")";
    t.addEventListener("mouseenter", () => hover(i)); t.addEventListener("mouseleave", () => hover(-1));
    t.addEventListener("click", () => pin(i));
    strip.appendChild(t); strip.appendChild(document.createTextNode(data.kinds[i] === "newline" ? "" : " ")); tokens.set(i, t);
  }
  root.appendChild(info); root.appendChild(strip);

  // ---- the stored attention: row maxima, token rows over all keys, patch rows over token keys ----
  async function matrix(layer, head) {
    const key = layer + ":" + head;
    if (!cache.has(key)) {
      const bytes = Uint8Array.from(atob(data.blobs[key]), (c) => c.charCodeAt(0));
      const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
      const buffer = await new Response(stream).arrayBuffer();
      if (cache.size > 48) cache.delete(cache.keys().next().value);
      cache.set(key, { scale: new Float32Array(buffer, 0, n), q: new Uint8Array(buffer, 4 * n) });
    }
    return cache.get(key);
  }
  function value(M, q, k) {
    if (tokenRow[q] >= 0) return M.q[tokenRow[q] * n + k] / 255 * M.scale[q];
    if (tokenRow[k] >= 0) return M.q[m * n + pictureRow[q] * m + tokenRow[k]] / 255 * M.scale[q];
    return NaN;
  }
  function vector(M, i) {
    const v = new Float32Array(n);
    for (let j = 0; j < n; j++) v[j] = state.mode === "query" ? value(M, i, j) : value(M, j, i);
    return v;
  }

  // ---- drawing ----
  let current = null;
  // colour strength in [0, 1] of a value within a region's [lo, hi] (its min and max)
  function heat(a, lo, hi) {
    if (!(a >= 0) || !(hi > 0)) return 0;
    if (state.scale === "range") return hi > lo ? Math.min(Math.max((a - lo) / (hi - lo), 0), 1) : 1;
    const t = Math.min(a / hi, 1);
    return state.scale === "sqrt" ? Math.sqrt(t) : t;
  }
  function draw(panel, v, lo, hi) {
    const { p, canvas, ctx, dpr } = panel, img = pictures[p.picture];
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#f0f0f0"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    const X = (x) => (x - p.frame[0]) * p.scale, Y = (y) => (y - p.frame[1]) * p.scale;
    ctx.imageSmoothingEnabled = p.scale < 2;
    ctx.filter = v ? "grayscale(100%)" : "none";
    const size = data.pictureSizes[p.picture];
    if (img.complete && img.naturalWidth) ctx.drawImage(img, X(0), Y(0), size[0] * p.scale, size[1] * p.scale);
    ctx.filter = "none";
    if (v) for (const c of p.cells) {
      const x = heat(v[c[0]], lo, hi);
      if (!(x > 0)) continue;
      ctx.fillStyle = "rgba(220,30,30," + (0.9 * x).toFixed(4) + ")";
      ctx.fillRect(X(c[1]), Y(c[2]), (c[3] - c[1]) * p.scale, (c[4] - c[2]) * p.scale);
    }
    ctx.setLineDash([4, 3]); ctx.lineWidth = 1; ctx.strokeStyle = "rgba(255,255,255,0.9)";
    for (const b of p.tiles) ctx.strokeRect(X(b[0]) + 0.5, Y(b[1]) + 0.5, (b[2] - b[0]) * p.scale - 1, (b[3] - b[1]) * p.scale - 1);
    ctx.strokeStyle = "rgba(0,0,0,0.6)";
    const e = p.extent;
    if (e) ctx.strokeRect(X(e[0]) + 0.5, Y(e[1]) + 0.5, (e[2] - e[0]) * p.scale - 1, (e[3] - e[1]) * p.scale - 1);
    ctx.setLineDash([]);
    for (const c of p.cells) if (c[0] === state.selected) {
      ctx.lineWidth = 2; ctx.strokeStyle = "#00e0f0";
      ctx.strokeRect(X(c[1]) + 1, Y(c[2]) + 1, (c[3] - c[1]) * p.scale - 2, (c[4] - c[2]) * p.scale - 2);
    }
  }
  function render() {
    const i = state.selected, v = current && i >= 0 ? vector(current, i) : null;
    let tmax = 0, pmax = 0, tmin = Infinity, pmin = Infinity;
    const sums = new Map(), maxes = new Map();
    if (v) for (let j = 0; j < n; j++) {
      if (!(v[j] >= 0)) continue;
      if (data.onPicture[j]) { pmax = Math.max(pmax, v[j]); pmin = Math.min(pmin, v[j]); }
      else { tmax = Math.max(tmax, v[j]); tmin = Math.min(tmin, v[j]); }
    }
    if (v) for (const panel of panels) for (const c of panel.p.cells) {
      const a = v[c[0]], k = panel.p.image;
      if (a >= 0) { sums.set(k, (sums.get(k) || 0) + a); maxes.set(k, Math.max(maxes.get(k) || 0, a)); }
    }
    for (const [j, t] of tokens) {
      const a = v ? v[j] : NaN, x = heat(a, tmin, tmax);
      t.style.background = x > 0 ? "rgba(220,30,30," + (0.9 * x).toFixed(4) + ")" : "";
      t.style.color = x > 0.6 ? "#fff" : "";
      t.classList.toggle("mmav-sel", j === i);
      t.title = data.labels[j] + " (position " + data.positions[j] + ")" + (a >= 0 ? ": " + pct(a) : "");
    }
    for (const panel of panels) draw(panel, v, pmin, pmax);
    if (!v) { info.textContent = i >= 0 ? "loading..." : "Hover a token or a patch (click to pin)."; return; }
    const head = state.head === "mean" ? "mean of heads" : "head " + state.head;
    const verb = state.mode === "query" ? " attends to" : " is attended by";
    let tokenSum = 0; for (const [j] of tokens) if (v[j] >= 0) tokenSum += v[j];
    const parts = ["tokens " + pct(tokenSum) + " (max " + pct(tmax) + ")"];
    for (const [image, sum] of sums) parts.push("image " + image + " " + pct(sum) + " (max patch " + pct(maxes.get(image)) + ")");
    const missing = data.onPicture[i] && panels.length ? "; patch-to-patch attention is not stored" : "";
    info.textContent = "layer " + state.layer + ", " + head + ": " + data.labels[i] + " (position " + data.positions[i] + ")" +
      verb + ": " + parts.join(", ") + (state.mode === "query" ? "" : " (sums over queries)") + missing +
      (state.pinned ? " [pinned: click to release]" : "");
  }
  function hover(i) { if (!state.pinned) { state.selected = i; render(); } }
  function pin(i) {
    if (state.pinned && (i === state.selected || i < 0)) { state.pinned = false; render(); return; }
    if (i >= 0) { state.selected = i; state.pinned = true; render(); }
  }
  async function show() {
    root.dataset.ready = "0";
    const layer = state.layer, head = state.head;
    let M;
    try { M = await matrix(layer, head); } catch (error) {
      info.textContent = "This browser cannot inflate the stored attention (" + error + "); " +
        "open the page in a current Chrome, Firefox or Safari.";
      return;
    }
    if (layer !== state.layer || head !== state.head) return;
    current = M; render(); root.dataset.ready = "1";
  }
  Promise.all(pictures.map((img) => img.decode ? img.decode().catch(() => null) : null)).then(show);
}
"""
