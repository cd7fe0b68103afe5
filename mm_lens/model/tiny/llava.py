"""Tiny LLaVA-1.5 and LLaVA-NeXT models (CLIP vision tower, Llama language model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
)

from mm_lens.model.tiny.common import CHAT_TEMPLATE, DEFAULT_WORDS, build_word_tokenizer, save_model, text_settings, vision_settings


def clip_vision_config(image_size: int, patch_size: int, width: int, layers: int, **overrides) -> CLIPVisionConfig:
    """A small ``CLIPVisionConfig`` (``overrides`` replace its fields)."""
    return CLIPVisionConfig(**{**vision_settings(image_size, patch_size, width, layers), "projection_dim": width, **overrides})


def llama_text_config(tokenizer_size: int, width: int, layers: int, pad_token_id: int, **overrides) -> LlamaConfig:
    """A small ``LlamaConfig`` for a tokenizer of ``tokenizer_size`` (``overrides`` replace its fields)."""
    return LlamaConfig(**{**text_settings(tokenizer_size, pad_token_id, width, layers), **overrides})


def llava_model_and_processor(
    *,
    anyres: bool = False,
    image_size: int = 28,
    patch_size: int = 7,
    width: int = 32,
    vision_layers: int = 2,
    text_layers: int = 2,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
    vision_overrides: Mapping[str, Any] | None = None,
    text_overrides: Mapping[str, Any] | None = None,
    vision_feature_layer: int = -2,
):
    """A random-initialised LLaVA-1.5 (``anyres=False``) or LLaVA-NeXT model and its processor.

    ``(image_size // patch_size) ** 2`` image tokens per view. LLaVA-NeXT's grid pinpoints are
    1x2, 2x1 and 2x2 tiles of ``image_size``: an image gets a base view plus its unpadded
    high-resolution grid with one image-newline token per row. ``vision_overrides`` /
    ``text_overrides`` replace fields of the CLIP / Llama configs (e.g. ``{"intermediate_size":
    1408, "vocab_size": 32000}`` for benchmark shapes).
    """
    tokenizer = build_word_tokenizer(words)
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    config_class, model_class = (LlavaNextConfig, LlavaNextForConditionalGeneration) if anyres else (LlavaConfig, LlavaForConditionalGeneration)
    config = config_class(
        vision_config=clip_vision_config(image_size, patch_size, width, vision_layers, **(vision_overrides or {})),
        text_config=llama_text_config(len(tokenizer), width, text_layers, tokenizer.pad_token_id, **(text_overrides or {})),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        **({"image_grid_pinpoints": pinpoints} if anyres else {}),
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    sizes = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    if anyres:
        with torch.no_grad():  # HF initialises image_newline with torch.empty: give it defined values
            model.model.image_newline.normal_(0.0, 1.0)
        image_processor, processor_class = LlavaNextImageProcessor(**sizes, image_grid_pinpoints=pinpoints), LlavaNextProcessor
    else:
        image_processor, processor_class = CLIPImageProcessor(**sizes), LlavaProcessor
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


def build_tiny_llava(folder: str | Path, **settings: Any) -> Path:
    """Write a random-initialised ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout) to
    ``folder``; ``settings`` as in ``llava_model_and_processor``."""
    return save_model(*llava_model_and_processor(anyres=False, **settings), folder)


def build_tiny_llava_next(folder: str | Path, **settings: Any) -> Path:
    """Write a random-initialised ``LlavaNextForConditionalGeneration`` (anyres tiling) to
    ``folder``; ``settings`` as in ``llava_model_and_processor``."""
    return save_model(*llava_model_and_processor(anyres=True, **settings), folder)


BUILDERS = {"llava": build_tiny_llava, "llava_next": build_tiny_llava_next}
