"""Image-QA samples on disk: loading, up-front checks, chance levels."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pytest
from PIL import Image

from mm_lens.base.data import chance_accuracy, check_samples, load_samples
from mm_lens.base.synthetic import (
    FACTS,
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
    # 72: every answer count divides evenly; each text-only fact once
    chance = chance_accuracy(generate_samples(72, seed=0, text_only=len(FACTS)))
    expected = {
        "driving": (1 / 3 + 1 / 2 + 1 / 2) / 3,
        "medical": (1 / 3 + 1 / 2) / 2,
        "remote": (1 / 3 + 1 / 3 + 1 / 2) / 3,
        "document": (1 / 3 + 1 / 4 + 1 / 2) / 3,
        "scene": (1 / 4 + 1 / 2) / 2,
        TEXT_DOMAIN: max(Counter(FACTS.values()).values()) / len(FACTS),
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



def _jsonl(folder, rows: list, raw_lines: tuple[str, ...] = ()) -> None:
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(raw_lines))


def test_a_truncated_image_is_found_before_any_work_naming_its_line(tmp_path):
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes((tmp_path / "good.png").read_bytes()[:40])
    rows = [{"image": "good.png", "question": "q", "answer": "a", "domain": "d"}] * 3
    _jsonl(tmp_path, rows + [{"image": "bad.png", "question": "q", "answer": "a", "domain": "d"}])
    with pytest.raises(ValueError, match=r"data.jsonl: 1 unusable row.*line 4: image .*bad.png cannot be decoded"):
        load_samples(tmp_path)


def test_empty_labels_and_missing_images_are_listed_with_their_lines(tmp_path):
    rows = [
        {"image": None, "question": "q", "answer": "", "domain": "d"},
        {"image": None, "question": "q", "answer": "a", "domain": 3},
        {"image": "gone.png", "question": "q", "answer": "a", "domain": "d"},
    ]
    _jsonl(tmp_path, rows)
    with pytest.raises(ValueError, match=r"3 unusable row\(s\).*line 1: answer is '', not a non-empty string; "
                       r"line 2: domain is 3, not a non-empty string; line 3: image file .*gone.png does not exist"):
        load_samples(tmp_path)


def test_invalid_json_names_file_line_and_column(tmp_path):
    _jsonl(tmp_path, [{"image": None, "question": "q", "answer": "a", "domain": "d"}], ('{"image": null, "question": \n',))
    with pytest.raises(ValueError, match=r"data.jsonl, line 2: not valid JSON \(.* at column \d+\)"):
        load_samples(tmp_path)
    _jsonl(tmp_path, [], ("[1, 2]\n",))
    with pytest.raises(ValueError, match="line 1: a row must be a JSON object, got list"):
        load_samples(tmp_path)


def test_a_corrupt_image_stored_in_a_saved_dataset_is_found_up_front(tmp_path):
    built = build_dataset(tmp_path / "ds", 2, seed=0, splits={"test": 1.0})
    broken = built["test"].cast_column("image", datasets.Image(decode=False))
    row = next(i for i, r in enumerate(broken) if r["image"] is not None)
    rows = broken.to_list()
    rows[row]["image"] = {"bytes": rows[row]["image"]["bytes"][:30], "path": None}
    datasets.Dataset.from_list(rows, features=broken.features).save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(ValueError, match=rf"row {row}: image \(stored bytes\) cannot be decoded"):
        load_samples(tmp_path / "broken")


def test_check_samples_takes_lists_of_dicts_and_counts_what_it_does_not_show():
    good = {"image": Image.new("RGB", (4, 4)), "question": "q", "answer": "a", "domain": "d"}
    check_samples([good, {**good, "image": None}])
    with pytest.raises(ValueError, match=r"row 0: image is a int.*; and 2 more"):
        check_samples([{**good, "image": 5}] + [{**good, "question": " "}] * 6, "my list")
