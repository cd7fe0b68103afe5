"""The mm-lens command line runs each analysis end to end on the shipped model organism."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mm_lens.cli import app
from mm_lens.presentation.report import remote_references


def _run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_inspect_writes_summary(tmp_path):
    result = _run("inspect", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {row["module"] for row in summary["neurons"]} == {"lm_mlp", "vision_mlp", "projector"}
    assert "row 0:" in result.output


@pytest.mark.parametrize(
    "command,extra,files",
    [
        ("neurons", ["--limit", "6", "--evaluation-samples", "2", "--seeds", "0", "--doses", "0.01,0.1"],
         ["neurons.txt", "evaluation.txt", "neurons_per_layer.png", "dose_response.txt", "dose_response.png", "evaluation_margin.png"]),
        ("miner", ["--limit", "4", "--evaluation-samples", "2", "--seeds", "0", "--ratio", "0.05", "--mode", "mean"],
         ["neurons.txt", "deactivation.txt", "convergence.png"]),
        ("logit-lens", ["--limit", "3"], ["logit_lens.txt", "logit_lens.png", "lens.safetensors"]),
        ("patch", ["--domain", "scene"], ["by_position.png", "by_cell_pictures.png", "pair.json"]),
    ],
)
def test_analysis_command_writes_results_folder(command, extra, files, tmp_path):
    _run(command, "--out", str(tmp_path), *extra)
    for name in files + ["report.html"]:
        assert (tmp_path / name).stat().st_size > 0, name
    page = (tmp_path / "report.html").read_text()
    assert not remote_references(page)
    (tmp_path / "report.html").unlink()
    _run("report", str(tmp_path))  # rebuilt with the command's own text, tables and figures
    assert (tmp_path / "report.html").read_text() == page


def test_commands_accept_a_dataset_folder(tmp_path):
    from mm_lens.base.synthetic import build_dataset

    build_dataset(tmp_path / "data", 4, seed=3)
    _run("logit-lens", "--data", str(tmp_path / "data"), "--split", "test", "--out", str(tmp_path / "out"))


def test_build_tiny_rejects_unknown_arch(tmp_path):
    result = CliRunner().invoke(app, ["build-tiny", str(tmp_path / "m"), "--arch", "gpt2"])
    assert result.exit_code != 0
    assert "unknown arch 'gpt2'" in result.output


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["neurons", "--model", "/no/such/model"], "--model: /no/such/model is not a local model folder"),
        (["neurons", "--data", "/no/such/data"], "--data: /no/such/data does not exist"),
        (["neurons", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["neurons", "--top-rate", "-0.5"], "--top-rate: must be a fraction in (0, 1], got -0.5"),
        (["neurons", "--seeds", "a,b"], "--seeds: 'a,b' is not a comma-separated list of integers"),
        (["neurons", "--limit", "0"], "--limit: must be at least 1, got 0"),
        (["miner", "--ratio", "2"], "--ratio: must be a fraction in (0, 1], got 2.0"),
        (["miner", "--strategy", "best"], "--strategy: 'best' is not one of LA_MU"),
        (["neurons", "--mode", "half"], "--mode: 'half' is not one of zero, mean"),
        (["neurons", "--doses", "0.2,0.1"], "--doses: '0.2,0.1': give increasing fractions"),
        (["neurons", "--doses", "a"], "--doses: 'a' is not a comma-separated list of fractions"),
        (["patch", "--hook", "resid"], "--hook: 'resid' is not one of resid_pre"),
        (["patch", "--metric", "acc"], "--metric: 'acc' is not one of logit_diff"),
        (["logit-lens", "--batch-size", "-1"], "--batch-size: must be at least 1, got -1"),
        (["report", "/no/such/folder"], "FOLDER: /no/such/folder is not a results folder"),
        (["build-tiny", "FOLDER", "--arch", "gpt2"], "--arch: unknown arch 'gpt2'"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2_and_touch_nothing(tmp_path, args, phrase):
    out = tmp_path / "out"
    args = [str(out) if a == "FOLDER" else a for a in args]
    if args[0] in ("neurons", "miner", "patch", "logit-lens"):
        args += ["--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0], result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_debug_shows_the_traceback_of_a_user_error():
    result = CliRunner().invoke(app, ["--debug", "neurons", "--batch-size", "0"])
    assert result.exit_code != 0 and result.exception is not None
    assert "--batch-size: must be at least 1" in str(result.exception)


def test_rerunning_into_a_finished_folder_changes_nothing_without_overwrite(tmp_path):
    _run("logit-lens", "--limit", "2", "--out", str(tmp_path))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    result = CliRunner().invoke(app, ["logit-lens", "--limit", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--out" in result.stderr and "--overwrite" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    _run("logit-lens", "--limit", "2", "--out", str(tmp_path), "--overwrite")
