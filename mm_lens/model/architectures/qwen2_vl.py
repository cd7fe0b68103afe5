"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL
(``Qwen2_5_VLForConditionalGeneration``): a vision tower over all patches of a batch packed
into one sequence, a patch merger that turns each 2x2 block of patches into one image token,
and a Qwen2 language model with M-RoPE (3-D positions from ``get_rope_index``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge.generalized_components import LinearBridge, MLPBridge
from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import Qwen2_5_VLArchitectureAdapter
from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLProcessor

from mm_lens.model.architectures.spec import ArchitectureSpec
from mm_lens.model.architectures.image_text_processor import ImageTextProcessor
from mm_lens.model.architectures.bridge_components import MediaEmbeddingAdapter, NeuronGatedMLPBridge, NeuronProjectorBridge
from mm_lens.base.modality import ImageLayout

# Declared by TransformerLens' bridges but never called by HF's forward here.
INERT_HOOKS = (
    "vision_projector.hook_projected",  # VisionProjectionBridge's extra point; the merger output is hook_out
    "attn.hook_hidden_states",  # attention runs HF-native (M-RoPE lives in HF's forward) ...
    "attn.hook_rot_q",  # ... so TL's rotary hooks are never reached
    "attn.hook_rot_k",
)


class Qwen2VLImageTextProcessor(ImageTextProcessor, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text only (no torchvision needed)."""


class Qwen2_5_VLImageTextProcessor(ImageTextProcessor, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only (no torchvision needed)."""


# A saved processor names its class; AutoProcessor finds these two through its public registry.
AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageTextProcessor, exist_ok=True)
AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageTextProcessor, exist_ok=True)


NEURON_HOOKS = {
    "lm_mlp": "blocks.{layer}.mlp.hook_act",
    "vision_mlp": "vision_encoder.blocks.{layer}.mlp.hook_post",
    "projector": "vision_projector.hook_hidden",
}
# Qwen2.5-VL's vision MLP is gated: its neurons are act(gate_proj(x)), as in the language model.
NEURON_HOOKS_2_5 = {**NEURON_HOOKS, "vision_mlp": "vision_encoder.blocks.{layer}.mlp.hook_act"}


def _with_neuron_hooks(adapter: Qwen2_5_VLArchitectureAdapter, vision_mlp: Any) -> None:
    mapping = adapter.components
    blocks = mapping["blocks"]
    blocks.submodules["mlp"] = NeuronGatedMLPBridge(
        name="mlp", config=adapter.cfg, submodules=dict(blocks.submodules["mlp"].submodules)
    )
    mapping["vision_encoder"].submodules["blocks"].submodules["mlp"] = vision_mlp
    # the merger's MLP is Sequential(Linear, GELU, Linear): its hidden activation is module "1"
    mapping["vision_projector"] = NeuronProjectorBridge(name="model.visual.merger", activation="mlp.1")


