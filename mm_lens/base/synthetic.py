"""Synthetic multi-domain image-QA data: the organism's training and test samples.

Five image domains mirror MMNeuron's (driving, medical, remote sensing, documents, common
scenes), plus text-only questions (domain ``"text"``, image ``None``) for the modality analysis.
Every image is drawn in numpy from a seeded generator with big, bold shapes and colours, so a
small LLaVA trained from scratch (patch 8 on 32x32 images) can learn them. Each question type
has a few templates and a closed set of one-word answers, balanced within the type; the answer
is drawn first and the image rendered to match it, so it can only be read off the image.

=========  ============  ==========================================  ======
domain     question      answers                                     chance
=========  ============  ==========================================  ======
driving    car_color     blue yellow white black                     1/4
driving    light         red green                                   1/2
medical    lesion_where  left right top bottom                       1/4
medical    lesion_any    yes no                                      1/2
remote     land_cover    field water city desert                     1/4
document   line_count    one two three four                          1/4
document   table         yes no                                      1/2
scene      shape         circle square triangle                      1/3
scene      shape_color   red green blue yellow                       1/4
text       fact          fixed answer per question (12 facts)        1/12
=========  ============  ==========================================  ======

Samples are plain dicts: ``question``, ``image`` (RGB PIL image or ``None``), ``answer``,
``domain``, ``question_type``; an HF ``datasets.Dataset`` of the same columns (``image`` an
``Image`` feature, ``None`` for text-only rows) reads the same way.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

# DatasetDict subclasses dict[str, "Dataset"]; a runtime type checker (the tests' beartype)
# resolves that string in the module of the function it checks: Dataset must be a name here
from datasets import Dataset, DatasetDict  # noqa: F401
from PIL import Image

DOMAINS = ("driving", "medical", "remote", "document", "scene")
TEXT_DOMAIN = "text"
CHAT_WORDS = ("USER", "ASSISTANT", ":")  # the words of mm_lens.model.tiny's chat template

# domain -> question type -> (templates, answers)
QUESTIONS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "driving": {
        "car_color": (
            ("what color is the car", "which color is the car on the road"),
            ("blue", "yellow", "white", "black"),
        ),
        "light": (("is the light red or green", "is the traffic light red or green"), ("red", "green")),
    },
    "medical": {
        "lesion_where": (
            ("where is the lesion", "where is the lesion in the scan"),
            ("left", "right", "top", "bottom"),
        ),
        "lesion_any": (("is there a lesion", "is there a lesion in the scan"), ("yes", "no")),
    },
    "remote": {
        "land_cover": (
            ("what is the land cover", "what land cover is shown in this image"),
            ("field", "water", "city", "desert"),
        ),
    },
    "document": {
        "line_count": (
            ("how many lines of text are there", "how many lines are on the page"),
            ("one", "two", "three", "four"),
        ),
        "table": (("is there a table", "is there a table on the page"), ("yes", "no")),
    },
    "scene": {
        "shape": (("what shape is this", "what shape is in the image"), ("circle", "square", "triangle")),
        "shape_color": (("what color is the shape", "which color is the shape"), ("red", "green", "blue", "yellow")),
    },
}

# Text-only questions with one fixed answer each: learnable from text alone.
FACTS: dict[str, str] = {
    "what color is the sky": "blue",
    "what color is grass": "green",
    "what color is snow": "white",
    "what color is the sun": "yellow",
    "what color is coal": "black",
    "what color is blood": "red",
    "what shape is a ball": "circle",
    "what shape is a box": "square",
    "how many legs does a bird have": "two",
    "how many legs does a dog have": "four",
    "is fire hot": "yes",
    "is ice hot": "no",
}

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),  # None for text-only rows
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "domain": datasets.Value("string"),
        "question_type": datasets.Value("string"),
    }
)


def vocabulary(*, chat: bool = True) -> list[str]:
    """Every word of every question and answer (and, with ``chat``, of the chat template), in a
    fixed order: ``build_word_tokenizer(vocabulary())`` tokenizes all samples with no ``<unk>``."""
    words: dict[str, None] = dict.fromkeys(CHAT_WORDS if chat else ())
    for types in QUESTIONS.values():
        for templates, answers in types.values():
            for text in (*templates, *answers):
                words.update(dict.fromkeys(text.split()))
    for question, answer in FACTS.items():
        words.update(dict.fromkeys(f"{question} {answer}".split()))
    return list(words)


# ---------------------------------------------------------------------------------------------
# Drawing: float RGB canvases in [0, 255], geometry in unit coordinates (resolution-free).


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit coordinates (u right, v down) of the pixel centres."""
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size
    return u, v


def _canvas(size: int, color) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, dtype=np.float32), (size, size, 3)).copy()


