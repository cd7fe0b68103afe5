"""Synthetic multi-domain image-QA data."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mm_lens.base.synthetic import (
    DOMAINS,
    FACTS,
    PALETTE,
    QUESTIONS,
    SLOTS,
    TEXT_DOMAIN,
    generate_samples,
    vocabulary,
)
from mm_lens.model.tiny.common import build_word_tokenizer


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def same_rows(a, b) -> bool:
    keys = ("question", "answer", "domain", "question_type")
    if [[r[k] for k in keys] for r in a] != [[r[k] for k in keys] for r in b]:
        return False
    return all(
        (x["image"] is None and y["image"] is None) or np.array_equal(pixels(x["image"]), pixels(y["image"]))
        for x, y in zip(a, b)
    )


@pytest.fixture(scope="module")
def samples():
    return generate_samples(12, seed=0)


def test_generation_is_deterministic_for_a_seed_and_differs_across_seeds(samples):
    assert same_rows(samples, generate_samples(12, seed=0))
    assert not same_rows(samples, generate_samples(12, seed=1))


def test_every_domain_is_present_with_balanced_answers_per_question_type():
    rows = generate_samples(40, seed=3, text_only=24)
    assert Counter(r["domain"] for r in rows) == {**{d: 40 for d in DOMAINS}, TEXT_DOMAIN: 24}
    for domain, types in QUESTIONS.items():
        for kind, (_, answers) in types.items():
            counts = Counter(r["answer"] for r in rows if r["question_type"] == kind)
            assert set(counts) == set(answers), (domain, kind)
            assert max(counts.values()) - min(counts.values()) <= 1, (domain, kind, counts)


def test_images_are_rgb_of_the_requested_size():
    for size in (32, 48):
        rows = generate_samples(4, seed=0, image_size=size, text_only=0)
        assert {(r["image"].mode, r["image"].size) for r in rows} == {("RGB", (size, size))}


def test_text_only_samples_have_no_image_and_a_fixed_answer(samples):
    text = [r for r in samples if r["domain"] == TEXT_DOMAIN]
    assert len(text) == 12
    assert all(r["image"] is None and FACTS[r["question"]] == r["answer"] for r in text)
    assert all(r["image"] is not None for r in samples if r["domain"] != TEXT_DOMAIN)


def test_no_image_question_gives_its_answer_away():
    rows = generate_samples(80, seed=0, text_only=0)
    for question in {r["question"] for r in rows}:
        answers = Counter(r["answer"] for r in rows if r["question"] == question)
        assert len(answers) > 1, question
        assert max(answers.values()) / sum(answers.values()) < 0.7, (question, answers)


def test_questions_name_every_value_of_their_slots():
    rows = generate_samples(80, seed=0, text_only=0)
    for name, values in SLOTS.items():
        kinds = {kind for types in QUESTIONS.values() for kind, (templates, _) in types.items() if "{" + name + "}" in templates[0]}
        assert kinds, name
        for kind in kinds:
            named = Counter(w for r in rows if r["question_type"] == kind for w in r["question"].split() if w in values)
            assert set(named) == set(values), (kind, named)


def test_answer_words_are_shared_across_domains():
    domains_of: dict[str, set[str]] = {}
    for domain, types in QUESTIONS.items():
        for _, answers in types.values():
            for answer in answers:
                domains_of.setdefault(answer, set()).add(domain)
    assert domains_of["yes"] == domains_of["no"] and len(domains_of["yes"]) >= 3
    assert len(domains_of["two"]) >= 3
    assert len(domains_of["left"]) >= 2
    assert len(domains_of["red"]) >= 2


# ---------------------------------------------------------------------------------------------
# Reading the answer off the pixels, given the question: one small reader per question type,
# knowing only the layout (a few fixed slots per domain) and the colours.


def quadrants(mask: np.ndarray) -> np.ndarray:
    """How many pixels of ``mask`` fall in each quadrant: [[top left, top right], [bottom ...]]."""
    half = mask.shape[0] // 2
    return mask.reshape(2, half, 2, half).sum((1, 3))


def nearest_color(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda name: np.abs(rgb - np.array(PALETTE[name]) / 255).sum())


def lit_lamp(x: np.ndarray) -> str:
    size = x.shape[0]
    red, green = x[int(0.14 * size), int(0.84 * size)], x[int(0.36 * size), int(0.84 * size)]
    return "red" if red[0] - red[1] > green[1] - green[0] else "green"


def car_slots(x: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Road slots holding a car, [[upper lane left, right], [lower lane left, right]]: pixels
    unlike the road, the stop line aside, in the lower half cut at v = 0.74 and u = 0.5."""
    road = v >= 0.5
    car = (np.abs(x - np.median(x[road], axis=0)).max(-1) > 0.2) & road & (np.abs(u - 0.5) > 0.03)
    lanes = [car & (v < 0.74), car & (v >= 0.74)]
    return np.array([[(lane & (u < 0.5)).sum(), (lane & (u >= 0.5)).sum()] for lane in lanes]) >= 0.03 * x.shape[0] ** 2


