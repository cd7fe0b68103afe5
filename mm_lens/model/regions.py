"""Regions of a picture -> the positions that see them: which image tokens of the language
model, and which rows of the vision encoder, hold patches of a box or a mask drawn on the
original picture.

``region_positions(model, batch, regions)`` takes a box ``(left, top, right, bottom)`` in the
original picture's pixels (pixel ``(x, y)`` spans ``[x, x+1) x [y, y+1)``, so the box
``(0, 0, width, height)`` is the whole picture) or a bool mask of the picture's
``(height, width)``: one for every picture, or one per picture. It returns a
``RegionPositions`` with, for every position of the batch, the share of its patch that the
region covers (``fraction``) and the positions that count (``mask``, ``min_overlap``), and
the same for the rows of the vision encoder (``encoder_fraction``, ``encoder_mask``).

**Overlap.** A patch's ``fraction`` is the area of the region inside the patch's cell over
the area of the cell that shows the picture, both measured in the original picture's pixels
(a mask pixel covers its whole unit square). Cells that show only padding (LLaVA's pad to a
square, anyres' padding) have fraction 0; a patch the region covers whole has fraction 1. A
position counts when its fraction is above 0 and at least ``min_overlap``.

**Where a patch lies** follows each processor (``mm_lens.model.architectures.geometry``):

- LLaVA-1.5: the one grid covers the centre crop of the resized (optionally padded) picture.
- LLaVA-NeXT, LLaVA-OneVision: the base view covers the squashed picture (padded to a
  square first for a OneVision image sharing its prompt); the high-resolution grid covers
  the picture (unpadded; OneVision's downsized grid covers the same box with fewer cells,
  each interpolating its neighbours a little); each encoder tile covers its part of the
  padded, tiled canvas.
- Qwen2-VL, Qwen2.5-VL: the merged 2x2 grid covers the resized picture; the encoder's rows
  are its patches, four per merged token (Qwen2.5-VL: in the window order its vision blocks
  and merger see).
- Idefics3: the global view and the assembled crops each cover the whole (squashed)
  picture; each encoder crop covers its part.
- Gemma 3: the pooled grid covers the squashed picture; with pan-and-scan, each crop (an
  image of its own in the batch) covers its part of the picture. Pass the processor
  arguments the batch was built with (``processor_kwargs``): the batch does not record them.
- InstructBLIP (Q-Former queries) and audio models have no spatial positions: a clear error.

**Encoder rows.** ``encoder_fraction`` is ``[unit, row]``: the leading axes of the vision
encoder's hooks for batched towers (``[crops, tokens, d]``, CLIP's class token first, with
fraction 0), and the packed rows of Qwen's tower split into its units, four patches each
(``encoder_mask.flatten()`` indexes its ``[patches, d]`` hooks, ``encoder_mask.any(-1)`` its
merger's ``[tokens, d]``). Qwen2.5-VL's vision blocks and merger see the units in window
order, as ``encoder_fraction`` holds them; its patch embedding comes before that
permutation. Units are the image items' encoder units in the order the tower runs them
(``ModalityMap.tile_rows("image")``); videos and audio clips of the batch are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from PIL import Image
from torch import Tensor

from mm_lens.base.display import new_figure, text_table
from mm_lens.base.modality import ModalityMap
from mm_lens.model.architectures import geometry
from mm_lens.model.architectures.gemma3 import GEMMA3
from mm_lens.model.architectures.geometry import Extent
from mm_lens.model.architectures.idefics3 import IDEFICS3
from mm_lens.model.architectures.llava import LLAVA, LLAVA_NEXT, patch_grid
from mm_lens.model.architectures.llava_onevision import LLAVA_ONEVISION
from mm_lens.model.architectures.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from mm_lens.model.hooked import HookedMLLM

__all__ = ["Grid", "PictureItem", "RegionPositions", "cell_fractions", "region_positions"]

# a box (left, top, right, bottom) in the original picture's pixels, or a bool mask of its
# (height, width): a plain Tensor, as region_positions checks a mask's dtype and shape itself
Region = Sequence[float] | Tensor
PictureSize = tuple[int, int]


# ---------------------------------------------------------------------------------------
# Cells on the picture and the share of each a region covers (tensors only)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A grid of ``shape`` = (rows, cols) equal cells over ``extent`` = (left, right,
    bottom, top) of the original picture (``geometry``'s extents), row-major."""

    extent: Extent
    shape: tuple[int, int]

    def cell(self, row: int, col: int) -> Grid:
        """One cell as a grid of its own shape ``(1, 1)``."""
        return Grid(geometry.cell_extent(self.extent, self.shape, row, col), (1, 1))

    def split(self, rows: int, cols: int) -> list[Grid]:
        """The ``rows x cols`` equal parts of this grid's box (row-major), each with this grid's shape."""
        return [Grid(geometry.cell_extent(self.extent, (rows, cols), r, c), self.shape) for r in range(rows) for c in range(cols)]

    def edges(self) -> tuple[Float[Tensor, "rows_1"], Float[Tensor, "cols_1"]]:
        """Top-to-bottom y and left-to-right x edges of the cells, in original pixels."""
        left, right, bottom, top = self.extent
        rows, cols = self.shape
        return (
            top + (bottom - top) * torch.arange(rows + 1, dtype=torch.float64) / rows,
            left + (right - left) * torch.arange(cols + 1, dtype=torch.float64) / cols,
        )