def _finish(canvas: np.ndarray, rng: np.random.Generator, noise: float = 5.0) -> np.ndarray:
    canvas = canvas + rng.normal(0.0, noise, canvas.shape)
    return np.clip(canvas, 0, 255).round().astype(np.uint8)


def _jitter(rng: np.random.Generator, color, low: float = 0.9, high: float = 1.08) -> np.ndarray:
    return np.clip(np.asarray(color, dtype=np.float32) * rng.uniform(low, high), 0, 255)


def _ellipse(u, v, cx, cy, rx, ry=None) -> np.ndarray:
    ry = rx if ry is None else ry
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0


def _box(u, v, left, top, right, bottom) -> np.ndarray:
    return (u >= left) & (u <= right) & (v >= top) & (v <= bottom)


CAR_COLORS = {"blue": (40, 70, 215), "yellow": (240, 205, 35), "white": (245, 245, 245), "black": (20, 20, 25)}
SHAPE_COLORS = {"red": (220, 35, 35), "green": (35, 170, 60), "blue": (40, 80, 225), "yellow": (240, 210, 35)}
SCENE_BACKGROUNDS = ((150, 150, 150), (200, 190, 160), (150, 185, 175), (180, 170, 200), (95, 95, 105))


def _driving(rng, size, question_type, answer):
    """Sky, a grey road with a dashed lane, a car on the left, a traffic light on the right."""
    car = answer if question_type == "car_color" else rng.choice(list(CAR_COLORS))
    light = answer if question_type == "light" else rng.choice(["red", "green"])
    u, v = _grid(size)
    img = _canvas(size, _jitter(rng, (135, 190, 235), 0.85, 1.05))
    horizon = rng.uniform(0.36, 0.44)
    img[v > horizon] = _jitter(rng, (100, 100, 100), 0.85, 1.15)
    dash = ((u * 3 + rng.uniform()) % 1.0) < 0.5
    img[dash & (np.abs(v - 0.86) < 0.035)] = (235, 235, 225)
    x0, y0 = rng.uniform(0.03, 0.3), rng.uniform(-0.04, 0.04)
    img[_box(u, v, x0 + 0.09, 0.45 + y0, x0 + 0.33, 0.58 + y0)] = _jitter(rng, CAR_COLORS[car], 0.95, 1.03)
    img[_box(u, v, x0 + 0.13, 0.48 + y0, x0 + 0.29, 0.56 + y0)] = (170, 200, 225)  # windows
    img[_box(u, v, x0, 0.57 + y0, x0 + 0.44, 0.74 + y0)] = _jitter(rng, CAR_COLORS[car], 0.95, 1.03)
    for wheel in (x0 + 0.1, x0 + 0.34):
        img[_ellipse(u, v, wheel, 0.76 + y0, 0.06)] = (15, 15, 15)
    img[_box(u, v, 0.855, 0.3, 0.895, horizon + 0.15)] = (45, 45, 50)  # pole
    img[_box(u, v, 0.78, 0.04, 0.97, 0.42)] = (25, 25, 28)  # housing
    lamps = {"red": ((0.875, 0.14), (225, 30, 30)), "green": ((0.875, 0.32), (40, 220, 70))}
    for name, (centre, color) in lamps.items():
        img[_ellipse(u, v, *centre, 0.07)] = color if name == light else (70, 70, 70)
    return _finish(img, rng)


_LESION_OFFSETS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}


def _medical(rng, size, question_type, answer):
    """A grey oval body on black, shaded like a scan; a bright blob is the lesion."""
    u, v = _grid(size)
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03, 2)
    rx, ry = rng.uniform(0.36, 0.43), rng.uniform(0.34, 0.43)
    img = _canvas(size, [rng.uniform(0, 20)] * 3)
    r2 = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2
    tissue = rng.uniform(95, 125) * (1.0 - 0.3 * r2) + 12 * np.sin(9 * u + rng.uniform(0, 6)) * np.sin(7 * v)
    img[r2 <= 1] = tissue[r2 <= 1, None]
    if question_type == "lesion_where":
        side = answer
    else:
        side = rng.choice(list(_LESION_OFFSETS)) if answer == "yes" else None
    if side is not None:
        du, dv = _LESION_OFFSETS[side]
        bx = cx + du * rng.uniform(0.18, 0.23) + rng.uniform(-0.04, 0.04) * (du == 0)
        by = cy + dv * rng.uniform(0.18, 0.23) + rng.uniform(-0.04, 0.04) * (dv == 0)
        img[_ellipse(u, v, bx, by, rng.uniform(0.09, 0.12))] = rng.uniform(215, 250)
    return _finish(img, rng, noise=6.0)


