"""Samples (mappings with ``question``, ``image``/``video``/``audio``, ``answer``, ``domain``,
or rows of an HF ``datasets.Dataset``) and the model batches made from them."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import datasets

from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.inputs import sample_prompt

Sample = Mapping[str, Any]  # "question" (str), "image" (PIL image, list of them, or None), "domain" (str)
# a list of samples, or an HF dataset of the same columns (its rows are samples; it is no
# collections.abc.Sequence, so it is named here)
Samples = Sequence[Sample] | datasets.Dataset


def sample_column(samples: Samples, name: str) -> list[Any]:
    """One column of a list of dicts or of an HF ``datasets.Dataset``."""
    if hasattr(samples, "column_names"):
        if name not in samples.column_names:
            raise ValueError(f"the dataset has no {name!r} column; it has {samples.column_names}")
        return list(samples[name])
    try:
        return [sample[name] for sample in samples]
    except KeyError as error:
        raise ValueError(f"a sample has no {name!r} field; samples need question, image and domain") from error


def chunk_media(chunk: Sequence[Sample]) -> dict[str, list[Any]]:
    """``prepare_inputs`` keywords for the media of some samples: ``images`` (from ``image``),
    and where any sample has one, ``videos`` (``video``, frames) and ``audios`` (``audio``,
    a waveform)."""
    media = {"images": [s.get("image") for s in chunk]}
    for keyword, name in (("videos", "video"), ("audios", "audio")):
        if any(s.get(name) is not None for s in chunk):
            media[keyword] = [s.get(name) for s in chunk]
    return media


def prompt_batch(model: HookedMLLM, chunk: Sequence[Sample]) -> Any:
    """The model batch of some samples' questions and media (chat template, left padding)."""
    return model.prepare_inputs([s["question"] for s in chunk], **chunk_media(chunk))


def chat_prompt(model: HookedMLLM, sample: Sample) -> str:
    """The chat prompt ``prompt_batch`` builds for one sample, as text."""
    return sample_prompt(model.processor, sample["question"], sample.get("image"), videos=sample.get("video"), audios=sample.get("audio"))


def sample_chunks(samples: Samples, batch_size: int) -> Iterator[tuple[int, list[Sample]]]:
    """``(start index, samples)`` of consecutive chunks of ``batch_size`` samples."""
    for start in range(0, len(samples), batch_size):
        yield start, [samples[i] for i in range(start, min(start + batch_size, len(samples)))]


def with_images(samples: Samples) -> list[Sample]:
    """The samples that have an image."""
    return [samples[i] for i, image in enumerate(sample_column(samples, "image")) if image is not None]


def first_per_domain(samples: Samples, n: int) -> list[Sample]:
    """The first ``n`` samples of each domain, in order."""
    taken: dict[str, int] = {}
    chosen = []
    for i, domain in enumerate(sample_column(samples, "domain")):
        if taken.get(domain, 0) < n:
            taken[domain] = taken.get(domain, 0) + 1
            chosen.append(samples[i])
    return chosen