def _overlap(edges: Float[Tensor, "n_1"], low: Float[Tensor, "m"], high: Float[Tensor, "m"]) -> Float[Tensor, "n m"]:
    """Length of each cell interval ``[edges[i], edges[i+1]]`` inside each ``[low[j], high[j]]``."""
    start = torch.maximum(rearrange(edges[:-1], "n -> n 1"), rearrange(low, "m -> 1 m"))
    end = torch.minimum(rearrange(edges[1:], "n -> n 1"), rearrange(high, "m -> 1 m"))
    return (end - start).clamp(min=0)


def _span(edges: Float[Tensor, "n_1"], low: float, high: float) -> Float[Tensor, "n"]:
    """Length of each cell interval inside ``[low, high]``."""
    return _overlap(edges, torch.tensor([float(low)], dtype=torch.float64), torch.tensor([float(high)], dtype=torch.float64))[:, 0]


def cell_fractions(region: Region, size: PictureSize, grid: Grid) -> Float[Tensor, "rows cols"]:
    """Share of each cell of ``grid`` that ``region`` covers, of the cell's part that shows
    the picture of ``size`` = (height, width); 0 for a cell outside the picture."""
    height, width = size
    ys, xs = grid.edges()
    seen_y, seen_x = _span(ys, 0, height), _span(xs, 0, width)
    if isinstance(region, Tensor):
        pixels_y, pixels_x = torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64)
        in_y, in_x = _overlap(ys, pixels_y, pixels_y + 1), _overlap(xs, pixels_x, pixels_x + 1)
        covered = einsum(in_y, region.to(torch.float64), in_x, "rows y, y x, cols x -> rows cols")
    else:
        left, top, right, bottom = (float(v) for v in region)
        covered = einsum(_span(ys, top, bottom), _span(xs, left, right), "rows, cols -> rows cols")
    seen = einsum(seen_y, seen_x, "rows, cols -> rows cols")
    return torch.where(seen > 0, covered / seen.clamp(min=1e-12), 0.0).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------


_TOLERANCE = 1e-6  # a fraction within rounding of min_overlap counts


