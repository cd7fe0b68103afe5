"""Synthetic multi-domain image-QA data: the organism's training and test samples.

Five image domains mirror MMNeuron's (driving, medical, remote sensing, documents, common
scenes), plus text-only questions (domain ``"text"``, image ``None``) for the modality analysis.
Every image is drawn in numpy from a seeded generator with big, bold objects in a few fixed
slots per domain (geometry in unit coordinates, so any size works), so a small LLaVA trained
from scratch (patch 8 on 32x32 images) can see them.

The questions are made so that the language model has work to do, per domain, on what the
vision tower hands it, and so that words mean different things in different domains:

- **shared answers**: ``one two three`` count cars, lesions, houses or text lines; ``yes
  no`` answer a different question in driving, medical and document; ``left right`` say
  where the river or a named shape is; colours name a stamp or a shape. Which image feature
  an answer word stands for is routed by the domain.
- **counting** (how many cars, lesions, houses, lines): the answer is a sum over the image.
- **claims to check against the image** (``is the light red``, ``is the lesion on the
  left``): the question names a value (a slot, from ``SLOTS``) that the image may contradict,
  so text and image compete; the answer is neither in the text nor in the picture alone.
- **compositions and bindings**: ``should the car stop`` is yes only when the light is red
  *and* the car has not passed the stop line (it is in the left half of the road);
  ``what color is the left shape`` and ``where is the red shape`` must find the shape the
  question names among two and read its other attribute.
- one whole-image question (remote ``land``) that a model picks up first.
- **questions that do not name their domain**: one of the two wordings of most types is
  shared or generic (``how many are there`` in four domains, ``is it on the left``, ``what
  color is it``), so what to count or look at must come from the picture's domain.
- **text-only facts**: 12 everyday ones and 108 about made-up creatures (``what color is the
  dax``), knowledge that only the text carries.

=========  ===========  ==============================================  ======
domain     question     answers (slot values)                           chance
=========  ===========  ==============================================  ======
driving    cars         one two three                                   1/3
driving    light        yes no (light: red green)                       1/2
driving    stop         yes no (red light and before the line)          1/2
medical    lesions      one two three                                   1/3
medical    lesion_side  yes no (side: left right)                       1/2
remote     land         field desert forest                             1/3
remote     houses       one two three                                   1/3
remote     water_where  left right                                      1/2
document   lines        one two three                                   1/3
document   stamp        red green blue yellow                           1/4
document   table        yes no                                          1/2
scene      shape_color  red green blue yellow (side: left right)        1/4
scene      shape_where  left right (color: red green blue yellow)       1/2
text       fact         fixed answer per question (120 facts)           19/120
=========  ===========  ==============================================  ======

Answers are balanced within each question type and, for each question text (template and
slot values), across its answers: the answer is drawn first and the image rendered to match
it, so no question gives its answer away, and the image alone does not either when the
question names a value.

Samples are plain dicts: ``question``, ``image`` (RGB PIL image or ``None``), ``answer``,
``domain``, ``question_type``; an HF ``datasets.Dataset`` of the same columns (``image`` an
``Image`` feature, ``None`` for text-only rows) reads the same way.
"""

from __future__ import annotations

import itertools
import json
import string
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

NUMBERS = ("one", "two", "three")
YES_NO = ("yes", "no")
COLORS = ("red", "green", "blue", "yellow")
LAND = ("field", "desert", "forest")
SIDES = ("left", "right")
SHAPES = ("circle", "square", "triangle")

# Values a question may name: ``{light}`` in a template is filled with one of SLOTS["light"].
SLOTS: dict[str, tuple[str, ...]] = {
    "light": ("red", "green"),
    "side": ("left", "right"),
    "color": COLORS,
}

