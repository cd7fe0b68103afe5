"""Tiny random-initialised MLLMs built offline from real ``transformers`` classes.

Used by the test-suite and by the command line before a trained model is at hand. Each
builder writes a complete model folder (weights as safetensors, config, tokenizer, image
processor, processor with chat template) that ``HookedMLLM.from_pretrained`` loads with no
network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
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
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
DEFAULT_WORDS = (
    "USER ASSISTANT : ? . , what is the color of shape in this image a an picture "
    "red green blue yellow white black gray circle square triangle road car tree "
    "scan bone tissue field river city text page number one two three four five yes no "
    "how many are there left right top bottom which domain describe"
).split()

# A chat template in the LLaVA-1.5 style: images first, then the text of the user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% endif %}"
    "{% endfor %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT : "
    "{% for item in message['content'] %}{{ item['text'] }} {% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_word_tokenizer(words: Sequence[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with LLaVA's special tokens (``<image>`` included)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_bos_token = True
    return tokenizer


def _vision_config(image_size: int, patch_size: int, width: int, layers: int, **overrides) -> CLIPVisionConfig:
    settings = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=width,
    )
    return CLIPVisionConfig(**{**settings, **overrides})


def _text_config(tokenizer_size: int, width: int, layers: int, pad_token_id: int, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=tokenizer_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaConfig(**{**settings, **overrides})


def _save(model, processor, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def build_tiny_llava(
    folder: str | Path,
    *,
    image_size: int = 28,
    patch_size: int = 7,
    width: int = 32,
    vision_layers: int = 2,
    text_layers: int = 2,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
    vision_overrides: Mapping[str, Any] | None = None,
    text_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write a random-initialised ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout).

    ``(image_size // patch_size) ** 2`` image tokens per image (16 by default).
    ``vision_overrides`` / ``text_overrides`` replace fields of the CLIP / Llama configs
    (e.g. ``{"intermediate_size": 1408, "vocab_size": 32000}`` for benchmark shapes).
    """
    tokenizer = build_word_tokenizer(words)
    config = LlavaConfig(
        vision_config=_vision_config(image_size, patch_size, width, vision_layers, **(vision_overrides or {})),
        text_config=_text_config(len(tokenizer), width, text_layers, tokenizer.pad_token_id, **(text_overrides or {})),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return _save(model, processor, folder)


def build_tiny_llava_next(
    folder: str | Path,
    *,
    image_size: int = 28,
    patch_size: int = 7,
    width: int = 32,
    vision_layers: int = 2,
    text_layers: int = 2,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
) -> Path:
    """Write a random-initialised ``LlavaNextForConditionalGeneration`` with anyres tiling.

    Grid pinpoints are 1x2, 2x1 and 2x2 tiles of ``image_size``, so an image gets a base view
    of ``(image_size // patch_size) ** 2`` tokens plus its unpadded high-resolution grid with
    one image-newline token per row.
    """
    tokenizer = build_word_tokenizer(words)
    s = image_size
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    config = LlavaNextConfig(
        vision_config=_vision_config(image_size, patch_size, width, vision_layers),
        text_config=_text_config(len(tokenizer), width, text_layers, tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    # HF initialises image_newline with torch.empty: give it defined values.
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 1.0)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return _save(model, processor, folder)


TINY_BUILDERS = {"llava": build_tiny_llava, "llava_next": build_tiny_llava_next}