class Qwen2VLNeuronAdapter(MediaEmbeddingAdapter, Qwen2_5_VLArchitectureAdapter):
    """TransformerLens' Qwen2.5-VL adapter with Qwen2-VL's vision MLP (``fc1``, ``act``,
    ``fc2``; ``mlp.hook_post`` = ``act(fc1(x))``), plus ``mlp.hook_act`` in the language
    model and ``vision_projector.hook_hidden`` (the merger's GELU output)."""

    required_libraries: list[str] = []  # TL asks for torchvision for HF's fast processors; the model needs none

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        vision_mlp = MLPBridge(name="mlp", submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")})
        _with_neuron_hooks(self, vision_mlp)
        vision_config = getattr(cfg, "vision_config", None)
        if vision_config is not None:  # Qwen2-VL's tower width is embed_dim (hidden_size is the merger's output)
            self.cfg.vision_hidden_size = vision_config.embed_dim


class Qwen2_5_VLNeuronAdapter(MediaEmbeddingAdapter, Qwen2_5_VLArchitectureAdapter):
    """TransformerLens' Qwen2.5-VL adapter plus ``mlp.hook_act`` in the language model and
    the vision blocks (``act_fn(gate_proj(x))``) and ``vision_projector.hook_hidden``."""

    required_libraries: list[str] = []  # TL asks for torchvision for HF's fast processors; the model needs none

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        vision_mlp = NeuronGatedMLPBridge(
            name="mlp",
            config=self.cfg,
            submodules={"gate": LinearBridge(name="gate_proj"), "in": LinearBridge(name="up_proj"), "out": LinearBridge(name="down_proj")},
        )
        _with_neuron_hooks(self, vision_mlp)


def _projector_width(vision_config: Any, tower_width: int) -> int:
    return tower_width * vision_config.spatial_merge_size**2


def qwen2_vl_neuron_widths(hf_model: Any) -> dict[str, int]:
    config = hf_model.config
    vision = config.vision_config
    return {
        "lm_mlp": config.text_config.intermediate_size,
        "vision_mlp": int(vision.embed_dim * vision.mlp_ratio),
        "projector": _projector_width(vision, vision.embed_dim),
    }


def qwen2_5_vl_neuron_widths(hf_model: Any) -> dict[str, int]:
    config = hf_model.config
    vision = config.vision_config
    return {
        "lm_mlp": config.text_config.intermediate_size,
        "vision_mlp": vision.intermediate_size,
        "projector": _projector_width(vision, vision.hidden_size),
    }


def _merged_layout(grid_thw: tuple[int, int, int], merge: int, modality: str) -> ImageLayout:
    """One image or video of ``grid_thw`` patches: one token per ``merge x merge`` block,
    frames (temporal patches) outermost, then merged rows, then merged columns."""
    frames, rows, cols = grid_thw[0], grid_thw[1] // merge, grid_thw[2] // merge
    tile, row, col = (axis.flatten() for axis in torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij"))
    n = frames * rows * cols
    return ImageLayout(
        tile=tile,
        row=row,
        col=col,
        feature=torch.arange(n),
        newline=torch.zeros(n, dtype=torch.bool),
        grids=((rows, cols),),
        n_features=n,
        n_tiles=n,  # the packed tower's rows: merge**2 patches (blocks) or one merged token (merger) per unit
        modality=modality,
    )


_MEDIA = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


def qwen2_vl_layouts(config: Any, inputs: Mapping[str, Any]) -> list[ImageLayout]:
    """Images, then videos, each from its ``*_grid_thw`` row."""
    merge = config.vision_config.spatial_merge_size
    layouts = []
    for modality, _, grid_name in _MEDIA:
        grids = inputs.get(grid_name)
        if grids is not None:
            layouts += [_merged_layout(tuple(grid), merge, modality) for grid in torch.as_tensor(grids).tolist()]
    return layouts


def _token_runs(input_ids: Int[Tensor, "batch pos"], token_id: int) -> int:
    """Number of runs of consecutive ``token_id`` tokens (one run per image or video)."""
    placed = input_ids == token_id
    starts = placed & ~torch.nn.functional.pad(placed, (1, 0))[:, :-1]
    return int(starts.sum())


def check_qwen2_vl_inputs(config: Any, inputs: Mapping[str, Any]) -> None:
    """Grids, pixel rows, placeholder runs and ``mm_token_type_ids`` agree."""
    input_ids = inputs["input_ids"]
    patch_features = config.vision_config.in_channels * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
    for modality, pixels_name, grid_name in _MEDIA:
        pixels, grids = inputs.get(pixels_name), inputs.get(grid_name)
        if pixels is None and grids is None:
            continue
        if pixels is None or grids is None:
            given, missing = (pixels_name, grid_name) if grids is None else (grid_name, pixels_name)
            raise ValueError(f"{given} were given without {missing}; pass both (the processor returns them together)")
        grids = torch.as_tensor(grids)
        runs = _token_runs(input_ids, int(getattr(config, f"{modality}_token_id")))
        if grids.ndim != 2 or grids.shape[1] != 3 or grids.shape[0] != runs:
            raise ValueError(
                f"{grid_name} has shape {tuple(grids.shape)} but input_ids hold {runs} {modality}(s); "
                f"pass one (t, h, w) row per {modality}"
            )
        n_patches = int(grids.prod(-1).sum())
        if tuple(pixels.shape) != (n_patches, patch_features):
            raise ValueError(
                f"{pixels_name} has shape {tuple(pixels.shape)} but {grid_name} describe {n_patches} patches of "
                f"{patch_features} values; build them together with the model's processor"
            )
    types = inputs.get("mm_token_type_ids")
    has_media = any(inputs.get(grid_name) is not None for _, _, grid_name in _MEDIA)
    if types is None:
        if has_media:
            raise ValueError("image/video inputs need mm_token_type_ids (for M-RoPE positions); the processor returns them")
        return
    expected = (input_ids == config.image_token_id).long() + 2 * (input_ids == config.video_token_id).long()
    if tuple(types.shape) != tuple(input_ids.shape) or not torch.equal(types.long().to(expected.device), expected):
        raise ValueError(
            "mm_token_type_ids disagree with input_ids (1 at image tokens, 2 at video tokens, 0 elsewhere); "
            "build them together with the model's processor"
        )


QWEN2_VL = ArchitectureSpec(
    hf_class="Qwen2VLForConditionalGeneration",
    adapter=Qwen2VLNeuronAdapter,
    neuron_hooks=NEURON_HOOKS,
    neuron_widths=qwen2_vl_neuron_widths,
    layouts=qwen2_vl_layouts,
    input_names=tuple(name for _, *names in _MEDIA for name in names) + ("mm_token_type_ids",),
    feature_inputs={modality: pixels for modality, pixels, _ in _MEDIA},
    token_attributes={"image": "image_token_id", "video": "video_token_id"},
    inert_hooks=INERT_HOOKS,
    check_inputs=check_qwen2_vl_inputs,
    image_geometry="whole",  # the processor resizes the whole picture to the patch grid (no crop, no pad)
    encoder_modalities=("image", "video"),  # HF runs the tower on the images, then on the videos
)
QWEN2_5_VL = replace(
    QWEN2_VL,
    hf_class="Qwen2_5_VLForConditionalGeneration",
    adapter=Qwen2_5_VLNeuronAdapter,
    neuron_hooks=NEURON_HOOKS_2_5,
    neuron_widths=qwen2_5_vl_neuron_widths,
    input_names=QWEN2_VL.input_names + ("second_per_grid_ts",),
)
SPECS = (QWEN2_VL, QWEN2_5_VL)
