"""Which position of a batch is text, image (which image, tile, patch), video, audio,
special or padding.

A ``ModalityMap`` is built from the token ids of a batch and, for every media item (image,
video or audio clip), an ``ImageLayout`` that says where each of that item's feature tokens
comes from, in the order the HF model writes them into the sequence. All per-position
fields are ``[batch, pos]`` tensors; ``-1`` marks "not applicable".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

MODALITIES: tuple[str, ...] = ("text", "image", "special", "padding", "video", "audio", "generated")
# unions of position kinds: every non-padding position, the last prompt position, MINER's
# special-or-text and every prompt position (not padding, not generated)
POSITION_GROUPS: tuple[str, ...] = ("all", "last", "special_text", "prompt")
POSITIONS: tuple[str, ...] = MODALITIES + POSITION_GROUPS  # the one vocabulary of position names


def modality_code(name: str) -> int:
    """Integer code of a modality name, as stored in ``ModalityMap.modality``."""
    if name not in MODALITIES:
        raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(MODALITIES)}")
    return MODALITIES.index(name)


@dataclass(frozen=True)
class ImageLayout:
    """Origin of each feature token of one media item, in the order HF inserts them.

    ``tile``: 0 for the base view, k >= 1 for high-resolution tile k (anyres, or crop k of a
    split image), the frame group for a video, -1 for an image-newline token.
    ``row``/``col``: cell of the view's patch grid (view 0 = base grid, view 1 = the
    high-resolution grid); -1 for a CLS feature, a newline column, a Q-Former query or an
    audio frame. ``feature``: index into this item's projector output flattened over its
    leading axes; -1 for a newline. ``grids``: (rows, cols) of each view (empty for audio).
    ``n_tiles``: this item's share of the encoder hooks' leading axis, in units: the crops it
    takes (LLaVA), or its merged tokens where the encoder packs all patches into one sequence
    (Qwen2-VL). Encoder hook rows are split between items in proportion to ``n_tiles``.
    ``modality``: ``"image"``, ``"video"`` or ``"audio"``.
    """

    tile: Int[Tensor, "token"]
    row: Int[Tensor, "token"]
    col: Int[Tensor, "token"]
    feature: Int[Tensor, "token"]
    newline: Bool[Tensor, "token"]
    grids: tuple[tuple[int, int], ...]
    n_features: int
    n_tiles: int = 1
    modality: str = "image"

    def __len__(self) -> int:
        return int(self.tile.shape[0])

    @classmethod
    def sequence(cls, n_tokens: int, modality: str = "image") -> "ImageLayout":
        """An item of ``n_tokens`` features in order with no patch grid (Q-Former queries, audio frames)."""
        none = torch.full((n_tokens,), -1, dtype=torch.long)
        return cls(
            tile=torch.zeros(n_tokens, dtype=torch.long),
            row=none,
            col=none.clone(),
            feature=torch.arange(n_tokens),
            newline=torch.zeros(n_tokens, dtype=torch.bool),
            grids=(),
            n_features=n_tokens,
            modality=modality,
        )


@dataclass(frozen=True)
class ModalityMap:
    """Per-position modality and media coordinates of one batch.

    Media items (images, then videos, then audio clips, each kind in prompt order) share one
    index: ``image`` holds it at every feature position. ``feature`` is the row of that
    modality's projector output (flattened over its leading axes) that HF placed at the
    position. ``image_row[i]`` is the batch row holding item ``i``; ``image_tiles[i]`` its
    units of the encoder hooks' leading axis (vision-tower crops for LLaVA, see
    ``ImageLayout``); ``grids[i]`` its views' (rows, cols); ``item_modality[i]`` its kind.
    """

    modality: Int[Tensor, "batch pos"]
    image: Int[Tensor, "batch pos"]
    tile: Int[Tensor, "batch pos"]
    row: Int[Tensor, "batch pos"]
    col: Int[Tensor, "batch pos"]
    feature: Int[Tensor, "batch pos"]
    newline: Bool[Tensor, "batch pos"]
    last: Int[Tensor, "batch"]
    image_row: Int[Tensor, "image"]
    image_tiles: Int[Tensor, "image"]
    grids: tuple[tuple[tuple[int, int], ...], ...]
    item_modality: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.modality.shape)  # type: ignore[return-value]

    @property
    def n_images(self) -> int:
        return int(self.image_row.shape[0])

    def items(self, modality: str) -> Int[Tensor, "item"]:
        """Indices of the media items of one modality (``items("image")``), in encoder order."""
        modality_code(modality)
        return torch.tensor([i for i, m in enumerate(self.item_modality) if m == modality], dtype=torch.long)

    def tile_rows(self, modality: str | None = None) -> Int[Tensor, "tile"]:
        """Batch row of every encoder unit (a vision-tower crop for LLaVA), in the order the
        encoder hooks see them; ``modality`` keeps that modality's items only."""
        items = torch.arange(self.n_images) if modality is None else self.items(modality)
        return torch.repeat_interleave(self.image_row[items], self.image_tiles[items])

    def mask(self, *modalities: str) -> Bool[Tensor, "batch pos"]:
        """Positions whose modality is any of ``modalities`` (``mask("image", "text")``)."""
        if not modalities:
            raise ValueError("name at least one modality, e.g. mask('image')")
        codes = torch.tensor([modality_code(m) for m in modalities])
        return torch.isin(self.modality, codes)

    def media_label(self, row: int, pos: int) -> str | None:
        """Compact label of a media position (``<img 0:r2c5>`` base view, ``<img 0:hi r2c5>``
        high-resolution view, ``<img 0:nl>`` newline, ``<img 0:cls>``, ``<audio 1:7>`` for
        an item without a grid), or None for a text, special or padding position."""
        item = int(self.image[row, pos])
        if item < 0:
            return None
        kind = self.item_modality[item] if item < len(self.item_modality) else "image"
        short = {"image": "img", "video": "vid"}.get(kind, kind)
        if bool(self.newline[row, pos]):
            return f"<{short} {item}:nl>"
        r, c, tile = int(self.row[row, pos]), int(self.col[row, pos]), int(self.tile[row, pos])
        if r < 0 or c < 0:  # a class token of a gridded picture, or a step of a sequence (queries, frames)
            return f"<{short} {item}:cls>" if self.grids[item] else f"<{short} {item}:{int(self.feature[row, pos])}>"
        return f"<{short} {item}:{'hi ' if tile >= 1 else ''}r{r}c{c}>"

    def last_mask(self) -> Bool[Tensor, "batch pos"]:
        """The last non-padding position of every row."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        rows = torch.nonzero(self.last >= 0).flatten()  # an all-padding row has no last position
        mask[rows, self.last[rows]] = True
        return mask

    def image_positions(self, image: int) -> tuple[int, Int[Tensor, "token"]]:
        """Batch row and positions (in feature order) of image ``image``."""
        if not 0 <= image < self.n_images:
            raise IndexError(f"image {image} out of range: the batch holds {self.n_images} images")
        row = int(self.image_row[image])
        return row, torch.nonzero(self.image[row] == image).flatten()

    def to_grid(self, values: Tensor, image: int, view: int = 0) -> Float[Tensor, "rows cols"]:
        """Place per-position ``values`` ``[batch, pos]`` of one image on its patch grid (NaN
        where no token).

        ``view`` 0 is the base view; 1 the high-resolution grid of an anyres image.
        """
        # a plain Tensor parameter: its shape is checked here against the map's, with a message
        if values.shape != self.modality.shape:
            raise ValueError(
                f"values have shape {tuple(values.shape)} but the batch is {self.shape}; "
                "pass one value per position"
            )
        values = values.detach().cpu()
        grids = self.grids[image]
        if not 0 <= view < len(grids):
            raise ValueError(f"image {image} has {len(grids)} view(s); view {view} does not exist")
        row, positions = self.image_positions(image)
        tiles = self.tile[row, positions]
        in_view = (tiles == 0) if view == 0 else (tiles >= 1)
        keep = positions[in_view & (self.row[row, positions] >= 0) & (self.col[row, positions] >= 0)]
        grid = torch.full(grids[view], float("nan"), dtype=torch.float32)
        grid[self.row[row, keep], self.col[row, keep]] = values[row, keep].float()
        return grid

    def summary(self) -> str:
        """One line per batch row: counts of each modality and the last position."""
        lines = []
        for b in range(self.shape[0]):
            counts = ", ".join(
                f"{name}={int((self.modality[b] == code).sum())}"
                for code, name in enumerate(MODALITIES)
                if (self.modality[b] == code).any()
            )
            images = sorted(int(i) for i in self.image[b].unique() if i >= 0)
            lines.append(f"row {b}: {counts}; images {images}; last={int(self.last[b])}")
        return "\n".join(lines)


def position_names(positions: str | Sequence[str], what: str = "positions") -> tuple[str, ...]:
    """The names of a ``positions=`` argument, checked against ``POSITIONS``."""
    names = (positions,) if isinstance(positions, str) else tuple(positions)
    if not names:
        raise ValueError(f"{what} is empty; pass position names ({', '.join(POSITIONS)}) or a [batch, pos] bool mask")
    unknown = [n for n in names if n not in POSITIONS]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; pass position names ({', '.join(POSITIONS)}) or a [batch, pos] bool mask")
    return names


def position_mask(mm: ModalityMap, positions: str | Sequence[str] | Tensor, what: str = "positions") -> Bool[Tensor, "batch pos"]:
    """The positions a ``positions=`` argument selects, as a ``[batch, pos]`` bool mask on the
    CPU: names of ``POSITIONS`` (modalities such as ``"image"``, or the groups ``"all"``,
    ``"last"``, ``"special_text"``, ``"prompt"``; several names are united) or a bool mask of
    the batch's shape."""
    if isinstance(positions, Tensor):
        if positions.dtype != torch.bool or tuple(positions.shape) != mm.shape:
            raise ValueError(
                f"a {what} mask must be a bool tensor of the batch's shape {mm.shape}, got {positions.dtype} {tuple(positions.shape)}"
            )
        return positions.cpu()
    groups = {
        "all": lambda: ~mm.mask("padding"),
        "last": mm.last_mask,
        "special_text": lambda: mm.mask("special", "text"),
        "prompt": lambda: ~mm.mask("padding", "generated"),
    }
    mask = torch.zeros(mm.shape, dtype=torch.bool)
    for name in position_names(positions, what):
        mask |= groups[name]() if name in groups else mm.mask(name)
    return mask