# domain -> question type -> (templates, answers); templates may hold {slot} fields of SLOTS
QUESTIONS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "driving": {
        "cars": (("how many cars are there", "how many are there"), NUMBERS),
        "light": (("is the traffic light {light}", "is it {light}"), YES_NO),
        "stop": (("should the car stop", "must the car stop here"), YES_NO),
    },
    "medical": {
        "lesions": (("how many lesions are in the scan", "how many are there"), NUMBERS),
        "lesion_side": (("is the lesion on the {side}", "is it on the {side}"), YES_NO),
    },
    "remote": {
        "land": (("what is the land cover", "what land cover is shown"), LAND),
        "houses": (("how many houses are in this image", "how many are there"), NUMBERS),
        "water_where": (("on which side is the river", "where is it"), SIDES),
    },
    "document": {
        "lines": (("how many lines of text are there", "how many are there"), NUMBERS),
        "stamp": (("which color is the stamp on the page", "what color is it"), COLORS),
        "table": (("is there a table", "is there a table on the page"), YES_NO),
    },
    "scene": {
        "shape_color": (("what color is the {side} shape", "what color is the {side} one"), COLORS),
        "shape_where": (("where is the {color} shape", "where is the {color} one"), SIDES),
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


def _nonce_facts(n_creatures: int = 36) -> dict[str, str]:
    """Facts about made-up creatures (``what color is the dax``, ``how many legs does the dax
    have``, ``is the dax wild``), answers drawn from a fixed seed among the words the images'
    questions answer with: memorised knowledge that only the text carries, in the LM's MLPs,
    competing with what the pictures say for the same answer words."""
    rng = np.random.default_rng(20261205)
    onsets, vowels, codas = "bdfgklmnprstvwz", "aeiou", "bdgklmnprstx"
    names: list[str] = []
    while len(names) < n_creatures:
        name = str(rng.choice(list(onsets))) + str(rng.choice(list(vowels))) + str(rng.choice(list(codas)))
        if name not in names and name not in {"dog", "sun", "bed", "pin", "ten"}:
            names.append(name)
    facts = {}
    for name in names:
        facts[f"what color is the {name}"] = str(rng.choice(COLORS))
        facts[f"how many legs does the {name} have"] = str(rng.choice((*NUMBERS, "four")))
        facts[f"is the {name} wild"] = str(rng.choice(YES_NO))
    return facts


FACTS.update(_nonce_facts())

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),  # None for text-only rows
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "domain": datasets.Value("string"),
        "question_type": datasets.Value("string"),
    }
)


