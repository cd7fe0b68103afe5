"""What the tiny builders share: a word-level tokenizer, a chat template in the LLaVA-1.5
style, small language-model and vision-tower settings, and saving a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BASE_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
DEFAULT_WORDS = (
    "USER ASSISTANT : ? . , what is the color of shape in this image a an picture "
    "red green blue yellow white black gray circle square triangle road car tree "
    "scan bone tissue field river city text page number one two three four five yes no "
    "how many are there left right top bottom which domain describe"
).split()


def word_chat_template(placeholders: Mapping[str, str] | None = None) -> str:
    """A chat template in the LLaVA-1.5 style: the user turn's media first (one placeholder
    per ``{"type": modality}`` entry, ``placeholders``: modality -> text), then its text."""
    placeholders = {"image": "<image>"} if placeholders is None else placeholders
    media = "".join(f"{{% if item['type'] == '{kind}' %}}{text} {{% endif %}}" for kind, text in placeholders.items())
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER : "
        "{% for item in message['content'] %}" + media + "{% endfor %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
        "{% endfor %}"
        "{% elif message['role'] == 'assistant' %}ASSISTANT : "
        "{% for item in message['content'] %}{{ item['text'] }} {% endfor %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
    )


CHAT_TEMPLATE = word_chat_template()


def build_word_tokenizer(
    words: Sequence[str] = DEFAULT_WORDS, named_tokens: Mapping[str, str] | None = None
) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ``<pad> <s> </s> <unk>``, then the special tokens
    of ``named_tokens`` (attribute -> token, default ``{"image_token": "<image>"}``; e.g.
    ``audio_token``, ``vision_start_token``), then ``words``."""
    named_tokens = {"image_token": "<image>"} if named_tokens is None else dict(named_tokens)
    vocab = {token: i for i, token in enumerate((*BASE_TOKENS, *named_tokens.values()))}
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
        extra_special_tokens=named_tokens,
    )
    tokenizer.add_bos_token = True
    return tokenizer


def text_settings(vocab_size: int, pad_token_id: int, width: int, layers: int) -> dict[str, Any]:
    """The settings every tiny language model shares; any HF decoder config takes them (the
    word tokenizer's ``<s>`` and ``</s>`` are ids 1 and 2)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=pad_token_id,
        bos_token_id=BASE_TOKENS.index("<s>"),
        eos_token_id=BASE_TOKENS.index("</s>"),
    )


def vision_settings(image_size: int, patch_size: int, width: int, layers: int) -> dict[str, Any]:
    """The settings every tiny ViT-style vision tower shares (CLIP, SigLIP, BLIP, Idefics3)."""
    return dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def save_model(model: Any, processor: Any, folder: str | Path) -> Path:
    """Write the model (safetensors) and its processor to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