def _remote(rng, size, question_type, answer):
    """Satellite-like texture filling the frame: crop rows, water, a city grid, or dunes."""
    u, v = _grid(size)
    angle = rng.uniform(0, np.pi)
    along = u * np.cos(angle) + v * np.sin(angle)
    if answer == "field":
        img = _canvas(size, _jitter(rng, (60, 145, 50)))
        rows = np.floor(along * size / rng.uniform(2.5, 4.0)) % 2 == 1
        img[rows] = _jitter(rng, (110, 170, 60))
        parcel = _box(u, v, *sorted(rng.uniform(0, 1, 2)), 1.0, 1.0)
        img[parcel] *= rng.uniform(0.8, 0.95)
    elif answer == "water":
        img = _canvas(size, _jitter(rng, (30, 75, 165)))
        img += (14 * np.sin(along * rng.uniform(10, 20) + rng.uniform(0, 6)))[..., None]
    elif answer == "city":
        img = _canvas(size, _jitter(rng, (75, 75, 80)))  # streets
        cells = int(rng.integers(3, 5))
        for i in range(cells):
            for j in range(cells):
                shade = rng.uniform(130, 215)
                img[_box(u, v, (i + 0.18) / cells, (j + 0.18) / cells, (i + 0.82) / cells, (j + 0.82) / cells)] = shade
    else:  # desert
        img = _canvas(size, _jitter(rng, (215, 185, 125)))
        img += (18 * np.sin(along * rng.uniform(8, 14) + 2 * np.sin(6 * u + 3 * v)))[..., None]
    return _finish(img, rng, noise=6.0)


_NUMBERS = ("one", "two", "three", "four")
_LINE_SLOTS = (0.16, 0.38, 0.6, 0.82)


def _text_line(img, u, v, rng, size, y, left=None, right=None):
    left = rng.uniform(0.07, 0.14) if left is None else left
    right = rng.uniform(0.7, 0.93) if right is None else right
    ink = rng.uniform(10, 45)
    line = _box(u, v, left, y - 0.06, right, y + 0.06)
    gaps = rng.uniform(left + 0.1, right - 0.05, int(rng.integers(1, 4)))
    for gap in gaps:  # word breaks, one pixel wide
        line &= np.abs(u - gap) > 0.5 / size
    img[line] = ink


def _document(rng, size, question_type, answer):
    """A white page with thick black text lines; sometimes a ruled table."""
    u, v = _grid(size)
    img = _canvas(size, _jitter(rng, (248, 246, 238), 0.95, 1.02))
    slots = [y + rng.uniform(-0.02, 0.02) for y in _LINE_SLOTS]
    if question_type == "line_count":
        n = _NUMBERS.index(answer) + 1
        first = int(rng.integers(0, len(slots) - n + 1))
        for y in slots[first : first + n]:
            _text_line(img, u, v, rng, size, y)
    elif answer == "yes":
        _text_line(img, u, v, rng, size, slots[0])
        top, bottom = rng.uniform(0.3, 0.36), rng.uniform(0.88, 0.95)
        left, right = rng.uniform(0.05, 0.12), rng.uniform(0.86, 0.95)
        rule = max(1, round(size / 32)) / size
        rows, cols = int(rng.integers(2, 4)), int(rng.integers(2, 4))
        for y in np.linspace(top, bottom, rows + 1):
            img[_box(u, v, left, y - rule / 2, right, y + rule / 2)] = 30
        for x in np.linspace(left, right, cols + 1):
            img[_box(u, v, x - rule / 2, top, x + rule / 2, bottom)] = 30
    else:
        for y in slots[: int(rng.integers(2, 5))]:
            _text_line(img, u, v, rng, size, y)
    return _finish(img, rng, noise=4.0)


def _scene(rng, size, question_type, answer):
    """One big coloured circle, square or triangle on a plain muted background."""
    shape = answer if question_type == "shape" else rng.choice(["circle", "square", "triangle"])
    color = answer if question_type == "shape_color" else rng.choice(list(SHAPE_COLORS))
    u, v = _grid(size)
    img = _canvas(size, _jitter(rng, SCENE_BACKGROUNDS[rng.integers(len(SCENE_BACKGROUNDS))]))
    cx, cy = 0.5 + rng.uniform(-0.06, 0.06, 2)
    s = rng.uniform(0.27, 0.33)
    if shape == "circle":
        mask = _ellipse(u, v, cx, cy, s)
    elif shape == "square":
        mask = _box(u, v, cx - 0.88 * s, cy - 0.88 * s, cx + 0.88 * s, cy + 0.88 * s)
    else:  # an upward triangle, apex at the top
        depth = (v - (cy - s)) / (1.9 * s)
        mask = (depth >= 0) & (depth <= 1) & (np.abs(u - cx) <= 1.15 * s * depth)
    img[mask] = _jitter(rng, SHAPE_COLORS[color], 0.92, 1.05)
    return _finish(img, rng)