def _slot_names(template: str) -> tuple[str, ...]:
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def _questions(templates: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """Every filled-in question of a type with its slot values, in a fixed order: templates,
    then slot values (the first slot varying slowest)."""
    names = _slot_names(templates[0])
    for template in templates:
        if _slot_names(template) != names:
            raise ValueError(f"templates {list(templates)} name different slots; give every template of a type the same")
    filled = []
    for template in templates:
        for values in itertools.product(*(SLOTS[name] for name in names)):
            slots = dict(zip(names, values))
            filled.append((template.format(**slots), slots))
    return filled


def vocabulary(*, chat: bool = True) -> list[str]:
    """Every word of every question (slots filled in) and answer, and with ``chat`` of the chat
    template, in a fixed order: ``build_word_tokenizer(vocabulary())`` tokenizes all samples
    with no ``<unk>``."""
    words: dict[str, None] = dict.fromkeys(CHAT_WORDS if chat else ())
    for types in QUESTIONS.values():
        for templates, answers in types.values():
            for text in (*(question for question, _ in _questions(templates)), *answers):
                words.update(dict.fromkeys(text.split()))
    for question, answer in FACTS.items():
        words.update(dict.fromkeys(f"{question} {answer}".split()))
    return list(words)


# ---------------------------------------------------------------------------------------------
# Drawing: float RGB canvases in [0, 255], geometry in unit coordinates (resolution-free).
# Objects are big (each covers several of the organism's 8-pixel patches) and sit in a few
# fixed slots per domain, jittered a little, so that counts and sides are unambiguous.


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


def _pick(rng: np.random.Generator, slots: Sequence[tuple[float, float]], n: int, jitter: float = 0.02) -> list[tuple[float, float]]:
    """``n`` distinct slots (unit centres ``(u, v)``), each jittered by up to ``jitter``."""
    return [
        (slots[i][0] + rng.uniform(-jitter, jitter), slots[i][1] + rng.uniform(-jitter, jitter))
        for i in rng.choice(len(slots), size=n, replace=False)
    ]


def _other(rng: np.random.Generator, values: Sequence[str], *not_these: str) -> str:
    return str(rng.choice([v for v in values if v not in not_these]))


def _count(answer: str) -> int:
    return NUMBERS.index(answer) + 1


def _side_of(rng: np.random.Generator, kind: str, answer: str, slots: Mapping[str, str]) -> str:
    """The side the picture shows: the answer of a question asking where; for a claim about
    the side, the named side when the answer is yes and the other one when no; otherwise either."""
    if kind.endswith("_where"):
        return answer
    if kind.endswith("_side"):
        return slots["side"] if answer == "yes" else _other(rng, SIDES, slots["side"])
    return str(rng.choice(SIDES))


CAR_COLORS = {"blue": (40, 70, 215), "yellow": (240, 205, 35), "white": (245, 245, 245), "black": (20, 20, 25)}
PALETTE = {"red": (220, 35, 35), "green": (35, 170, 60), "blue": (40, 80, 225), "yellow": (240, 210, 35)}
SCENE_BACKGROUNDS = ((150, 150, 150), (200, 190, 160), (150, 185, 175), (180, 170, 200), (95, 95, 105))
LAMPS = {"red": ((0.84, 0.14), (230, 30, 30)), "green": ((0.84, 0.36), (40, 225, 70))}
STOP_LINE = 0.5  # cars drive right, towards the light; the left road slots are before the line
CAR_SLOTS = ((0.25, 0.62), (0.75, 0.62), (0.25, 0.86), (0.75, 0.86))


def _car(img, u, v, rng, cx, cy) -> None:
    """A car about a third of the picture wide: body, roof with a window, two dark wheels."""
    color = _jitter(rng, CAR_COLORS[str(rng.choice(list(CAR_COLORS)))], 0.95, 1.03)
    img[_box(u, v, cx - 0.17, cy - 0.02, cx + 0.17, cy + 0.06)] = color
    img[_box(u, v, cx - 0.09, cy - 0.08, cx + 0.09, cy - 0.02)] = color
    img[_box(u, v, cx - 0.06, cy - 0.07, cx + 0.06, cy - 0.03)] = (170, 200, 225)
    for wheel in (cx - 0.1, cx + 0.1):
        img[_ellipse(u, v, wheel, cy + 0.07, 0.035)] = (15, 15, 15)


def _driving(rng, size, kind, answer, slots):
    """Sky over a grey road with a stop line in the middle; a traffic light (one lamp lit) in
    the top right; cars in the four road slots, driving right towards the light."""
    if kind == "light":
        light = slots["light"] if answer == "yes" else _other(rng, SLOTS["light"], slots["light"])
    elif kind == "stop":
        light, passed = ("red", False) if answer == "yes" else [("red", True), ("green", False), ("green", True)][rng.integers(3)]
    else:
        light = str(rng.choice(SLOTS["light"]))
    if kind == "stop":
        cars = _pick(rng, [s for s in CAR_SLOTS if (s[0] > STOP_LINE) == passed], 1)
    else:
        cars = _pick(rng, CAR_SLOTS, _count(answer) if kind == "cars" else int(rng.integers(1, 4)))
    u, v = _grid(size)
    img = _canvas(size, _jitter(rng, (135, 190, 235), 0.85, 1.05))
    img[v >= 0.5] = _jitter(rng, (100, 100, 100), 0.85, 1.15)
    img[(v >= 0.5) & (np.abs(u - STOP_LINE) < 0.02)] = (240, 240, 235)
    img[_box(u, v, 0.82, 0.46, 0.86, 0.5)] = (45, 45, 50)  # pole
    img[_box(u, v, 0.74, 0.03, 0.94, 0.47)] = (25, 25, 28)  # housing
    for name, (centre, color) in LAMPS.items():
        img[_ellipse(u, v, *centre, 0.08)] = color if name == light else (70, 70, 70)
    for centre in cars:
        _car(img, u, v, rng, *centre)
    return _finish(img, rng)


LESION_SLOTS = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))


