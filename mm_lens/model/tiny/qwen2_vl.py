"""Tiny Qwen2-VL and Qwen2.5-VL models (packed-patch vision tower with a 2x2 patch merger,
M-RoPE Qwen2 language model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from mm_lens.model.architectures.qwen2_vl import Qwen2_5_VLImageTextProcessor, Qwen2VLImageTextProcessor
from mm_lens.model.tiny.common import DEFAULT_WORDS, build_word_tokenizer, save_model, text_settings, word_chat_template

NAMED_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
CHAT_TEMPLATE = word_chat_template(
    {"image": "<|vision_start|><|image_pad|><|vision_end|>", "video": "<|vision_start|><|video_pad|><|vision_end|>"}
)


def qwen2_vl_model_and_processor(
    *,
    version: str = "2",
    patch_size: int = 4,
    width: int = 32,
    vision_width: int = 16,
    vision_layers: int = 2,
    text_layers: int = 2,
    max_side: int = 64,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
):
    """A random-initialised Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) model and
    its processor (PIL image processor, word-level tokenizer).

    Images are resized to multiples of ``2 * patch_size`` with at most ``max_side ** 2``
    pixels; each 2x2 block of patches becomes one image token. Qwen2.5-VL's window attention
    uses windows of 2x2 merged tokens in its first vision layer and full attention in the last.
    """
    tokenizer = build_word_tokenizer(words, named_tokens=NAMED_TOKENS)
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in NAMED_TOKENS.items()}
    heads = 2
    text_config = dict(
        text_settings(len(tokenizer), tokenizer.pad_token_id, width, text_layers),
        num_attention_heads=heads,
        num_key_value_heads=1,
        # M-RoPE: (temporal, height, width) sections of the head's rotary frequencies
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(width // heads)},
    )
    vision = dict(depth=vision_layers, num_heads=heads, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision.update(embed_dim=vision_width, hidden_size=width, mlp_ratio=2)
        config_class, model_class, processor_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageTextProcessor
    elif version == "2.5":
        vision.update(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            out_hidden_size=width,
            window_size=4 * patch_size,
            fullatt_block_indexes=[vision_layers - 1],
        )
        config_class, model_class, processor_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageTextProcessor
    else:
        raise ValueError(f"version must be '2' or '2.5', not {version!r}")
    config = config_class(vision_config=vision, text_config=text_config, **ids)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": (2 * patch_size) ** 2, "longest_edge": max_side**2},
    )
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor


def _mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim // 2`` rotary frequencies into (temporal, height, width) sections."""
    half = head_dim // 2
    return [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]


def build_tiny_qwen2_vl(folder: str | Path, **settings: Any) -> Path:
    """Write a random-initialised ``Qwen2VLForConditionalGeneration`` to ``folder``;
    ``settings`` as in ``qwen2_vl_model_and_processor``."""
    return save_model(*qwen2_vl_model_and_processor(version="2", **settings), folder)


def build_tiny_qwen2_5_vl(folder: str | Path, **settings: Any) -> Path:
    """Write a random-initialised ``Qwen2_5_VLForConditionalGeneration`` (window attention)
    to ``folder``; ``settings`` as in ``qwen2_vl_model_and_processor``."""
    return save_model(*qwen2_vl_model_and_processor(version="2.5", **settings), folder)


BUILDERS = {"qwen2_vl": build_tiny_qwen2_vl, "qwen2_5_vl": build_tiny_qwen2_5_vl}
