"""Model inputs built by the model's own HF processor, carried with their ModalityMap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from mm_lens.modality import ModalityMap


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


def _as_image_lists(images: Sequence[ImagesPerPrompt] | None, n_prompts: int) -> list[list[Image.Image]]:
    if images is None:
        return [[] for _ in range(n_prompts)]
    if len(images) != n_prompts:
        raise ValueError(
            f"{n_prompts} prompts but {len(images)} image entries; pass one entry per prompt "
            "(an image, a list of images, or None)"
        )
    lists = []
    for entry in images:
        if entry is None:
            lists.append([])
        elif isinstance(entry, Image.Image):
            lists.append([entry])
        else:
            lists.append(list(entry))
    return lists


def format_prompt(processor: Any, text: str, n_images: int, chat: bool) -> str:
    """The prompt string for one sample: through the processor's chat template (one image
    entry per image, then the text) or, with ``chat=False``, ``text`` as given."""
    image_token = processor.image_token
    if not chat:
        if text.count(image_token) != n_images:
            raise ValueError(
                f"prompt has {text.count(image_token)} {image_token} tokens but {n_images} images "
                f"were given; put one {image_token} per image in the prompt, or use chat=True"
            )
        return text
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat template; pass chat=False and write the image tokens yourself")
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[ImagesPerPrompt] | None,
    *,
    chat: bool = True,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Tokenise prompts and preprocess images with the HF processor (one padded batch)."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per sample")
    if len(prompts) == 0:
        raise ValueError("no prompts: pass at least one")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    image_lists = _as_image_lists(images, len(prompts))
    texts = [format_prompt(processor, p, len(imgs), chat) for p, imgs in zip(prompts, image_lists)]
    flat_images = [image.convert("RGB") for imgs in image_lists for image in imgs]
    tokenizer, previous = processor.tokenizer, processor.tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        encoded = processor(text=texts, images=flat_images or None, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = previous
    return dict(encoded)


def sample_prompt(processor: Any, question: str, images: ImagesPerPrompt) -> str:
    """The chat prompt of one sample, as ``prepare_inputs`` builds it."""
    return format_prompt(processor, question, len(_as_image_lists([images], 1)[0]), chat=True)


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