def _medical(rng, size, kind, answer, slots):
    """A grey oval body on black, shaded like a scan; big bright round lesions in its four
    quadrants."""
    if kind == "lesions":
        lesions = _pick(rng, LESION_SLOTS, _count(answer), 0.03)
    else:
        side = _side_of(rng, kind, answer, slots)
        lesions = _pick(rng, [s for s in LESION_SLOTS if (s[0] < 0.5) == (side == "left")], 1, 0.03)
    u, v = _grid(size)
    cx, cy = 0.5 + rng.uniform(-0.02, 0.02, 2)
    rx, ry = rng.uniform(0.44, 0.49), rng.uniform(0.44, 0.49)
    img = _canvas(size, [rng.uniform(0, 20)] * 3)
    r2 = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2
    tissue = rng.uniform(90, 120) * (1.0 - 0.3 * r2) + 10 * np.sin(9 * u + rng.uniform(0, 6)) * np.sin(7 * v)
    img[r2 <= 1] = tissue[r2 <= 1, None]
    for centre in lesions:
        img[_ellipse(u, v, *centre, rng.uniform(0.1, 0.12))] = rng.uniform(215, 250)
    return _finish(img, rng, noise=6.0)


HOUSE_SLOTS = ((0.39, 0.27), (0.61, 0.27), (0.39, 0.73), (0.61, 0.73))


def _remote(rng, size, kind, answer, slots):
    """A satellite view: field rows, desert dunes or forest crowns filling the frame, a river
    along the left or right edge, white houses with red roofs in the four middle slots."""
    side = _side_of(rng, kind, answer, slots)
    land = answer if kind == "land" else str(rng.choice(LAND))
    u, v = _grid(size)
    angle = rng.uniform(0, np.pi)
    along = u * np.cos(angle) + v * np.sin(angle)
    if land == "field":
        img = _canvas(size, _jitter(rng, (95, 165, 55)))
        img[np.floor(along * 10 * rng.uniform(0.8, 1.2)) % 2 == 1] = _jitter(rng, (140, 185, 70))
    elif land == "desert":
        img = _canvas(size, _jitter(rng, (215, 185, 125)))
        img += (14 * np.sin(along * rng.uniform(8, 14) + 2 * np.sin(6 * u + 3 * v)))[..., None]
    else:  # forest: dark crowns on darker ground
        img = _canvas(size, _jitter(rng, (25, 70, 30)))
        for cx, cy in rng.uniform(0, 1, (14, 2)):
            img[_ellipse(u, v, cx, cy, rng.uniform(0.06, 0.1))] = _jitter(rng, (45, 105, 45))
    middle = (0.11 if side == "left" else 0.89) + 0.02 * np.sin(v * rng.uniform(5, 9) + rng.uniform(0, 6))
    img[np.abs(u - middle) < rng.uniform(0.09, 0.11)] = _jitter(rng, (30, 75, 165))
    for hx, hy in _pick(rng, HOUSE_SLOTS, _count(answer) if kind == "houses" else int(rng.integers(1, 4))):
        img[_box(u, v, hx - 0.08, hy - 0.08, hx + 0.08, hy + 0.08)] = _jitter(rng, (235, 235, 230), 0.95, 1.05)
        img[_box(u, v, hx - 0.08, hy - 0.08, hx + 0.08, hy - 0.02)] = _jitter(rng, (185, 40, 30))
    return _finish(img, rng, noise=6.0)


LINE_ROWS = (0.14, 0.38, 0.62, 0.86)


def _text_line(img, u, v, rng, size, y, left=0.05, right=None) -> None:
    right = rng.uniform(0.55, 0.68) if right is None else right
    line = _box(u, v, left, y - 0.06, right, y + 0.06)
    for gap in rng.uniform(left + 0.1, right - 0.05, int(rng.integers(1, 3))):  # word breaks, one pixel wide
        line &= np.abs(u - gap) > 0.5 / size
    img[line] = rng.uniform(10, 45)