def scene_shapes(x: np.ndarray, u: np.ndarray) -> dict[str, str]:
    """Side -> colour of the shape in each half (pixels unlike the background)."""
    shape = np.abs(x - np.median(x, axis=(0, 1))).max(-1) > 0.15
    return {side: nearest_color(x[shape & half].mean(0)) for side, half in (("left", u < 0.5), ("right", u >= 0.5))}


def land_cover(x: np.ndarray) -> str:
    """Field is light green, forest dark green, desert sand (the river and houses are few pixels)."""
    r, g, _ = np.median(x.reshape(-1, 3), axis=0)
    return "desert" if r > g - 0.05 else "forest" if g < 0.5 else "field"


def read_answer(sample) -> str:
    x, kind = pixels(sample["image"]), sample["question_type"]
    slots = {name: w for name, values in SLOTS.items() for w in sample["question"].split() if w in values}
    v, u = (np.mgrid[0 : x.shape[0], 0 : x.shape[1]] + 0.5) / x.shape[0]  # unit coordinates of the pixels
    area = x.shape[0] ** 2

    def yes(claim: bool) -> str:
        return "yes" if claim else "no"

    def number(n: int) -> str:
        return ("zero", "one", "two", "three", "four", "five")[min(int(n), 5)]

    def left(mask: np.ndarray) -> bool:
        return float(u[mask].mean()) < 0.5

    bright, ink, page = x.mean(-1) > 0.75, x.mean(-1) < 0.3, u < 0.72
    roof = (x[..., 0] > 0.5) & (x[..., 1] < 0.3) & (x[..., 2] < 0.3)
    water = (x[..., 2] > x[..., 0] + 0.2) & (x[..., 2] > x[..., 1] + 0.1)
    stamp = (np.abs(x - np.median(x, axis=(0, 1))).max(-1) > 0.25) & ~page
    readers = {
        "light": lambda: yes(lit_lamp(x) == slots["light"]),
        "cars": lambda: number(car_slots(x, u, v).sum()),
        "stop": lambda: yes(lit_lamp(x) == "red" and not car_slots(x, u, v)[:, 1].any()),
        "lesions": lambda: number((quadrants(bright) >= 0.01 * area).sum()),
        "lesion_side": lambda: yes(left(bright) == (slots["side"] == "left")),
        "land": lambda: land_cover(x),
        "houses": lambda: number((quadrants(roof) >= 0.004 * area).sum()),
        "water_where": lambda: "left" if left(water) else "right",
        "lines": lambda: number(sum((ink & page & (np.abs(v - y) < 0.1)).sum() >= 0.03 * area for y in (0.14, 0.38, 0.62, 0.86))),
        "table": lambda: yes(((ink & page).sum(0) >= 0.5 * x.shape[0]).any()),
        "stamp": lambda: nearest_color(x[stamp].mean(0)),
        "shape_color": lambda: scene_shapes(x, u)[slots["side"]],
        "shape_where": lambda: next(side for side, color in scene_shapes(x, u).items() if color == slots["color"]),
    }
    return readers[kind]()


def test_every_question_type_has_a_pixel_reader():
    assert {kind for types in QUESTIONS.values() for kind in types} == {
        "light", "cars", "stop", "lesions", "lesion_side", "land", "houses", "water_where", "lines", "table", "stamp",
        "shape_color", "shape_where",
    }


@pytest.mark.parametrize("size", [32, 48])
def test_answers_can_be_read_off_the_pixels_given_the_question(size):
    rows = generate_samples(60, seed=11, image_size=size, text_only=0)
    wrong = [(r["question"], r["answer"], read_answer(r)) for r in rows if read_answer(r) != r["answer"]]
    assert not wrong, wrong[:5]


def test_vocabulary_covers_every_word_of_questions_answers_and_chat():
    tokenizer = build_word_tokenizer(vocabulary())
    rows = generate_samples(30, seed=0, text_only=len(FACTS))
    texts = [f"USER : <image> {r['question']} ASSISTANT : {r['answer']}" for r in rows]
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
    assert len(vocabulary()) == len(set(vocabulary()))


def test_unknown_domain_is_a_value_error():
    with pytest.raises(ValueError, match="unknown domains"):
        generate_samples(2, domains=["underwater"])
