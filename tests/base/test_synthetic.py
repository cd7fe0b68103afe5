"""Synthetic multi-domain image-QA data."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mm_lens.base.synthetic import (
    DOMAINS,
    FACTS,
    QUESTIONS,
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


def foreground(images: np.ndarray) -> np.ndarray:
    """How far each pixel is from the image's median colour: a colour-blind silhouette."""
    return np.abs(images - np.median(images, axis=(1, 2), keepdims=True)).sum(-1)


def pixel_table(rows, kind: str, answers) -> tuple[np.ndarray, np.ndarray]:
    """Features and answer indices of the rows of one question type; the shape question is asked
    across colours, so it is read from the colour-blind silhouette."""
    rows = [r for r in rows if r["question_type"] == kind]
    images = np.stack([pixels(r["image"]) for r in rows])
    features = foreground(images) if kind == "shape" else images
    return features.reshape(len(rows), -1), np.array([answers.index(r["answer"]) for r in rows])


@pytest.fixture(scope="module")
def nearest_mean_accuracy():
    """Per question type: accuracy of a nearest-class-mean classifier (distances scaled by the
    within-class spread of each pixel) fitted on one seed's images, scored on another's."""
    train, test = generate_samples(120, seed=10, text_only=0), generate_samples(60, seed=11, text_only=0)
    scores = {}
    for types in QUESTIONS.values():
        for kind, (_, answers) in types.items():
            (x, y), (x_test, y_test) = pixel_table(train, kind, answers), pixel_table(test, kind, answers)
            means = np.stack([x[y == c].mean(0) for c in range(len(answers))])
            spread = np.sqrt(((x - means[y]) ** 2).mean(0)) + 0.05
            distance = (((x_test[:, None] - means[None]) / spread) ** 2).sum(-1)
            scores[kind] = (float((distance.argmin(1) == y_test).mean()), 1 / len(answers))
    return scores


@pytest.mark.parametrize("kind", [kind for types in QUESTIONS.values() for kind in types])
def test_answers_can_be_read_off_the_pixels(nearest_mean_accuracy, kind):
    accuracy, chance = nearest_mean_accuracy[kind]
    assert accuracy >= chance + 0.25, (kind, accuracy, chance)


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
