"""Picture geometry of the image processors: where a view's patch grid lies on the original
picture, for heatmaps drawn over it.

**Patch geometry** (where a grid of ``ModalityMap.to_grid`` lies on the original picture), as
the model's image processor maps pixels:

- LLaVA-1.5 (``CLIPImageProcessor``; ``LlavaImageProcessor`` with ``do_pad`` first pads to a
  square): resize (shortest edge), then center crop to ``crop_size``. The grid covers the
  crop, i.e. a centred box of the original picture (the sides of a wide picture are unseen).
- LLaVA-NeXT view 0 (base): the picture is squashed to ``size`` x ``size`` (no crop, no pad,
  aspect ratio lost), then resized/cropped like a tile. The grid covers the whole picture.
  LLaVA-OneVision's images that share their prompt keep only this view, padded (centred) to
  a square first: the grid then reaches past the picture's shorter sides.
- LLaVA-NeXT view 1 (anyres): the picture is resized into the best pinpoint resolution keeping
  its aspect ratio, padded (centred) to it, and cut into tiles of ``crop_size``; the model then
  drops the feature rows (or columns) that fall in the padding ("unpad"). The kept grid covers
  the whole picture up to a fraction of a cell: its extent is computed exactly and may reach a
  little past the picture's border. Tiles are assumed to be the vision tower's input size (as
  in every released LLaVA-NeXT), so no further resize happens inside a tile.

Architectures whose processor resizes the whole picture to the grid (no crop, no pad;
``ArchitectureSpec.image_geometry == "whole"``) get the whole picture as extent; those whose
items have no grid (``None``) get a clear error.

Extents are matplotlib's ``(left, right, bottom, top)`` in original pixel coordinates
(``x`` right, ``y`` down; pixel ``(x, y)`` spans ``[x, x+1)``).
Extents are matplotlib's ``(left, right, bottom, top)`` in original pixel coordinates
(``x`` right, ``y`` down; pixel ``(x, y)`` spans ``[x, x+1)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mm_lens.model.architectures.spec import ArchitectureSpec
from mm_lens.model.architectures.llava import anyres_grid

Extent = tuple[float, float, float, float]


# ---------------------------------------------------------------------------------------


def _size_field(size: Any, key: str) -> Any:
    if size is None:
        return None
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


def _resized(height: int, width: int, size: Any) -> tuple[int, int]:
    """Output (height, width) of the image processor's ``resize`` for ``size``."""
    from transformers.image_transforms import get_size_with_aspect_ratio

    shortest, longest = _size_field(size, "shortest_edge"), _size_field(size, "longest_edge")
    if shortest and longest:
        return tuple(get_size_with_aspect_ratio((height, width), shortest, longest))  # type: ignore[return-value]
    if shortest:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest, int(shortest * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    h, w = _size_field(size, "height"), _size_field(size, "width")
    if h and w:
        return int(h), int(w)
    raise ValueError(f"cannot tell the resized size from the image processor's size {size!r}")


@dataclass(frozen=True)
class _Frame:
    """Affine map from original pixels to a canvas (``canvas = scale * original + shift``)."""

    height: float
    width: float
    sy: float = 1.0
    sx: float = 1.0
    oy: float = 0.0
    ox: float = 0.0

    def resize(self, height: int, width: int) -> _Frame:
        ry, rx = height / self.height, width / self.width
        return _Frame(height, width, self.sy * ry, self.sx * rx, self.oy * ry, self.ox * rx)

    def move(self, dy: float, dx: float, height: int, width: int) -> _Frame:
        """Place the canvas at offset (dy, dx) on a new canvas (padding > 0, cropping < 0)."""
        return _Frame(height, width, self.sy, self.sx, self.oy + dy, self.ox + dx)

    def center_crop(self, height: int, width: int) -> _Frame:
        def offset(old: float, new: int) -> int:  # as HF's center_crop (pads when too small)
            return -((int(old) - new) // 2) if old >= new else math.ceil((new - old) / 2)

        return self.move(offset(self.height, height), offset(self.width, width), height, width)

    def resize_and_crop(self, processor: Any) -> _Frame:
        frame = self
        if getattr(processor, "do_resize", True):
            frame = frame.resize(*_resized(int(frame.height), int(frame.width), processor.size))
        crop = getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False) and crop is not None:
            frame = frame.center_crop(int(_size_field(crop, "height")), int(_size_field(crop, "width")))
        return frame

    def extent(self, top: float, left: float, bottom: float, right: float) -> Extent:
        """A canvas box as an extent in original pixels."""
        return (
            (left - self.ox) / self.sx,
            (right - self.ox) / self.sx,
            (bottom - self.oy) / self.sy,
            (top - self.oy) / self.sy,
        )


def _patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """Size of an image fitted into ``target`` keeping its aspect ratio (HF's get_patch_output_size)."""
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def view_extent(
    spec: ArchitectureSpec, config: Any, processor: Any, image_size: tuple[int, int], view: int = 0, padded_square: bool = False
) -> Extent:
    """Where a view's grid lies on the original picture of ``image_size`` = (height, width):
    ``(left, right, bottom, top)`` in original pixels (see the module docstring), for a model
    of ``spec`` with ``config`` and its image ``processor``. ``padded_square``: the anyres base
    view of a LLaVA-OneVision image sharing its prompt, which the processor pads to a square
    instead of squashing."""
    height, width = image_size
    if spec.image_geometry is None:
        raise ValueError(f"{spec.hf_class} images have no patch grid (e.g. Q-Former queries); no heatmap over the picture")
    if spec.image_geometry == "whole":
        return (0.0, float(width), float(height), 0.0)
    frame = _Frame(height, width)
    pinpoints = getattr(processor, "image_grid_pinpoints", None)
    if not pinpoints:  # LLaVA-1.5: optional pad to square, resize, center crop
        if view != 0:
            raise ValueError(f"{type(processor).__name__} gives one view per image; view {view} does not exist")
        if getattr(processor, "do_pad", False) and height != width:
            side = max(height, width)
            frame = frame.move((side - height) // 2, (side - width) // 2, side, side)
        frame = frame.resize_and_crop(processor)
        return frame.extent(0, 0, frame.height, frame.width)
    if view == 0:  # LLaVA-NeXT base view: squash (or pad) to a square, then as a tile
        if padded_square and height != width:
            side = max(height, width)
            frame = frame.move((side - height) // 2, (side - width) // 2, side, side)
        size = processor.size
        square = _size_field(size, "shortest_edge")
        base = (square, square) if square else (_size_field(size, "height"), _size_field(size, "width"))
        frame = frame.resize(*base).resize_and_crop(processor)
        return frame.extent(0, 0, frame.height, frame.width)
    if view != 1:
        raise ValueError(f"anyres images have views 0 (base) and 1 (high resolution); view {view} does not exist")
    # the kept (unpadded) part of the tiled grid; a downsized grid (LLaVA-OneVision) is a
    # resize of that same part, so it covers the same box
    grid = anyres_grid(config, image_size)
    tile_px = config.vision_config.image_size
    best_h, best_w = grid.tiles_h * tile_px, grid.tiles_w * tile_px
    new_h, new_w = _patch_output_size(height, width, (best_h, best_w))
    frame = frame.resize(new_h, new_w).move((best_h - new_h) // 2, (best_w - new_w) // 2, best_h, best_w)
    cell = tile_px / grid.side
    return frame.extent(grid.top * cell, grid.left * cell, (grid.top + grid.rows) * cell, (grid.left + grid.cols) * cell)


def cell_extent(extent: Extent, grid_shape: tuple[int, int], row: int, col: int) -> Extent:
    """The extent of one grid cell, in the same coordinates as ``extent``."""
    left, right, bottom, top = extent
    rows, cols = grid_shape
    dx, dy = (right - left) / cols, (bottom - top) / rows
    return (left + col * dx, left + (col + 1) * dx, top + (row + 1) * dy, top + row * dy)


# ---------------------------------------------------------------------------------------
# Tiles and crops on the original picture (for mm_lens.model.regions)
# ---------------------------------------------------------------------------------------


def anyres_tile_extents(config: Any, image_size: tuple[int, int]) -> list[Extent]:
    """Where each high-resolution tile of an anyres image (LLaVA-NeXT, LLaVA-OneVision) lies
    on the original picture of ``image_size`` = (height, width): the tiles row-major, as
    ``ModalityMap`` numbers them (tile ``k + 1`` is entry ``k``). A tile's part in the padding
    the processor adds lies past the picture's border."""
    height, width = image_size
    grid = anyres_grid(config, image_size)
    tile_px = config.vision_config.image_size
    best_h, best_w = grid.tiles_h * tile_px, grid.tiles_w * tile_px
    new_h, new_w = _patch_output_size(height, width, (best_h, best_w))
    frame = _Frame(height, width).resize(new_h, new_w).move((best_h - new_h) // 2, (best_w - new_w) // 2, best_h, best_w)
    return [
        frame.extent(ty * tile_px, tx * tile_px, (ty + 1) * tile_px, (tx + 1) * tile_px)
        for ty in range(grid.tiles_h)
        for tx in range(grid.tiles_w)
    ]


PAN_AND_SCAN_SETTINGS = (
    "do_pan_and_scan",
    "pan_and_scan_min_crop_size",
    "pan_and_scan_max_num_crops",
    "pan_and_scan_min_ratio_to_activate",
)


def pan_and_scan_extents(image_size: tuple[int, int], settings: Mapping[str, Any]) -> list[Extent]:
    """The crops Gemma 3's pan-and-scan cuts from a picture of ``image_size`` = (height,
    width), as its image processor cuts them with ``settings`` (``PAN_AND_SCAN_SETTINGS``):
    none when it is off or the picture is not elongated enough, else 2 or more crops along
    the long side, each clipped to the picture (the processor sends the whole picture first,
    then these crops, each squashed to the tower's size)."""
    height, width = image_size
    if not settings.get("do_pan_and_scan"):
        return []
    min_crop, max_crops = int(settings["pan_and_scan_min_crop_size"]), int(settings["pan_and_scan_max_num_crops"])
    ratio = float(settings["pan_and_scan_min_ratio_to_activate"])
    long, short = max(height, width), min(height, width)
    if long / short < ratio:
        return []
    n = min(max_crops, max(2, min(math.floor(long / min_crop), math.floor(long / short + 0.5))))
    crops_h, crops_w = (1, n) if width >= height else (n, 1)
    crop_h, crop_w = math.ceil(height / crops_h), math.ceil(width / crops_w)
    if min(crop_h, crop_w) < min_crop:
        return []
    return [
        (float(x), float(min(x + crop_w, width)), float(min(y + crop_h, height)), float(y))
        for y in range(0, crop_h * crops_h, crop_h)
        for x in range(0, crop_w * crops_w, crop_w)
    ]


def packed_grid(processor: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of patches Qwen2-VL's image processor cuts a picture of ``image_size`` =
    (height, width) into (its ``smart_resize`` to multiples of ``patch_size * merge_size``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge = int(processor.patch_size), int(processor.merge_size)
    min_pixels, max_pixels = _size_field(processor.size, "shortest_edge"), _size_field(processor.size, "longest_edge")
    height, width = smart_resize(*image_size, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return height // patch, width // patch
