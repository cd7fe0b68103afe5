"""The mm-lens command line runs end to end on a tiny model and writes its results."""

from __future__ import annotations

import json

from safetensors.torch import load_file
from typer.testing import CliRunner

from mm_lens.cli import app


def test_inspect_writes_summary_and_neuron_means(model_folders, tmp_path):
    result = CliRunner().invoke(app, ["inspect", "--model", model_folders["llava_next"], "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    modules = {row["module"] for row in summary["neurons"]}
    assert modules == {"lm_mlp", "vision_mlp", "projector"}
    means = load_file(str(tmp_path / "neuron_means.safetensors"))
    assert means["lm_mlp.0.image.mean"].shape == (64,)
    assert "row 0:" in result.output


def test_build_tiny_rejects_unknown_arch(tmp_path):
    result = CliRunner().invoke(app, ["build-tiny", str(tmp_path / "m"), "--arch", "gpt2"])
    assert result.exit_code != 0
    assert "unknown arch 'gpt2'" in result.output
