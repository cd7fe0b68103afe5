"""Tiny LLaVA-OneVision model (SigLIP vision tower, Qwen2 language model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    Qwen2Config,
    SiglipVisionConfig,
)

from mm_lens.model.architectures.llava_onevision import ImageOnlyLlavaOnevisionProcessor
from mm_lens.model.tiny.common import DEFAULT_WORDS, build_word_tokenizer, save_model, text_settings, vision_settings, word_chat_template


def llava_onevision_model_and_processor(
    *,
    image_size: int = 28,
    patch_size: int = 7,
    width: int = 32,
    vision_layers: int = 2,
    text_layers: int = 2,
    max_tiles: int = 2,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
):
    """A random-initialised LLaVA-OneVision model and its processor.

    ``(image_size // patch_size) ** 2`` tokens per view; grid pinpoints of 1x1 to 2x2 tiles of
    ``image_size``. ``vision_aspect_ratio`` is ``anyres_max_{max_tiles}``: a high-resolution grid
    of more than about ``max_tiles`` views is downsized (the default 2 downsizes the 2x2 grids
    only, so both paths run).
    """
    tokenizer = build_word_tokenizer(words, named_tokens={"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[image_size * h, image_size * w] for h in (1, 2) for w in (1, 2)]
    aspect_ratio = f"anyres_max_{max_tiles}"
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision_settings(image_size, patch_size, width, vision_layers), vision_use_head=False),
        text_config=Qwen2Config(**text_settings(len(tokenizer), tokenizer.pad_token_id, width, text_layers)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=aspect_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints
    )
    processor = ImageOnlyLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect_ratio,
        chat_template=word_chat_template({"image": "<image>", "video": "<video>"}),
    )
    return model, processor


def build_tiny_llava_onevision(folder: str | Path, **settings: Any) -> Path:
    """Write a random-initialised ``LlavaOnevisionForConditionalGeneration`` to ``folder``;
    ``settings`` as in ``llava_onevision_model_and_processor``."""
    return save_model(*llava_onevision_model_and_processor(**settings), folder)


BUILDERS = {"llava_onevision": build_tiny_llava_onevision}
