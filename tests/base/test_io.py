"""Result files: atomic writes, a format tag and version in every file, clear errors."""

from __future__ import annotations

import pytest
import torch

from mm_lens.base.io import FORMAT_VERSION, atomic_write, load_tensors, save_tensors


def test_a_result_file_round_trips_with_its_kind_and_version(tmp_path):
    path = save_tensors(tmp_path / "r.safetensors", {"x": torch.arange(6).view(2, 3)}, {"layers": [0, 1]}, "Thing")
    tensors, header = load_tensors(path, "Thing")
    assert torch.equal(tensors["x"], torch.arange(6).view(2, 3)) and header == {"layers": [0, 1]}
    with pytest.raises(ValueError, match=rf"holds 'mm_lens.Thing' version {FORMAT_VERSION}; expected 'mm_lens.Other'"):
        load_tensors(path, "Other")


def test_a_truncated_file_names_itself_and_what_to_do(tmp_path):
    path = save_tensors(tmp_path / "r.safetensors", {"x": torch.ones(100)}, {}, "Thing")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"r\.safetensors could not be read.*truncated: write it again"):
        load_tensors(path, "Thing")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def failing(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_saving_never_replaces_a_file_silently(tmp_path):
    path = save_tensors(tmp_path / "r.safetensors", {"x": torch.ones(2)}, {}, "Thing")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"r\.safetensors exists; pass overwrite=True"):
        save_tensors(path, {"x": torch.zeros(2)}, {}, "Thing")
    assert path.read_bytes() == before
    save_tensors(path, {"x": torch.zeros(2)}, {}, "Thing", overwrite=True)
    assert torch.equal(load_tensors(path, "Thing")[0]["x"], torch.zeros(2))
