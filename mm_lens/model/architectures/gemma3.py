"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP vision tower, a projector that
average-pools the patch grid to ``mm_tokens_per_image`` soft tokens, RMS-normalises and
multiplies them by one matrix (no hidden layer, so no projector neurons), and the Gemma 3
language model, whose image tokens attend to each other bidirectionally (``token_type_ids``).

Every row of ``pixel_values`` is one item: an image or, with the processor's pan-and-scan
on, one of its crops (the processor does not hand the crop counts to the model, and HF
treats the crops as images of their own).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from transformer_lens.model_bridge.supported_architectures.gemma3_multimodal import Gemma3MultimodalArchitectureAdapter

from mm_lens.model.architectures.bridge_components import MediaEmbeddingAdapter
from mm_lens.model.architectures.spec import ArchitectureSpec
from mm_lens.model.architectures.llava import grid_layout, with_neuron_hooks
from mm_lens.base.modality import ImageLayout

NEURON_HOOKS = {
    "lm_mlp": "blocks.{layer}.mlp.hook_act",
    "vision_mlp": "vision_encoder.encoder_layers.{layer}.mlp.hook_post",
}

# Declared by TransformerLens' SigLIP/Gemma 3 bridges but never called by HF's forward here.
INERT_HOOKS = (
    "vision_encoder.hook_patch_embed",
    "vision_encoder.hook_pos_embed",
    "vision_projector.hook_projected",
    "attn.hook_hidden_states",
    "rotary_emb.hook_out",
    "hook_pos_embed",
)


def _neuron_widths(hf_model: Any) -> dict[str, int]:
    config = hf_model.config
    return {"lm_mlp": config.text_config.intermediate_size, "vision_mlp": config.vision_config.intermediate_size}


class Gemma3NeuronAdapter(MediaEmbeddingAdapter, Gemma3MultimodalArchitectureAdapter):
    """TransformerLens' Gemma 3 multimodal adapter plus ``mlp.hook_act``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        with_neuron_hooks(self, projector=False)


def _gemma3_layouts(config: Any, inputs: Mapping[str, Any]) -> list[ImageLayout]:
    """One square grid of ``sqrt(mm_tokens_per_image)`` pooled cells per row of ``pixel_values``."""
    pixel_values = inputs.get("pixel_values")
    side = math.isqrt(config.mm_tokens_per_image)
    return [] if pixel_values is None else [grid_layout(side, with_cls=False) for _ in range(len(pixel_values))]


def _check_token_types(config: Any, inputs: Mapping[str, Any]) -> None:
    """``token_type_ids`` (which make the image tokens attend to each other) mark exactly
    the image tokens; without them HF attends causally everywhere."""
    token_types = inputs.get("token_type_ids")
    if token_types is None:
        if (inputs["input_ids"] == config.image_token_id).any():
            raise ValueError(
                "image tokens without token_type_ids: Gemma 3's image tokens attend to each other only where "
                "token_type_ids mark them; build inputs with the model's processor (it returns them)"
            )
        return
    if tuple(token_types.shape) != tuple(inputs["input_ids"].shape):
        raise ValueError(
            f"token_type_ids have shape {tuple(token_types.shape)} but input_ids {tuple(inputs['input_ids'].shape)}; "
            "they must match"
        )
    if not torch.equal(token_types.bool(), inputs["input_ids"] == config.image_token_id):
        raise ValueError("token_type_ids must be 1 at the image tokens and 0 elsewhere; build inputs with the model's processor")


GEMMA3 = ArchitectureSpec(
    hf_class="Gemma3ForConditionalGeneration",
    adapter=Gemma3NeuronAdapter,
    neuron_hooks=NEURON_HOOKS,
    neuron_widths=_neuron_widths,
    layouts=_gemma3_layouts,
    input_names=("pixel_values", "token_type_ids"),
    inert_hooks=INERT_HOOKS,
    check_inputs=_check_token_types,
    nested_images=True,
    image_geometry="whole",  # the processor squashes the picture to the tower's size (pan-and-scan crops: parts of it)
)
SPECS = (GEMMA3,)