RENDERERS: dict[str, Callable[[np.random.Generator, int, str, str], np.ndarray]] = {
    "driving": _driving,
    "medical": _medical,
    "remote": _remote,
    "document": _document,
    "scene": _scene,
}


# ---------------------------------------------------------------------------------------------
# Generation


def _rng(entropy: Sequence[int], domain: str) -> np.random.Generator:
    """One stream per domain, independent of which other domains are generated."""
    return np.random.default_rng([*entropy, zlib.crc32(domain.encode())])


def _plan(rng: np.random.Generator, n: int, answers_by_type: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """``n`` (question type, answer) pairs: types round-robin, answers cycling within each type
    (counts differ by at most one), in shuffled order."""
    types = list(answers_by_type)
    seen: Counter = Counter()
    plan = []
    for i in range(n):
        kind = types[i % len(types)]
        answers = answers_by_type[kind]
        plan.append((kind, answers[seen[kind] % len(answers)]))
        seen[kind] += 1
    return [plan[i] for i in rng.permutation(n)]


def _generate(
    n_per_domain: int, entropy: Sequence[int], image_size: int, domains: Sequence[str], text_only: int
) -> list[dict]:
    unknown = [d for d in domains if d not in QUESTIONS]
    if unknown:
        raise ValueError(
            f"unknown domains {unknown}; choose from {list(DOMAINS)} (text-only rows come from text_only=)"
        )
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small to draw on; use 16 or more (32 by default)")
    samples = []
    for domain in domains:
        rng = _rng(entropy, domain)
        types = QUESTIONS[domain]
        for kind, answer in _plan(rng, n_per_domain, {k: answers for k, (_, answers) in types.items()}):
            templates = types[kind][0]
            pixels = RENDERERS[domain](rng, image_size, kind, answer)
            question = templates[rng.integers(len(templates))]
            samples.append(
                {
                    "image": Image.fromarray(pixels),
                    "question": question,
                    "answer": answer,
                    "domain": domain,
                    "question_type": kind,
                }
            )
    rng = _rng(entropy, TEXT_DOMAIN)
    facts = list(FACTS.items())
    for i in rng.permutation(text_only):
        question, answer = facts[i % len(facts)]
        samples.append(
            {"image": None, "question": question, "answer": answer, "domain": TEXT_DOMAIN, "question_type": "fact"}
        )
    return samples


def generate_samples(
    n_per_domain: int,
    *,
    seed: int = 0,
    image_size: int = 32,
    domains: Sequence[str] = DOMAINS,
    text_only: int | None = None,
) -> list[dict]:
    """``n_per_domain`` samples of each image domain, then ``text_only`` text-only samples
    (default: ``n_per_domain``), grouped by domain. Deterministic for a seed; answers balanced
    within each question type. Images are ``image_size`` x ``image_size`` RGB."""
    text_only = n_per_domain if text_only is None else text_only
    return _generate(n_per_domain, (seed,), image_size, domains, text_only)


def build_dataset(
    folder: str | Path,
    n_per_domain: int,
    *,
    seed: int = 0,
    image_size: int = 32,
    splits: Mapping[str, float] = {"train": 0.8, "test": 0.2},
    domains: Sequence[str] = DOMAINS,
    text_only: int | None = None,
) -> DatasetDict:
    """Generate the data and ``save_to_disk`` it at ``folder`` as a ``DatasetDict``.

    ``splits`` maps each split to its share of ``n_per_domain`` (and of ``text_only``); each
    split is drawn from its own stream of ``seed``, so it is balanced on its own and images do
    not repeat across splits. Read it back with ``load_samples(folder, split)``.
    """
    text_only = n_per_domain if text_only is None else text_only
    parts = {}
    for index, (name, share) in enumerate(splits.items()):
        rows = _generate(round(n_per_domain * share), (seed, index + 1), image_size, domains, round(text_only * share))
        description = json.dumps({"generator": "mm_lens.base.synthetic", "seed": seed, "split": name, "image_size": image_size})
        parts[name] = datasets.Dataset.from_list(
            rows, features=FEATURES, info=datasets.DatasetInfo(description=description, features=FEATURES)
        )
    dataset = datasets.DatasetDict(parts)
    dataset.save_to_disk(str(folder))
    return dataset


def export_image_folder(samples: Iterable[Mapping[str, Any]], folder: str | Path) -> Path:
    """Write ``samples`` as PNG files plus ``data.jsonl`` (image path relative to ``folder``, or
    null), the plain layout ``load_samples`` also reads."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "data.jsonl", "w") as out:
        for i, sample in enumerate(samples):
            row = {key: value for key, value in sample.items() if key != "image"}
            row["image"] = None
            if sample["image"] is not None:
                row["image"] = f"images/{i:06d}.png"
                sample["image"].save(folder / row["image"])
            out.write(json.dumps(row) + "\n")
    return folder
