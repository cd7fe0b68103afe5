"""Image-QA samples on disk: loading, checking them before any work starts, and chance levels.

Samples are plain dicts (or rows of an HF ``datasets.Dataset``): ``question``, ``image`` (RGB
PIL image or ``None`` for text-only rows), ``answer``, ``domain`` and optionally
``question_type``. ``mm_lens.base.synthetic`` draws such samples; this module reads them.
"""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
from datasets import Dataset
from tqdm.auto import tqdm

Samples = Dataset | Sequence[Mapping[str, Any]]

REQUIRED_COLUMNS = ("image", "question", "answer", "domain")


def _check_columns(names: Sequence[str], where: str) -> None:
    for column in REQUIRED_COLUMNS:
        if column not in names:
            raise ValueError(
                f"{where} has no {column!r} column; it has {list(names)}. Samples need {list(REQUIRED_COLUMNS)}"
            )


TEXT_COLUMNS = ("question", "answer", "domain")
SHOWN_PROBLEMS = 5  # problems listed in one error; the rest are counted


def _image_problem(image: Any, folder: Path | None) -> str | None:
    """Why ``image`` (``None``, a PIL image, a file path, or an ``Image(decode=False)`` cell
    ``{"bytes", "path"}``) cannot be used as a picture, or ``None`` when it can."""
    if image is None or isinstance(image, PIL.Image.Image):
        return None
    if isinstance(image, Mapping):
        name = image.get("path") or "(stored bytes)"
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image.get("path")
    elif isinstance(image, (str, Path)):
        source = Path(image) if folder is None or Path(image).is_absolute() else folder / image
        name = str(source)
        if not source.is_file():
            return f"image file {source} does not exist"
    else:
        return f"image is a {type(image).__name__}, not a picture, a file path or None"
    try:
        with PIL.Image.open(source) as picture:
            picture.load()  # decode every pixel: a truncated file fails here, not in batch 40
    except (OSError, SyntaxError, ValueError, TypeError) as error:
        return f"image {name} cannot be decoded ({error})"
    return None


def _row_problems(row: Mapping[str, Any], folder: Path | None) -> list[str]:
    problems = []
    for column in TEXT_COLUMNS:
        value = row.get(column)
        if column in row and (not isinstance(value, str) or not value.strip()):
            problems.append(f"{column} is {value!r}, not a non-empty string")
    image = _image_problem(row.get("image"), folder)
    return problems + ([image] if image else [])


def _raise_problems(problems: list[str], where: str) -> None:
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise ValueError(f"{where}: {len(problems)} unusable row(s), found before any work started: {shown}{more}. Fix or remove them")


def check_samples(samples: Samples, where: str = "samples", *, progress: bool = False) -> None:
    """Refuse samples that would fail, or silently mislead, part-way through a run: every
    ``question``, ``answer`` and ``domain`` present must be a non-empty string and every image
    must decode (each one is decoded once, here). The error names each bad row (the first
    few, and how many in all). ``samples``: a ``datasets.Dataset`` or a list of dicts."""
    rows: Iterable[Mapping[str, Any]] = samples
    if isinstance(samples, Dataset) and isinstance(samples.features.get("image"), datasets.Image):
        rows = samples.cast_column("image", datasets.Image(decode=False))  # decode ourselves, naming the row
    problems = []
    for number, row in enumerate(tqdm(rows, desc="checking samples", disable=not progress, unit="row")):
        problems += [f"row {number}: {problem}" for problem in _row_problems(row, None)]
    _raise_problems(problems, where)


def _load_jsonl(path: Path, columns: Mapping[str, str]) -> Dataset:
    rows, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: a row must be a JSON object, got {type(row).__name__}")
        for old, new in columns.items():
            if old in row:
                row[new] = row.pop(old)
        _check_columns(list(row), f"{path}, line {number}")
        problems += [f"line {number}: {problem}" for problem in _row_problems(row, path.parent)]
        if isinstance(row["image"], str):
            row["image"] = str(path.parent / row["image"])  # an absolute path stays as it is
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    _raise_problems(problems, str(path))
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())  # decoded on access


def load_samples(
    path: str | Path, split: str | None = None, *, columns: Mapping[str, str] | None = None, progress: bool = False
) -> Dataset:
    """Image-QA samples from disk, as a ``datasets.Dataset`` whose rows are dicts with a PIL
    ``image`` (or ``None``), ``question``, ``answer`` and ``domain``.

    ``path`` is a ``save_to_disk`` folder (a ``Dataset``, or a ``DatasetDict`` with ``split``
    naming one of its splits; a single split is taken without it), or a folder with
    ``data.jsonl`` (or that file itself) whose ``image`` is a file path relative to it, or null.
    ``columns`` renames other datasets' columns to ours, e.g. ``{"img": "image"}``. Every row
    is checked before it is returned (``check_samples``: texts non-empty, images decodable;
    JSONL errors name the file and line), so no run fails part-way on a bad row.
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
    check_samples(dataset, str(path), progress=progress)
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
