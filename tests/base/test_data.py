"""Synthetic multi-domain image-QA data and the loaders for image-QA data on disk."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from mm_lens.base.data import (
    DOMAINS,
    FACTS,
    QUESTIONS,
    TEXT_DOMAIN,
    build_dataset,
    chance_accuracy,
    export_image_folder,
    generate_samples,
    load_samples,
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


def test_chance_accuracy_is_the_majority_answer_share_per_question_type(samples):
    chance = chance_accuracy(generate_samples(120, seed=0, text_only=120))
    expected = {
        "driving": (1 / 4 + 1 / 2) / 2,
        "medical": (1 / 4 + 1 / 2) / 2,
        "remote": 1 / 4,
        "document": (1 / 4 + 1 / 2) / 2,
        "scene": (1 / 3 + 1 / 4) / 2,
        TEXT_DOMAIN: 1 / 12,
    }
    assert chance == pytest.approx(expected)
    assert chance_accuracy([{"domain": "x", "answer": a} for a in "aab"], how="uniform") == {"x": 0.5}


def test_build_dataset_roundtrips_through_save_to_disk(tmp_path):
    built = build_dataset(tmp_path / "ds", 10, seed=0, splits={"train": 0.8, "test": 0.2})
    assert {name: len(split) for name, split in built.items()} == {"train": 8 * 6, "test": 2 * 6}
    train = load_samples(tmp_path / "ds", "train")
    assert isinstance(train.features["image"], datasets.Image)
    assert set(train.column_names) >= {"image", "question", "answer", "domain", "question_type"}
    assert same_rows(list(train), list(built["train"]))
    assert sum(r["image"] is None for r in train) == 8 == sum(r["domain"] == TEXT_DOMAIN for r in train)
    assert all(isinstance(r["image"], Image.Image) for r in train if r["domain"] != TEXT_DOMAIN)
    test = load_samples(tmp_path / "ds", "test")
    train_images = {pixels(r["image"]).tobytes() for r in train if r["image"] is not None}
    assert not any(pixels(r["image"]).tobytes() in train_images for r in test if r["image"] is not None)


def test_load_samples_asks_for_a_split_of_a_dataset_dict(tmp_path):
    build_dataset(tmp_path / "ds", 5, seed=0)
    with pytest.raises(ValueError, match="train.*test"):
        load_samples(tmp_path / "ds")


def test_load_samples_reads_an_image_folder_with_data_jsonl(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    rows = [
        {"image": "red.png", "question": "what color is it", "answer": "red", "domain": "toy"},
        {"image": None, "question": "what color is grass", "answer": "green", "domain": "text"},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_samples(tmp_path)
    assert len(loaded) == 2 and loaded[1]["image"] is None
    assert pixels(loaded[0]["image"])[0, 0].tolist() == [1.0, 0.0, 0.0]
    assert [r["answer"] for r in loaded] == ["red", "green"]


def test_export_image_folder_roundtrips(tmp_path, samples):
    export_image_folder(samples, tmp_path / "folder")
    assert same_rows(list(load_samples(tmp_path / "folder")), samples)


def test_missing_column_is_a_value_error_naming_it(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": None, "question": "q", "domain": "d"}) + "\n")
    with pytest.raises(ValueError, match="'answer'"):
        load_samples(tmp_path)
    datasets.Dataset.from_dict({"image": [None], "question": ["q"], "answer": ["a"]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="'domain'"):
        load_samples(tmp_path / "hf")


def test_load_samples_renames_columns_of_other_datasets(tmp_path):
    other = {"img": [None], "question": ["q"], "label": ["a"], "domain": ["d"]}
    datasets.Dataset.from_dict(other).save_to_disk(str(tmp_path / "hf"))
    loaded = load_samples(tmp_path / "hf", columns={"img": "image", "label": "answer"})
    assert loaded[0] == {"image": None, "question": "q", "answer": "a", "domain": "d"}


def test_unknown_domain_is_a_value_error():
    with pytest.raises(ValueError, match="unknown domains"):
        generate_samples(2, domains=["underwater"])
