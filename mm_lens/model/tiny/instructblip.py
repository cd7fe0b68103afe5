"""Tiny InstructBLIP (BLIP vision encoder, Q-Former reading the instruction, Llama language
model), as MMNeuron studies it with Vicuna."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    BlipImageProcessorPil,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
)

from mm_lens.model.tiny.common import DEFAULT_WORDS, build_word_tokenizer, save_model, vision_settings, word_chat_template
from mm_lens.model.tiny.llava import llama_text_config

# The processor puts the query tokens before each prompt itself, so the template places none.
CHAT_TEMPLATE = word_chat_template({})


def instructblip_model_and_processor(
    *,
    image_size: int = 28,
    patch_size: int = 7,
    width: int = 32,
    vision_layers: int = 2,
    qformer_layers: int = 2,
    text_layers: int = 2,
    num_query_tokens: int = 8,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
):
    """A random-initialised ``InstructBlipForConditionalGeneration`` and its processor.

    ``num_query_tokens`` image tokens per image (32 in the paper). The Q-Former has
    cross-attention on every second layer (``cross_attention_frequency=2``, as released)
    and its own word-level tokenizer for the instruction. The vision encoder, Q-Former and
    projection are initialised with std 0.2: at HF's 0.02 the image moves the logits by
    about 1e-8, too little for patching or neuron zeroing to show.
    """
    # No image_token attribute on the tokenizer: the processor then adds ``<image>`` itself, as
    # for the released checkpoints (it cannot expand a string-valued ``tokenizer.image_token``).
    tokenizer = build_word_tokenizer(words, named_tokens={})
    qformer_tokenizer = build_word_tokenizer(words, named_tokens={})
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=num_query_tokens,
    )
    processor.chat_template = CHAT_TEMPLATE  # InstructBlipProcessor drops a chat_template argument
    vision = InstructBlipVisionConfig(
        **vision_settings(image_size, patch_size, width, vision_layers),
        qkv_bias=True,
        initializer_range=0.2,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(qformer_tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=qformer_layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=qformer_tokenizer.pad_token_id,
        cross_attention_frequency=2,
        initializer_range=0.2,
    )
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=llama_text_config(len(tokenizer), width, text_layers, tokenizer.pad_token_id),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(str(processor.image_token)),
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF initialises the query tokens to zeros: make the queries distinct
        model.query_tokens.normal_(0.0, 1.0)
    return model, processor


def build_tiny_instructblip(folder: str | Path, **settings: Any) -> Path:
    """Write a random-initialised ``InstructBlipForConditionalGeneration`` to ``folder``;
    ``settings`` as in ``instructblip_model_and_processor``."""
    return save_model(*instructblip_model_and_processor(**settings), folder)


BUILDERS = {"instructblip": build_tiny_instructblip}
