"""Model inputs built by the model's own HF processor, carried with their ModalityMap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from mm_lens.base.modality import ModalityMap


@dataclass(frozen=True)
class MultimodalBatch(Mapping):
    """HF keyword inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...) and the
    batch's ``ModalityMap``. Behaves as a mapping, so ``model(**batch)`` works."""

    inputs: dict[str, torch.Tensor]
    modality_map: ModalityMap

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.inputs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    def to(self, device: torch.device | str) -> "MultimodalBatch":
        return MultimodalBatch({k: v.to(device) for k, v in self.inputs.items()}, self.modality_map)


ImagesPerPrompt = Sequence[Image.Image] | Image.Image | None
# A video is a list of frames (PIL images) or a [frames, height, width, 3] array; an audio
# clip a 1-d waveform (numpy array) at the feature extractor's sampling rate.
MediaPerPrompt = Sequence[Any] | Any | None

# modality -> (keyword of the HF processor call, attribute naming the placeholder token)
_PROCESSOR_KEYWORDS = {"image": ("images", "image_token"), "video": ("videos", "video_token"), "audio": ("audio", "audio_token")}


def _is_single(entry: Any, modality: str) -> bool:
    if modality == "image":
        return isinstance(entry, Image.Image)
    if modality == "audio":
        return getattr(entry, "ndim", None) == 1
    return getattr(entry, "ndim", None) == 4 or (isinstance(entry, Sequence) and bool(entry) and isinstance(entry[0], Image.Image))


def _as_lists(entries: Sequence[MediaPerPrompt] | None, n_prompts: int, modality: str = "image") -> list[list[Any]]:
    """One list of items per prompt from ``entries`` (per prompt: an item, a list, or None)."""
    if entries is None:
        return [[] for _ in range(n_prompts)]
    if len(entries) != n_prompts:
        raise ValueError(
            f"{n_prompts} prompts but {len(entries)} {modality} entries; pass one entry per prompt "
            f"(a {modality}, a list of them, or None)"
        )
    return [[] if entry is None else [entry] if _is_single(entry, modality) else list(entry) for entry in entries]


def _placeholder(processor: Any, modality: str) -> str:
    token = getattr(processor, _PROCESSOR_KEYWORDS[modality][1], None)
    if token is None:
        raise ValueError(f"the {type(processor).__name__} has no {modality} token: this model takes no {modality} input")
    return str(token)  # InstructBLIP's processor holds an AddedToken


def format_prompt(
    processor: Any, text: str, n_images: int, chat: bool, *, n_videos: int = 0, n_audios: int = 0, placeholders: bool = True
) -> str:
    """The prompt string for one sample: through the processor's chat template (one entry
    per image, video and audio clip, then the text) or, with ``chat=False``, ``text`` as
    given (checked to hold one placeholder token per item, or none where the processor
    inserts the feature tokens itself: ``placeholders=False``)."""
    counts = {"image": n_images, "video": n_videos, "audio": n_audios}
    if not chat:
        for modality, n in counts.items():
            if not n and getattr(processor, _PROCESSOR_KEYWORDS[modality][1], None) is None:
                continue
            token = _placeholder(processor, modality)
            if not placeholders and token in text:
                raise ValueError(
                    f"prompt has {text.count(token)} {token} tokens but this model's processor puts the {modality} "
                    f"tokens before the prompt itself; write no {token} in the prompt"
                )
            if placeholders and text.count(token) != n:
                raise ValueError(
                    f"prompt has {text.count(token)} {token} tokens but {n} {modality}s were given; "
                    f"put one {token} per {modality} in the prompt, or use chat=True"
                )
        return text
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat template; pass chat=False and write the placeholder tokens yourself")
    content = [{"type": modality} for modality, n in counts.items() for _ in range(n)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[ImagesPerPrompt] | None,
    *,
    videos: Sequence[MediaPerPrompt] | None = None,
    audios: Sequence[MediaPerPrompt] | None = None,
    chat: bool = True,
    padding_side: str = "left",
    nested_images: bool = False,
    prompt_placeholders: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenise prompts and preprocess images, videos and audio with the HF processor (one
    padded batch). Each of ``images``/``videos``/``audios`` has one entry per prompt. The
    processor gets the images as one flat list or (``nested_images``) one list per prompt.
    ``prompt_placeholders``: as ``placeholders`` of ``format_prompt``."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per sample")
    if len(prompts) == 0:
        raise ValueError("no prompts: pass at least one")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    lists = {m: _as_lists(entries, len(prompts), m) for m, entries in (("image", images), ("video", videos), ("audio", audios))}
    for modality, per_prompt in lists.items():
        if any(per_prompt):
            _placeholder(processor, modality)
    texts = [
        format_prompt(
            processor,
            p,
            len(lists["image"][i]),
            chat,
            n_videos=len(lists["video"][i]),
            n_audios=len(lists["audio"][i]),
            placeholders=prompt_placeholders,
        )
        for i, p in enumerate(prompts)
    ]
    lists["image"] = [[image.convert("RGB") for image in images] for images in lists["image"]]
    media = {_PROCESSOR_KEYWORDS[m][0]: [item for items in per_prompt for item in items] for m, per_prompt in lists.items()}
    if nested_images and media["images"]:
        media["images"] = lists["image"]
    tokenizer, previous = processor.tokenizer, processor.tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        encoded = processor(text=texts, **{k: v for k, v in media.items() if v}, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = previous
    return dict(encoded)


def sample_prompt(
    processor: Any, question: str, images: ImagesPerPrompt, *, videos: MediaPerPrompt = None, audios: MediaPerPrompt = None
) -> str:
    """The chat prompt of one sample (its images, videos and audio clips), as
    ``prepare_inputs`` builds it."""
    n_images, n_videos, n_audios = (len(_as_lists([entry], 1, m)[0]) for m, entry in (("image", images), ("video", videos), ("audio", audios)))
    return format_prompt(processor, question, n_images, chat=True, n_videos=n_videos, n_audios=n_audios)


def answer_token_ids(processor: Any, prompt: str, answer: str) -> list[int]:
    """Token ids the answer adds after ``prompt`` (a formatted prompt string): tokenising the
    answer alone would differ for SentencePiece tokenizers (a lone leading-space token).
    An empty answer adds none."""
    if not answer.strip():
        return []
    tokenizer = processor.tokenizer
    before = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    after = tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    if after[: len(before)] != before or len(after) == len(before):
        raise ValueError(f"the answer {answer!r} does not tokenise as a continuation of the prompt")
    return after[len(before) :]