def _document(rng, size, kind, answer, slots):
    """A white page: thick black text lines across its left part (one per row slot), or one
    line over a ruled table; a big coloured square stamp in the right column."""
    u, v = _grid(size)
    img = _canvas(size, _jitter(rng, (248, 246, 238), 0.95, 1.02))
    rows = [y + rng.uniform(-0.02, 0.02) for y in LINE_ROWS]
    if kind == "table" and answer == "yes":
        _text_line(img, u, v, rng, size, rows[0])
        top, bottom = rng.uniform(0.3, 0.36), rng.uniform(0.88, 0.95)
        left, right = rng.uniform(0.04, 0.08), rng.uniform(0.6, 0.68)
        rule = max(1, round(size / 32)) / size
        for y in np.linspace(top, bottom, int(rng.integers(2, 4)) + 1):
            img[_box(u, v, left, y - rule / 2, right, y + rule / 2)] = 30
        for x in np.linspace(left, right, int(rng.integers(2, 4)) + 1):
            img[_box(u, v, x - rule / 2, top, x + rule / 2, bottom)] = 30
    else:
        n = _count(answer) if kind == "lines" else int(rng.integers(2, 4)) if kind == "table" else int(rng.integers(1, 4))
        for r in sorted(rng.choice(len(rows), size=n, replace=False)):
            _text_line(img, u, v, rng, size, rows[r])
    stamp = answer if kind == "stamp" else str(rng.choice(COLORS))
    sx, sy = 0.85 + rng.uniform(-0.02, 0.02), rng.uniform(0.15, 0.85)
    img[_box(u, v, sx - 0.12, sy - 0.12, sx + 0.12, sy + 0.12)] = _jitter(rng, PALETTE[stamp], 0.92, 1.05)
    return _finish(img, rng, noise=4.0)


def _shape(u, v, kind, cx, cy, s) -> np.ndarray:
    if kind == "circle":
        return _ellipse(u, v, cx, cy, s)
    if kind == "square":
        return _box(u, v, cx - 0.85 * s, cy - 0.85 * s, cx + 0.85 * s, cy + 0.85 * s)
    depth = (v - (cy - s)) / (1.9 * s)  # an upward triangle, apex at the top
    return (depth >= 0) & (depth <= 1) & (np.abs(u - cx) <= 1.1 * s * depth)


def _scene(rng, size, kind, answer, slots):
    """Two big shapes of different kinds and colours, one in each half, on a muted background;
    the question names one by its side (asking its colour) or by its colour (asking its side)."""
    side, color = (slots["side"], answer) if kind == "shape_color" else (answer, slots["color"])
    named, other = (str(k) for k in rng.choice(SHAPES, size=2, replace=False))
    other_color = _other(rng, COLORS, color)
    left, right = ((named, color), (other, other_color)) if side == "left" else ((other, other_color), (named, color))
    u, v = _grid(size)
    img = _canvas(size, _jitter(rng, SCENE_BACKGROUNDS[rng.integers(len(SCENE_BACKGROUNDS))]))
    for (shape, shape_color), cx in ((left, 0.25), (right, 0.75)):
        mask = _shape(u, v, shape, cx + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.12, 0.12), rng.uniform(0.17, 0.21))
        img[mask] = _jitter(rng, PALETTE[shape_color], 0.92, 1.05)
    return _finish(img, rng)


RENDERERS: dict[str, Callable[[np.random.Generator, int, str, str, dict[str, str]], np.ndarray]] = {
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


def _plan(rng: np.random.Generator, n: int, types: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> list[tuple[str, str, str, dict[str, str]]]:
    """``n`` (question type, answer, question, slots): types round-robin; within a type the
    answers cycle fastest, then the filled-in questions, so answers are balanced (counts differ
    by at most one) within each type and within each question text; in shuffled order."""
    names = list(types)
    questions = {kind: _questions(templates) for kind, (templates, _) in types.items()}
    seen: Counter = Counter()
    plan = []
    for i in range(n):
        kind = names[i % len(names)]
        answers, j = types[kind][1], seen[kind]
        question, slots = questions[kind][(j // len(answers)) % len(questions[kind])]
        plan.append((kind, answers[j % len(answers)], question, slots))
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
        for kind, answer, question, slots in _plan(rng, n_per_domain, QUESTIONS[domain]):
            pixels = RENDERERS[domain](rng, image_size, kind, answer, slots)
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
