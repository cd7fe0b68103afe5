"""Image-QA samples on disk: loading, checking them before any work starts, and chance levels.

Samples are plain dicts (or rows of an HF ``datasets.Dataset``): ``question``, ``image`` (RGB
PIL image or ``None`` for text-only rows), ``answer``, ``domain`` and optionally
``question_type``. ``mm_lens.base.synthetic`` draws such samples; this module reads them.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

REQUIRED_COLUMNS = ("image", "question", "answer", "domain")


def _check_columns(names: Sequence[str], where: str) -> None:
    for column in REQUIRED_COLUMNS:
        if column not in names:
            raise ValueError(
                f"{where} has no {column!r} column; it has {list(names)}. Samples need {list(REQUIRED_COLUMNS)}"
            )


def _load_jsonl(path: Path, columns: Mapping[str, str]) -> Dataset:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no rows")
    for number, row in enumerate(rows, start=1):
        for old, new in columns.items():
            if old in row:
                row[new] = row.pop(old)
        _check_columns(list(row), f"row {number} of {path}")
        if row["image"] is not None:
            image = Path(row["image"])
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise FileNotFoundError(f"row {number} of {path}: image file {image} does not exist")
            row["image"] = str(image)
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())  # decoded on access


def load_samples(
    path: str | Path, split: str | None = None, *, columns: Mapping[str, str] | None = None
) -> Dataset:
    """Image-QA samples from disk, as a ``datasets.Dataset`` whose rows are dicts with a PIL
    ``image`` (or ``None``), ``question``, ``answer`` and ``domain``.

    ``path`` is a ``save_to_disk`` folder (a ``Dataset``, or a ``DatasetDict`` with ``split``
    naming one of its splits; a single split is taken without it), or a folder with
    ``data.jsonl`` (or that file itself) whose ``image`` is a file path relative to it, or null.
    ``columns`` renames other datasets' columns to ours, e.g. ``{"img": "image"}``.
    """
    path, columns = Path(path), dict(columns or {})
    if path.is_dir() and (path / "data.jsonl").is_file():
        path = path / "data.jsonl"
    if path.is_file() and path.suffix == ".jsonl":
        return _load_jsonl(path, columns)
    if not (path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))):
        raise ValueError(f"{path} is neither a save_to_disk folder nor a folder with data.jsonl")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split is None and len(dataset) == 1:
            split = next(iter(dataset))
        if split not in dataset:
            raise ValueError(f"{path} holds splits {list(dataset)}; pass split= one of them (got {split!r})")
        dataset = dataset[split]
    if columns:
        dataset = dataset.rename_columns(columns)
    _check_columns(dataset.column_names, str(path))
    if dataset.features["image"] == datasets.Value("string"):  # file paths
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


# ---------------------------------------------------------------------------------------------
# Reporting


DEFAULT_DATA = Path(__file__).parents[1] / "assets" / "default_data"


def load_default_samples(split: str = "test") -> Dataset:
    """The held-out synthetic samples shipped with the default model (all six domains)."""
    if not DEFAULT_DATA.exists():
        raise FileNotFoundError(f"the default data is missing from {DEFAULT_DATA}; run scripts/train_default_model.py")
    return load_samples(DEFAULT_DATA, split)


def chance_accuracy(samples: Sequence[Mapping[str, Any]] | Dataset, *, how: str = "majority") -> dict[str, float]:
    """Accuracy of guessing without the image, per domain: within each question type (the
    domain itself when there is no ``question_type``) always the most frequent answer
    (``"majority"``) or a uniform pick among the answers seen (``"uniform"``); averaged over the
    domain's samples."""
    if how not in ("majority", "uniform"):
        raise ValueError(f"how={how!r}; use 'majority' or 'uniform'")
    columns = samples.column_names if hasattr(samples, "column_names") else None
    domains = samples["domain"] if columns else [s["domain"] for s in samples]
    answers = samples["answer"] if columns else [s["answer"] for s in samples]
    if columns is not None:
        types = samples["question_type"] if "question_type" in columns else domains
    else:
        types = [s.get("question_type", s["domain"]) for s in samples]
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for domain, kind, answer in zip(domains, types, answers):
        counts[domain, kind][answer] += 1
    hits: dict[str, float] = defaultdict(float)
    sizes: Counter = Counter()
    for (domain, _), answer_counts in counts.items():
        total = sum(answer_counts.values())
        guess = max(answer_counts.values()) / total if how == "majority" else 1 / len(answer_counts)
        hits[domain] += guess * total
        sizes[domain] += total
    return {domain: hits[domain] / sizes[domain] for domain in sizes}
