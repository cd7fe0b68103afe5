"""Tiny Gemma 3 model (SigLIP vision tower, average-pooling projector, Gemma 3 language model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from mm_lens.model.tiny.common import DEFAULT_WORDS, build_word_tokenizer, save_model, text_settings, vision_settings, word_chat_template

IMAGE_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}


def gemma3_model_and_processor(
    *,
    image_size: int = 28,
    patch_size: int = 7,
    tokens_per_image: int = 4,
    width: int = 32,
    vision_layers: int = 2,
    text_layers: int = 2,
    sliding_window: int = 8,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
):
    """A random-initialised Gemma 3 model and its processor.

    Each image's ``(image_size // patch_size) ** 2`` patches are average-pooled to
    ``tokens_per_image`` soft tokens, written between ``<start_of_image>`` and
    ``<end_of_image>``. The first language-model layer is a sliding-window layer
    (``sliding_window`` positions), the second a global one, as Gemma 3 alternates them.
    """
    tokenizer = build_word_tokenizer(words, named_tokens=IMAGE_TOKENS)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in IMAGE_TOKENS.items()}
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**vision_settings(image_size, patch_size, width, vision_layers), vision_use_head=False),
        text_config=Gemma3TextConfig(
            **text_settings(len(tokenizer), tokenizer.pad_token_id, width, text_layers),
            head_dim=width // 4,
            query_pre_attn_scalar=width // 4,
            sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention"] * (text_layers // 2) + ["sliding_attention"] * (text_layers % 2),
        ),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises these with zeros: random values make every weight count
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight") and "vision_tower" not in name:
                parameter.normal_(0.0, 0.1)  # Gemma's RMSNorms scale by (1 + weight)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        chat_template=word_chat_template({"image": IMAGE_TOKENS["boi_token"]}),
        image_seq_length=tokens_per_image,
    )
    return model, processor


def build_tiny_gemma3(folder: str | Path, **settings: Any) -> Path:
    """Write a random-initialised ``Gemma3ForConditionalGeneration`` to ``folder``; ``settings``
    as in ``gemma3_model_and_processor``."""
    return save_model(*gemma3_model_and_processor(**settings), folder)


BUILDERS = {"gemma3": build_tiny_gemma3}