def build_modality_map(
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    token_ids: Mapping[str, int],
    special_token_ids: Sequence[int],
    layouts: Sequence[ImageLayout],
) -> ModalityMap:
    """Assign each modality's feature tokens (``token_ids``: modality -> placeholder token
    id) to that modality's layouts in the order HF scatters features (row-major over the
    batch), and every other position to text, special or padding.

    Raises ``ValueError`` when a modality's token count does not match its layouts, or an
    item's tokens would span two rows.
    """
    input_ids = input_ids.cpu()
    batch, pos = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.cpu()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}; they must match"
        )
    unknown = sorted({layout.modality for layout in layouts} - set(token_ids))
    if unknown:
        raise ValueError(f"layouts of modality {unknown} but no placeholder token for it; known: {sorted(token_ids)}")
    modality = torch.full((batch, pos), modality_code("text"), dtype=torch.int8)
    special = torch.isin(input_ids, torch.tensor(list(special_token_ids), dtype=input_ids.dtype))
    modality[special] = modality_code("special")
    fields = {name: torch.full((batch, pos), -1, dtype=torch.long) for name in ("image", "tile", "row", "col", "feature")}
    newline = torch.zeros((batch, pos), dtype=torch.bool)
    image_row = [-1] * len(layouts)
    for kind, token_id in token_ids.items():
        placed = input_ids == token_id
        indices = [i for i, layout in enumerate(layouts) if layout.modality == kind]
        n_tokens, n_expected = int(placed.sum()), sum(len(layouts[i]) for i in indices)
        if n_tokens != n_expected:
            raise ValueError(
                f"input_ids hold {n_tokens} {kind} tokens but the {len(indices)} {kind}(s) give "
                f"{n_expected} features ({[len(layouts[i]) for i in indices]} per {kind}); build "
                f"the prompt with the model's processor so each {kind} token is expanded to its features"
            )
        modality[placed] = modality_code(kind)
        rows, cols = torch.nonzero(placed, as_tuple=True)  # row-major, as HF's masked_scatter
        start, feature_offset = 0, 0
        for index in indices:
            layout = layouts[index]
            r, c = rows[start : start + len(layout)], cols[start : start + len(layout)]
            if len(layout) and not bool((r == r[0]).all()):
                raise ValueError(f"the tokens of {kind} item {index} span several batch rows; one item per run of {kind} tokens")
            fields["image"][r, c] = index
            fields["tile"][r, c] = layout.tile
            fields["row"][r, c] = layout.row
            fields["col"][r, c] = layout.col
            fields["feature"][r, c] = torch.where(layout.feature >= 0, layout.feature + feature_offset, -1)
            newline[r, c] = layout.newline
            image_row[index] = int(r[0]) if len(layout) else -1
            start += len(layout)
            feature_offset += layout.n_features
    modality[attention_mask == 0] = modality_code("padding")

    positions = torch.arange(pos).expand(batch, pos)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
    return ModalityMap(
        modality=modality,
        newline=newline,
        last=last,
        image_row=torch.tensor(image_row, dtype=torch.long),
        image_tiles=torch.tensor([layout.n_tiles for layout in layouts], dtype=torch.long),
        grids=tuple(layout.grids for layout in layouts),
        item_modality=tuple(layout.modality for layout in layouts),
        **fields,
    )
