"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT
(``LlavaNextForConditionalGeneration``, anyres tiling with image-newline tokens)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, NamedTuple

import torch
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.supported_architectures.llava import LlavaArchitectureAdapter
from transformer_lens.model_bridge.supported_architectures.llava_next import LlavaNextArchitectureAdapter
from transformers.image_processing_utils import select_best_resolution

from mm_lens.model.architectures.spec import ArchitectureSpec
from mm_lens.model.architectures.bridge_components import MediaEmbeddingAdapter, NeuronGatedMLPBridge, NeuronProjectorBridge
from mm_lens.base.modality import ImageLayout

NEURON_HOOKS = {
    "lm_mlp": "blocks.{layer}.mlp.hook_act",
    "vision_mlp": "vision_encoder.encoder_layers.{layer}.mlp.hook_post",
    "projector": "vision_projector.hook_hidden",
}


def neuron_widths(hf_model: Any) -> dict[str, int]:
    config = hf_model.config
    return {
        "lm_mlp": config.text_config.intermediate_size,
        "vision_mlp": config.vision_config.intermediate_size,
        "projector": hf_model.model.multi_modal_projector.linear_1.out_features,
    }


# Declared by TransformerLens' CLIP/LLaVA bridges but never called by HF's forward here.
INERT_HOOKS = (
    "vision_encoder.hook_patch_embed",
    "vision_encoder.hook_pos_embed",
    "vision_projector.hook_projected",
    "attn.hook_hidden_states",
    "attn.hook_q_normed",
    "attn.hook_k_normed",
    "rotary_emb.hook_out",
    "hook_pos_embed",
)


def with_neuron_hooks(adapter: ArchitectureAdapter, projector: bool = True) -> None:
    """Swap in the gated MLP with ``hook_act`` and (``projector``) the two-layer projector
    with ``hook_hidden``."""
    mapping = adapter.components
    blocks = mapping["blocks"]
    blocks.submodules["mlp"] = NeuronGatedMLPBridge(
        name="mlp", config=adapter.cfg, submodules=dict(blocks.submodules["mlp"].submodules)
    )
    if projector:
        mapping["vision_projector"] = NeuronProjectorBridge(name="model.multi_modal_projector")


class LlavaNeuronAdapter(MediaEmbeddingAdapter, LlavaArchitectureAdapter):
    """TransformerLens' LLaVA adapter plus ``mlp.hook_act``, ``vision_projector.hook_hidden``
    and ``hook_embed`` on the merged embeddings."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        with_neuron_hooks(self)


class LlavaNextNeuronAdapter(MediaEmbeddingAdapter, LlavaNextArchitectureAdapter):
    """TransformerLens' LLaVA-NeXT adapter plus the same neuron hooks."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        with_neuron_hooks(self)


