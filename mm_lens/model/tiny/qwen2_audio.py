"""Tiny Qwen2-Audio model (Whisper-style audio encoder, linear projector, Qwen2 language model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    WhisperFeatureExtractor,
)

from mm_lens.model.tiny.common import DEFAULT_WORDS, build_word_tokenizer, save_model, text_settings, word_chat_template

AUDIO_TOKENS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}


def qwen2_audio_model_and_processor(
    *,
    sampling_rate: int = 16000,
    hop_length: int = 160,
    clip_seconds: int = 1,
    mel_bins: int = 16,
    width: int = 32,
    audio_layers: int = 2,
    text_layers: int = 2,
    seed: int = 0,
    words: Sequence[str] = DEFAULT_WORDS,
):
    """A random-initialised Qwen2-Audio model and its processor.

    The feature extractor pads every clip to ``clip_seconds * sampling_rate`` samples, i.e.
    ``clip_seconds * sampling_rate // hop_length`` mel frames (the encoder's input length, twice
    its ``max_source_positions``); a clip of ``L`` unpadded frames gives
    ``((L - 1) // 2 + 1 - 2) // 2 + 1`` audio tokens (25 for a full clip with the defaults).
    """
    tokenizer = build_word_tokenizer(words, AUDIO_TOKENS)
    frames = clip_seconds * sampling_rate // hop_length
    config = Qwen2AudioConfig(
        audio_config=Qwen2AudioEncoderConfig(
            num_mel_bins=mel_bins,
            encoder_layers=audio_layers,
            encoder_attention_heads=4,
            encoder_ffn_dim=2 * width,
            d_model=width,
            max_source_positions=frames // 2,
        ),
        text_config=Qwen2Config(**text_settings(len(tokenizer), tokenizer.pad_token_id, width, text_layers)),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKENS["audio_token"]),
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    feature_extractor = WhisperFeatureExtractor(
        feature_size=mel_bins, sampling_rate=sampling_rate, hop_length=hop_length, chunk_length=clip_seconds
    )
    placeholder = " ".join(AUDIO_TOKENS[name] for name in ("audio_bos_token", "audio_token", "audio_eos_token"))
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=word_chat_template({"audio": placeholder}),
        **AUDIO_TOKENS,
    )
    return model, processor


def build_tiny_qwen2_audio(folder: str | Path, **settings: Any) -> Path:
    """Write a random-initialised ``Qwen2AudioForConditionalGeneration`` to ``folder``;
    ``settings`` as in ``qwen2_audio_model_and_processor``."""
    return save_model(*qwen2_audio_model_and_processor(**settings), folder)


BUILDERS = {"qwen2_audio": build_tiny_qwen2_audio}