@dataclass(frozen=True)
class RegionPositions:
    """The positions of a batch whose patches overlap a region of each picture.

    ``fraction`` ``[batch, pos]``: share of each position's patch that the region covers (0
    at text, special, padding and newline positions); ``cells`` ``[batch, pos, 4]``: each
    image position's patch as ``(left, top, right, bottom)`` in its original picture's pixels
    (NaN elsewhere). ``encoder_fraction`` ``[unit, row]``: the same for the encoder's rows
    (see the module docstring), ``unit_image`` / ``unit_tile`` the media item and the
    ``ModalityMap`` tile of each unit. ``item_picture[i]``: the picture media item ``i`` shows
    (-1 for videos and audio). ``regions``: each picture's region as given (a box tuple or a
    mask), ``picture_sizes`` its (height, width). Positions count when their fraction is above
    0 and at least ``min_overlap``.
    """

    fraction: Float[Tensor, "batch pos"]
    cells: Float[Tensor, "batch pos 4"]
    encoder_fraction: Float[Tensor, "unit row"]
    unit_image: Int[Tensor, "unit"]
    unit_tile: Int[Tensor, "unit"]
    item_picture: Int[Tensor, "item"]
    regions: tuple[Any, ...]
    picture_sizes: tuple[PictureSize, ...]
    min_overlap: float
    modality_map: ModalityMap

    @property
    def mask(self) -> Bool[Tensor, "batch pos"]:
        """The positions that count, as a ``[batch, pos]`` bool mask: pass it as ``positions=``
        to ``logit_lens``, ``patch_sweep``, ``direct_logit_attribution`` or ``position_mask``."""
        return _counted(self.fraction, self.min_overlap)

    @property
    def encoder_mask(self) -> Bool[Tensor, "unit row"]:
        """The encoder rows that count, ``[unit, row]``."""
        return _counted(self.encoder_fraction, self.min_overlap)

    def positions(self, row: int) -> Int[Tensor, "n"]:
        """The positions of batch row ``row`` that count, in order."""
        if not 0 <= row < self.fraction.shape[0]:
            raise IndexError(f"row {row} out of range: the batch has {self.fraction.shape[0]} rows")
        return torch.nonzero(self.mask[row]).flatten()

    def encoder_rows(self, image: int) -> Int[Tensor, "n 2"]:
        """``(unit, row)`` of the encoder rows of media item ``image`` that count: index a
        ``[unit, row, d]`` encoder activation with ``act[rows[:, 0], rows[:, 1]]``."""
        if not 0 <= image < len(self.item_picture):
            raise IndexError(f"image {image} out of range: the batch holds {len(self.item_picture)} media items")
        return torch.nonzero(self.encoder_mask & rearrange(self.unit_image == image, "unit -> unit 1"))

    def with_min_overlap(self, min_overlap: float) -> RegionPositions:
        """The same fractions with another threshold."""
        return RegionPositions(**{**self.__dict__, "min_overlap": _checked_min_overlap(min_overlap)})

    def table(self) -> str:
        """One line per position that counts: batch row, position, media item, tile, cell
        (row, col) and fraction."""
        mm, rows = self.modality_map, []
        for b, p in torch.nonzero(self.mask).tolist():
            cell = f"({int(mm.row[b, p])}, {int(mm.col[b, p])})"
            rows.append((b, p, int(mm.image[b, p]), int(mm.tile[b, p]), cell, f"{float(self.fraction[b, p]):.3f}"))
        return text_table(("row", "pos", "image", "tile", "cell", "fraction"), rows)

    def plot(self, picture: int = 0, image: Image.Image | None = None, *, columns: int = 3) -> Any:
        """The region (white) and the cells of picture ``picture``'s items over ``image`` (its
        original picture; a grey canvas if None): one panel per media item and view, each
        cell outlined, the cells that count filled by their fraction. Returns the Figure."""
        import numpy as np
        from matplotlib.patches import Rectangle

        if not 0 <= picture < len(self.picture_sizes):
            raise IndexError(f"picture {picture} out of range: the batch holds {len(self.picture_sizes)} pictures")
        height, width = self.picture_sizes[picture]
        if image is not None and (image.size[1], image.size[0]) != (height, width):
            raise ValueError(f"picture {picture} is {(height, width)} (height, width) but the image given is {(image.size[1], image.size[0])}")
        mm, mask = self.modality_map, self.mask
        panels = []
        for item in torch.nonzero(self.item_picture == picture).flatten().tolist():
            row, positions = mm.image_positions(item)
            positions = positions[~torch.isnan(self.cells[row, positions, 0])]
            views = (mm.tile[row, positions] >= 1).long()
            for view in sorted(set(views.tolist())):
                panels.append((item, view, row, positions[views == view]))
        n_cols = min(columns, len(panels))
        n_rows = -(-len(panels) // n_cols)
        fig = new_figure(3.2 * n_cols, 3.2 * n_rows * height / max(width, 1) + 0.5)
        axes = fig.subplots(n_rows, n_cols, squeeze=False).flatten()
        canvas = np.asarray(image.convert("RGB")) if image is not None else np.full((height, width, 3), 200, dtype=np.uint8)
        region = self.regions[picture]
        for ax, (item, view, row, positions) in zip(axes, panels):
            ax.imshow(canvas, extent=(0, width, height, 0), interpolation="nearest")
            for p in positions.tolist():
                left, top, right, bottom = self.cells[row, p].tolist()
                chosen = bool(mask[row, p])
                ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="black", linewidth=0.4, alpha=0.6))
                if chosen:
                    share = float(self.fraction[row, p])
                    ax.add_patch(Rectangle((left, top), right - left, bottom - top, color="tab:orange", alpha=0.25 + 0.5 * share))
            if isinstance(region, Tensor):
                centres_x, centres_y = np.arange(width) + 0.5, np.arange(height) + 0.5
                ax.contour(centres_x, centres_y, region.float().numpy(), levels=[0.5], colors="white", linewidths=1.5)
            else:
                left, top, right, bottom = region
                ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="white", linewidth=1.5))
            cells = self.cells[row, positions]
            ax.set_xlim(min(0.0, float(cells[:, 0].min())), max(float(width), float(cells[:, 2].max())))
            ax.set_ylim(max(float(height), float(cells[:, 3].max())), min(0.0, float(cells[:, 1].min())))
            ax.set_title(f"image {item}, view {view}: {int(mask[row, positions].sum())} of {len(positions)} cells", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        return fig


def _counted(fraction: Tensor, min_overlap: float) -> Tensor:
    return (fraction > 0) & (fraction >= min_overlap - _TOLERANCE)


def _checked_min_overlap(min_overlap: float) -> float:
    if not 0.0 <= float(min_overlap) <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1] (a share of a patch's area), got {min_overlap!r}")
    return float(min_overlap)


# ---------------------------------------------------------------------------------------
# Where each item's patches lie, per architecture
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PictureItem:
    """Where one media item's patches lie on its picture: ``views`` the language model's
    grid of each of its views (as ``ModalityMap.grids``: view 0 holds tile 0, view 1 the tiles
    1 and up), ``units`` the patch grid of each of its encoder units in the encoder's order
    (one cell per encoder row, row-major, after the rows with no place such as CLIP's class
    token), ``unit_tiles`` their ``ModalityMap`` tiles."""

    picture: int
    views: tuple[Grid, ...]
    units: tuple[Grid, ...]
    unit_tiles: tuple[int, ...]


@dataclass(frozen=True)
class _Context:
    """What the per-architecture placements read: the model, the batch, its map, the
    pictures' sizes and the processor arguments the batch was built with."""

    model: HookedMLLM
    batch: Mapping[str, Any]
    mm: ModalityMap
    sizes: tuple[PictureSize, ...]
    processor_kwargs: Mapping[str, Any]

    @property
    def config(self) -> Any:
        return self.model.hf_model.config

    @property
    def image_processor(self) -> Any:
        return self.model.processor.image_processor


def _whole(size: PictureSize) -> Extent:
    height, width = size
    return (0.0, float(width), float(height), 0.0)


def _llava_items(ctx: _Context, images: Sequence[int]) -> list[PictureItem]:
    """LLaVA-1.5 and the anyres LLaVA-NeXT / LLaVA-OneVision: the base view, then (anyres,
    an image alone in its prompt) the high-resolution grid, one encoder unit per view/tile."""
    spec, config, processor = ctx.model.spec, ctx.config, ctx.image_processor
    side, items = patch_grid(config), []
    for picture, item in enumerate(images):
        size, grids = ctx.sizes[picture], ctx.mm.grids[item]
        # a OneVision image sharing its prompt keeps only its base view, padded to a square
        padded_square = len(grids) == 1 and bool(getattr(processor, "image_grid_pinpoints", None))
        base = Grid(geometry.view_extent(spec, config, processor, size, 0, padded_square=padded_square), grids[0])
        views, units = [base], [Grid(base.extent, (side, side))]
        if len(grids) > 1:
            views.append(Grid(geometry.view_extent(spec, config, processor, size, 1), grids[1]))
            units += [Grid(extent, (side, side)) for extent in geometry.anyres_tile_extents(config, size)]
        items.append(PictureItem(picture, tuple(views), tuple(units), tuple(range(len(units)))))
    return items


def _qwen_items(ctx: _Context, images: Sequence[int]) -> list[PictureItem]:
    """Qwen2-VL: the merged grid over the resized picture; one encoder unit per merged token
    (its 2x2 patches); Qwen2.5-VL's vision blocks see the units in window order."""
    merge, items = ctx.config.vision_config.spatial_merge_size, []
    grid_thw = torch.as_tensor(ctx.batch["image_grid_thw"]).cpu()
    for picture, item in enumerate(images):
        expected = geometry.packed_grid(ctx.image_processor, ctx.sizes[picture])
        if tuple(grid_thw[picture, 1:].tolist()) != expected:
            raise ValueError(
                f"image {item} of the batch is a grid of {tuple(grid_thw[picture, 1:].tolist())} patches but a picture "
                f"of {ctx.sizes[picture]} (height, width) gives {expected}; pass the pictures the batch was built from"
            )
        view = Grid(_whole(ctx.sizes[picture]), ctx.mm.grids[item][0])
        units = [Grid(view.cell(r, c).extent, (merge, merge)) for r in range(view.shape[0]) for c in range(view.shape[1])]
        items.append(PictureItem(picture, (view,), tuple(units), (0,) * len(units)))
    return items


def _qwen_window_order(ctx: _Context) -> Int[Tensor, "unit"] | None:
    """Qwen2.5-VL: the merged token each vision-block unit holds (its window order)."""
    if ctx.model.spec.hf_class != QWEN2_5_VL.hf_class:
        return None
    from transformers.vision_utils import get_vision_window_index

    vision = ctx.config.vision_config
    order, _ = get_vision_window_index(
        torch.as_tensor(ctx.batch["image_grid_thw"]).cpu(), vision.spatial_merge_size, vision.window_size, vision.patch_size
    )
    return order.long()


def _idefics3_items(ctx: _Context, images: Sequence[int]) -> list[PictureItem]:
    """Idefics3: the global view (tile 0) and the assembled crops (tiles 1..) each cover the
    whole picture; the encoder runs the crops row by row, then the global view."""
    side = patch_grid(ctx.config)
    items = []
    for picture, item in enumerate(images):
        whole, grids = _whole(ctx.sizes[picture]), ctx.mm.grids[item]
        views = tuple(Grid(whole, grid) for grid in grids)
        crops = []
        if len(grids) > 1:
            rows, cols = (n // grids[0][0] for n in grids[1])
            crops = Grid(whole, (side, side)).split(rows, cols)
        units = (*crops, Grid(whole, (side, side)))
        items.append(PictureItem(picture, views, units, (*range(1, len(crops) + 1), 0)))
    return items


def _gemma3_items(ctx: _Context, images: Sequence[int]) -> list[PictureItem]:
    """Gemma 3: every item is the squashed picture or (pan-and-scan) one of its crops."""
    settings = {**getattr(ctx.model.processor, "images_kwargs", {}), **ctx.processor_kwargs}
    boxes = [[_whole(size), *geometry.pan_and_scan_extents(size, settings)] for size in ctx.sizes]
    if sum(map(len, boxes)) != len(images):
        off = "off" if not settings.get("do_pan_and_scan") else "on with " + ", ".join(
            f"{k}={settings.get(k)}" for k in geometry.PAN_AND_SCAN_SETTINGS[1:]
        )
        raise ValueError(
            f"the batch holds {len(images)} images for {len(ctx.sizes)} pictures, but pan-and-scan {off} gives "
            f"{sum(map(len, boxes))}; pass the processor arguments the batch was built with as processor_kwargs= "
            "(e.g. {'do_pan_and_scan': True, 'pan_and_scan_min_crop_size': ...}) and the pictures it was built from"
        )
    side, grids = patch_grid(ctx.config), ctx.mm.grids
    placed = [(picture, box) for picture, crops in enumerate(boxes) for box in crops]
    return [
        PictureItem(picture, (Grid(box, grids[item][0]),), (Grid(box, (side, side)),), (0,))
        for item, (picture, box) in zip(images, placed)
    ]


_PLACEMENTS: dict[str, Callable[[_Context, Sequence[int]], list[PictureItem]]] = {
    LLAVA.hf_class: _llava_items,
    LLAVA_NEXT.hf_class: _llava_items,
    LLAVA_ONEVISION.hf_class: _llava_items,
    QWEN2_VL.hf_class: _qwen_items,
    QWEN2_5_VL.hf_class: _qwen_items,
    IDEFICS3.hf_class: _idefics3_items,
    GEMMA3.hf_class: _gemma3_items,
}


def _cls_rows(config: Any) -> int:
    """Encoder rows before the patches of each unit: CLIP's class token."""
    return int(getattr(config.vision_config, "model_type", "") == "clip_vision_model")


def _refuse_non_spatial(model: HookedMLLM) -> None:
    spec = model.spec
    if spec.encoder_modality != "image" and "image" not in spec.feature_inputs:
        raise ValueError(
            f"{spec.hf_class} takes {spec.encoder_modality} clips, not pictures: a region of a picture has no "
            "positions in its batches"
        )
    if spec.image_geometry is None:
        raise ValueError(
            f"{spec.hf_class}'s image tokens have no spatial positions: they are learned queries that read the "
            "whole picture through cross-attention (InstructBLIP's Q-Former), so no region of a picture maps to them"
        )
    if spec.hf_class not in _PLACEMENTS:
        raise ValueError(
            f"region_positions does not know where {spec.hf_class} places its patches on the picture; "
            f"supported: {', '.join(sorted(_PLACEMENTS))}"
        )


# ---------------------------------------------------------------------------------------
# Regions, pictures and their sizes
# ---------------------------------------------------------------------------------------


def _is_box(region: Any) -> bool:
    return (
        not isinstance(region, (str, Tensor))
        and isinstance(region, Sequence)
        and len(region) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in region)
    )


def _per_picture(regions: Region | Sequence[Region]) -> list[Any] | None:
    """The regions one per picture, or None for one region for every picture."""
    if isinstance(regions, Tensor) or _is_box(regions):
        return None
    regions = list(regions)
    if not regions:
        raise ValueError("no region given; pass a box (left, top, right, bottom), a bool mask, or one of them per picture")
    for i, region in enumerate(regions):
        if not (isinstance(region, Tensor) or _is_box(region)):
            raise ValueError(
                f"region {i} is {type(region).__name__} {region!r:.60}; give a box (left, top, right, bottom) in the "
                "picture's pixels or a bool tensor mask of the picture's (height, width)"
            )
    return regions


def _picture_sizes(
    images: Sequence[Image.Image | Sequence[int]] | None, regions: list[Any] | None, single: Any, batch: Mapping[str, Any], n_items: int
) -> list[PictureSize]:
    """(height, width) of each picture: from ``images``, else the masks, else the batch's
    ``image_sizes``."""
    if images is not None:
        return [(image.size[1], image.size[0]) if isinstance(image, Image.Image) else (int(image[0]), int(image[1])) for image in images]
    if regions is not None and all(isinstance(r, Tensor) for r in regions):
        return [tuple(r.shape) for r in regions]  # type: ignore[misc]
    if regions is None and isinstance(single, Tensor):
        return [tuple(single.shape)] * n_items  # type: ignore[list-item]
    recorded = batch.get("image_sizes")
    if recorded is not None:
        return [(int(h), int(w)) for h, w in torch.as_tensor(recorded).tolist()]
    raise ValueError(
        "boxes are in the original pictures' pixels and this batch does not record their sizes; pass the pictures "
        "(or their (height, width)) as images="
    )


def _checked_region(region: Any, size: PictureSize, picture: int) -> Any:
    height, width = size
    if isinstance(region, Tensor):
        if region.dtype != torch.bool or region.ndim != 2:
            raise ValueError(f"the mask of picture {picture} is {region.dtype} of shape {tuple(region.shape)}; pass a 2-d bool tensor")
        if tuple(region.shape) != size:
            raise ValueError(
                f"the mask of picture {picture} is {tuple(region.shape)} but the picture is {size} (height, width); "
                "draw the mask on the original picture"
            )
        if not bool(region.any()):
            raise ValueError(f"the mask of picture {picture} selects no pixel; pass a mask with at least one True pixel")
        return region.detach().cpu()
    left, top, right, bottom = (float(v) for v in region)
    if not all(math.isfinite(v) for v in (left, top, right, bottom)) or right <= left or bottom <= top:
        raise ValueError(f"box {tuple(region)} of picture {picture} is empty; give (left, top, right, bottom) with left < right and top < bottom")
    if right <= 0 or bottom <= 0 or left >= width or top >= height:
        raise ValueError(
            f"box {tuple(region)} lies outside picture {picture} of {size} (height, width); give (left, top, right, bottom) "
            "in the original picture's pixels"
        )
    return (left, top, right, bottom)


def region_positions(
    model: HookedMLLM,
    batch: Mapping[str, Any],
    regions: Region | Sequence[Region],
    *,
    images: Sequence[Image.Image | Sequence[int]] | None = None,
    min_overlap: float = 0.0,
    processor_kwargs: Mapping[str, Any] | None = None,
) -> RegionPositions:
    """The positions of ``batch`` (a ``MultimodalBatch``) whose patches overlap ``regions``.

    ``regions``: a box ``(left, top, right, bottom)`` in the original picture's pixels or a
    bool mask of its ``(height, width)``, for every picture, or a list of them, one per
    picture (the batch's pictures in order, prompt after prompt). ``images``: the original
    pictures (or their ``(height, width)``), one per picture: needed for boxes unless the
    batch records the sizes (LLaVA-NeXT, LLaVA-OneVision) or the masks give them. A position
    counts when the region covers more than 0 and at least ``min_overlap`` of its patch.
    ``processor_kwargs``: the extra processor arguments the batch was built with (Gemma 3's
    pan-and-scan settings). See the module docstring for each architecture's geometry.

    The sizes are checked where the batch tells them (LLaVA-NeXT's and LLaVA-OneVision's
    ``image_sizes``, Qwen's patch grids, Gemma 3's crop counts); LLaVA-1.5, Idefics3 and
    Gemma 3 without crops cannot tell: pass the pictures the batch was built from.
    """
    min_overlap = _checked_min_overlap(min_overlap)
    _refuse_non_spatial(model)
    mm = batch.modality_map if hasattr(batch, "modality_map") else model.modality_map(batch)
    image_items = mm.items("image").tolist()
    if not image_items:
        raise ValueError(f"the batch holds no image ({mm.summary()}); build it with pictures")
    per_picture = _per_picture(regions)
    sizes = _picture_sizes(images, per_picture, regions, batch, len(image_items))
    n_pictures = len(sizes)
    if n_pictures != len(image_items) and model.spec.hf_class != GEMMA3.hf_class:
        raise ValueError(f"the batch holds {len(image_items)} pictures but {n_pictures} were described (images= or masks); pass one per picture")
    recorded = batch.get("image_sizes")
    if recorded is not None:
        recorded_sizes = [(int(h), int(w)) for h, w in torch.as_tensor(recorded).tolist()]
        if recorded_sizes != list(sizes):
            raise ValueError(
                f"the batch was built from pictures of {recorded_sizes} (height, width) but the pictures described "
                f"(images= or masks) are {list(sizes)}; pass the pictures the batch was built from"
            )
    if per_picture is not None and len(per_picture) != n_pictures:
        raise ValueError(f"{len(per_picture)} regions for {n_pictures} pictures; pass one region per picture, or a single region for all")
    chosen = [_checked_region(per_picture[p] if per_picture is not None else regions, sizes[p], p) for p in range(n_pictures)]

    ctx = _Context(model, batch, mm, tuple(sizes), dict(processor_kwargs or {}))
    items = _PLACEMENTS[model.spec.hf_class](ctx, image_items)
    cls_rows = _cls_rows(ctx.config)

    fraction = torch.zeros(mm.shape, dtype=torch.float64)
    cells = torch.full((*mm.shape, 4), float("nan"), dtype=torch.float64)
    item_picture = torch.full((mm.n_images,), -1, dtype=torch.long)
    unit_fractions, unit_image, unit_tile = [], [], []
    for item, placed in zip(image_items, items):
        if int(mm.image_tiles[item]) != len(placed.units):
            raise ValueError(
                f"image {item} takes {int(mm.image_tiles[item])} encoder units but its picture's geometry gives "
                f"{len(placed.units)}; build the batch with the model's processor and pass the pictures it was built from"
            )
        region, size = chosen[placed.picture], sizes[placed.picture]
        item_picture[item] = placed.picture
        row, positions = mm.image_positions(item)
        tiles, rows, cols = mm.tile[row, positions], mm.row[row, positions], mm.col[row, positions]
        spatial = (tiles >= 0) & (rows >= 0) & (cols >= 0)
        for view, grid in enumerate(placed.views):
            here = spatial & ((tiles == 0) if view == 0 else (tiles >= 1))
            at, r, c = positions[here], rows[here], cols[here]
            fraction[row, at] = cell_fractions(region, size, grid)[r, c]
            ys, xs = grid.edges()
            cells[row, at] = torch.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], dim=-1)
        for unit, tile in zip(placed.units, placed.unit_tiles):
            unit_fractions.append(torch.cat([torch.zeros(cls_rows, dtype=torch.float64), cell_fractions(region, size, unit).flatten()]))
            unit_image.append(item)
            unit_tile.append(tile)
    encoder = torch.stack(unit_fractions)
    unit_image_t, unit_tile_t = torch.tensor(unit_image), torch.tensor(unit_tile)
    order = _qwen_window_order(ctx)
    if order is not None:
        encoder, unit_image_t, unit_tile_t = encoder[order], unit_image_t[order], unit_tile_t[order]
    return RegionPositions(
        fraction=fraction.float(),
        cells=cells.float(),
        encoder_fraction=encoder.float(),
        unit_image=unit_image_t,
        unit_tile=unit_tile_t,
        item_picture=item_picture,
        regions=tuple(chosen),
        picture_sizes=tuple(sizes),
        min_overlap=min_overlap,
        modality_map=mm,
    )