def patch_grid(config: Any) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def grid_layout(side: int, with_cls: bool) -> ImageLayout:
    """One square view: optional CLS feature first, then the patches row-major."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    row, col = rows.flatten(), cols.flatten()
    if with_cls:
        row, col = torch.cat([torch.tensor([-1]), row]), torch.cat([torch.tensor([-1]), col])
    n = len(row)
    return ImageLayout(
        tile=torch.zeros(n, dtype=torch.long),
        row=row,
        col=col,
        feature=torch.arange(n),
        newline=torch.zeros(n, dtype=torch.bool),
        grids=((side, side),),
        n_features=n,
    )


def llava_layouts(config: Any, inputs: Mapping[str, Any]) -> list[ImageLayout]:
    """LLaVA-1.5: every image is one square grid (plus CLS with the ``full`` strategy)."""
    pixel_values = inputs.get("pixel_values")
    n_images = 0 if pixel_values is None else pixel_values.shape[0]
    with_cls = config.vision_feature_select_strategy == "full"
    return [grid_layout(patch_grid(config), with_cls) for _ in range(n_images)]


class AnyresGrid(NamedTuple):
    """An anyres image's tiling (``tiles_h`` x ``tiles_w`` views of ``side`` x ``side``
    patches) and the part of its tiled patch grid HF's ``unpad_image`` keeps (``rows`` x
    ``cols`` from ``top``, ``left``)."""

    side: int
    tiles_h: int
    tiles_w: int
    top: int
    left: int
    rows: int
    cols: int


def anyres_grid(config: Any, image_size: tuple[int, int]) -> AnyresGrid:
    side, tile_px = patch_grid(config), config.vision_config.image_size
    height, width = image_size
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    tiles_h, tiles_w = best_h // tile_px, best_w // tile_px
    full_h, full_w = tiles_h * side, tiles_w * side
    # Unpadding as HF's unpad_image: crop the rows (or columns) the resize left empty.
    top, left, rows_kept, cols_kept = 0, 0, full_h, full_w
    if width / height > full_w / full_h:
        new_h = int(round(height * (full_w / width), 7))
        top = (full_h - new_h) // 2
        rows_kept = full_h - 2 * top
    else:
        new_w = int(round(width * (full_h / height), 7))
        left = (full_w - new_w) // 2
        cols_kept = full_w - 2 * left
    return AnyresGrid(side, tiles_h, tiles_w, top, left, rows_kept, cols_kept)


def anyres_layout(config: Any, image_size: tuple[int, int], shape: tuple[int, int] | None = None) -> ImageLayout:
    """Base view, then the high-resolution grid with one newline per row: HF's unpadded grid
    or, with ``shape``, that grid resized to ``shape`` (LLaVA-OneVision downsizes large grids
    bilinearly; each cell is then named after the patch under its centre, with feature -1
    since it mixes several)."""
    grid = anyres_grid(config, image_size)
    side = grid.side
    rows, cols = shape or (grid.rows, grid.cols)
    base = grid_layout(side, with_cls=False)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols + 1), indexing="ij")
    r, c = r.flatten(), c.flatten()
    newline = c == cols
    # the patch of the padded grid under each cell's centre (the cell itself when not resized)
    padded_r = ((r + 0.5) * grid.rows / rows).long() + grid.top
    padded_c = ((c + 0.5) * grid.cols / cols).long() + grid.left
    tile = 1 + (padded_r // side) * grid.tiles_w + padded_c // side
    feature = tile * side * side + (padded_r % side) * side + padded_c % side
    n_tiles = 1 + grid.tiles_h * grid.tiles_w
    return ImageLayout(
        tile=torch.cat([base.tile, torch.where(newline, -1, tile)]),
        row=torch.cat([base.row, r]),
        col=torch.cat([base.col, torch.where(newline, -1, c)]),
        feature=torch.cat([base.feature, torch.where(newline | (shape is not None), -1, feature)]),
        newline=torch.cat([base.newline, newline]),
        grids=((side, side), (rows, cols)),
        n_features=n_tiles * side * side,
        n_tiles=n_tiles,
    )


def check_image_sizes(config: Any, inputs: Mapping[str, Any]) -> None:
    """One ``image_sizes`` row per image of ``pixel_values``."""
    sizes, pixel_values = inputs.get("image_sizes"), inputs.get("pixel_values")
    if sizes is not None and pixel_values is not None and len(sizes) != len(pixel_values):
        raise ValueError(
            f"image_sizes describe {len(sizes)} images but pixel_values hold {len(pixel_values)}; pass one size per image"
        )


def llava_next_layouts(config: Any, inputs: Mapping[str, Any]) -> list[ImageLayout]:
    image_sizes = inputs.get("image_sizes")
    if inputs.get("pixel_values") is None:
        return []
    if config.vision_feature_select_strategy != "default":
        raise ValueError("LLaVA-NeXT layouts are defined for vision_feature_select_strategy='default' only")
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values; build inputs with the model's processor")
    return [anyres_layout(config, (int(h), int(w))) for h, w in torch.as_tensor(image_sizes).tolist()]


LLAVA = ArchitectureSpec(
    hf_class="LlavaForConditionalGeneration",
    adapter=LlavaNeuronAdapter,
    neuron_hooks=NEURON_HOOKS,
    neuron_widths=neuron_widths,
    layouts=llava_layouts,
    input_names=("pixel_values",),
    inert_hooks=INERT_HOOKS,
)
LLAVA_NEXT = replace(
    LLAVA,
    hf_class="LlavaNextForConditionalGeneration",
    adapter=LlavaNextNeuronAdapter,
    layouts=llava_next_layouts,
    input_names=("pixel_values", "image_sizes"),
    check_inputs=check_image_sizes,
)
SPECS = (LLAVA, LLAVA_NEXT)
