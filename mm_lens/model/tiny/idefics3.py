"""Tiny Idefics3 model (SigLIP-style vision tower, pixel-shuffle connector, Llama language model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
)

from mm_lens.model.tiny.common import DEFAULT_WORDS, build_word_tokenizer, save_model, text_settings, vision_settings, word_chat_template

MAX_GRID = 6  # the processor names crops <row_1_col_1> .. <row_6_col_6>
IMAGE_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
    # Idefics3's processor ends each row of crops with a newline; like real tokenizers, keep it
    "newline_token": "\n",
    **{f"row_{i}_col_{j}_token": f"<row_{i}_col_{j}>" for i in range(1, MAX_GRID + 1) for j in range(1, MAX_GRID + 1)},
}


def idefics3_model_and_processor(
    *,
    crop_size: int = 28,
    patch_size: int = 7,
    scale_factor: int = 2,
    max_crops_per_side: int = 2,
    width: int = 32,
    vision_layers: int = 2,
    text_layers: int = 2,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
):
    """A random-initialised Idefics3 model and its processor.

    An image is resized to at most ``max_crops_per_side * crop_size`` pixels a side and split
    into ``crop_size`` crops plus a global view resized to one crop; each crop or view gives
    ``(crop_size // patch_size // scale_factor) ** 2`` image tokens after the pixel shuffle.
    """
    tokenizer = build_word_tokenizer(words, named_tokens=IMAGE_TOKENS)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**vision_settings(crop_size, patch_size, width, vision_layers)),
        text_config=LlamaConfig(**text_settings(len(tokenizer), tokenizer.pad_token_id, width, text_layers)),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": max_crops_per_side * crop_size}, max_image_size={"longest_edge": crop_size}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(crop_size // patch_size // scale_factor) ** 2,
        chat_template=word_chat_template(),
    )
    return model, processor


def build_tiny_idefics3(folder: str | Path, **settings: Any) -> Path:
    """Write a random-initialised ``Idefics3ForConditionalGeneration`` to ``folder``;
    ``settings`` as in ``idefics3_model_and_processor``."""
    return save_model(*idefics3_model_and_processor(**settings), folder)


BUILDERS = {"idefics3": build_tiny_idefics3}
