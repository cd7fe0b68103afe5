"""Image-QA samples on disk: loading, up-front checks, chance levels."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from mm_lens.base.data import chance_accuracy, load_samples
from mm_lens.base.synthetic import (
    TEXT_DOMAIN,
    build_dataset,
    export_image_folder,
    generate_samples,
)


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

