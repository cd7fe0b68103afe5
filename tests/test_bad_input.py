"""The mistakes people make, fed to the public API and the command line: each ends in an error
of the expected type whose message names the problem, and leaves every file as it was."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import make_samples
from mm_lens import HookedMLLM
from mm_lens.analysis.evaluation import evaluate_cross_domain, score_answers
from mm_lens.analysis.lens import logit_lens_summary
from mm_lens.analysis.patching import patch_sweep
from mm_lens.base.data import load_samples
from mm_lens.base.io import open_results_folder
from mm_lens.cli import app
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.neurons.deactivation import Deactivation, deactivation_hooks
from mm_lens.neurons.domain_neurons import select_domain_neurons
from mm_lens.neurons.modality_neurons import collect_miner_scores, select_modality_neurons
from mm_lens.neurons.neuron_set import NeuronSet
from mm_lens.neurons.statistics import NeuronStats


@pytest.fixture(scope="module")
def llava(models) -> HookedMLLM:
    return models["llava"]


@pytest.fixture(scope="module")
def stats(llava):
    return collect_neuron_stats(llava, make_samples(6), batch_size=6, progress=False)


@pytest.fixture(scope="module")
def miner_scores(llava):
    return collect_miner_scores(llava, {"toy": make_samples(3)}, progress=False)


def _write_jsonl(folder: Path, rows: list[dict], raw: str = "") -> None:
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + raw)


PICTURE = Image.new("RGB", (40, 60), (200, 30, 30))
ROW = {"image": None, "question": "what color is grass", "answer": "green", "domain": "text"}


def _truncated_image(folder: Path) -> None:
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "red.png")
    (folder / "red.png").write_bytes((folder / "red.png").read_bytes()[:50])
    _write_jsonl(folder, [ROW, {**ROW, "image": "red.png", "domain": "toy"}])


def _other_widths(llava) -> NeuronSet:
    width = llava.neuron_widths["lm_mlp"] * 2
    return NeuronSet.from_pairs({"a": torch.tensor([[0, width - 1]])}, "lm_mlp", llava.cfg.n_layers, width)


def _lm_set(llava) -> NeuronSet:
    return NeuronSet.from_pairs({"a": torch.tensor([[0, 1]])}, "lm_mlp", llava.cfg.n_layers, llava.neuron_widths["lm_mlp"])


def _stats_on(llava, samples, folder: Path) -> NeuronStats:
    return collect_neuron_stats(llava, samples, batch_size=2, checkpoint=folder / "stats.ckpt", progress=False)


def _truncated_stats(stats, folder: Path) -> None:
    stats.save(folder / "stats.safetensors")
    data = (folder / "stats.safetensors").read_bytes()
    (folder / "stats.safetensors").write_bytes(data[: len(data) // 2])


def _batch(llava):
    return llava.prepare_inputs(["what is the color"], [PICTURE])


def _with(llava, **change) -> dict:
    """The inputs of a one-picture prompt with some replaced (``None`` drops one)."""
    inputs = {**_batch(llava).inputs, **change}
    return {k: v for k, v in inputs.items() if v is not None}


def _patch_lengths(llava) -> None:
    clean = llava.prepare_inputs(["what is the color"], [PICTURE])
    patch_sweep(llava, clean, llava.prepare_inputs(["what is the color of the shape"], [PICTURE]), progress=False)


@dataclass
class Case:
    """A mistake: ``prepare`` writes what the user had on disk before it (optional), ``act``
    makes it; both get ``(model, stats, miner_scores, folder)``."""

    name: str
    act: Callable[..., Any]
    error: type[Exception]
    phrase: str
    prepare: Callable[..., Any] | None = None


API_CASES = [
    Case("jsonl with a truncated image", lambda m, s, ms, f: load_samples(f), ValueError, "red.png cannot be decoded",
         lambda m, s, ms, f: _truncated_image(f)),
    Case("jsonl with broken JSON", lambda m, s, ms, f: load_samples(f), ValueError, "line 2: not valid JSON",
         lambda m, s, ms, f: _write_jsonl(f, [ROW], '{"image": \n')),
    Case("jsonl with an empty answer", lambda m, s, ms, f: load_samples(f), ValueError, "line 1: answer is ' ', not a non-empty string",
         lambda m, s, ms, f: _write_jsonl(f, [{**ROW, "answer": " "}])),
    Case("jsonl without a domain column", lambda m, s, ms, f: load_samples(f), ValueError, "has no 'domain' column",
         lambda m, s, ms, f: _write_jsonl(f, [{k: v for k, v in ROW.items() if k != "domain"}])),
    Case("dataset path that is no dataset", lambda m, s, ms, f: load_samples(f), ValueError, "neither a save_to_disk folder nor a folder with data.jsonl"),
    Case("model folder that does not exist", lambda m, s, ms, f: HookedMLLM.from_pretrained(f / "no_model"), FileNotFoundError, "not a local model folder"),
    Case("no prompt at all", lambda m, s, ms, f: m.prepare_inputs([]), ValueError, "no prompts"),
    Case("empty prompt", lambda m, s, ms, f: m(**_with(m, input_ids=_batch(m)["input_ids"][:, :0], attention_mask=_batch(m)["attention_mask"][:, :0],
                                                          pixel_values=None)), ValueError, "an empty prompt"),
    Case("pixels with two channels", lambda m, s, ms, f: m(**_with(m, pixel_values=_batch(m)["pixel_values"][:, :2])), ValueError,
         "channels where the vision tower takes 3"),
    Case("integer pixels", lambda m, s, ms, f: m(**_with(m, pixel_values=_batch(m)["pixel_values"].to(torch.uint8))), ValueError,
         "pass floating-point image features"),
    Case("batch size 0 for statistics", lambda m, s, ms, f: collect_neuron_stats(m, make_samples(2), batch_size=0, progress=False), ValueError,
         "batch_size and checkpoint_every must be >= 1"),
    Case("statistics checkpoint of other data", lambda m, s, ms, f: _stats_on(m, make_samples(5), f), ValueError, "belongs to another run",
         lambda m, s, ms, f: _stats_on(m, make_samples(4), f)),
    Case("truncated statistics file", lambda m, s, ms, f: NeuronStats.load(f / "stats.safetensors"), ValueError, "may be truncated",
         lambda m, s, ms, f: _truncated_stats(s, f)),
    Case("saving over an existing file", lambda m, s, ms, f: s.save(f / "stats.safetensors"), FileExistsError, "overwrite=True",
         lambda m, s, ms, f: (f / "stats.safetensors").write_bytes(b"someone else's file")),
    Case("results folder already finished", lambda m, s, ms, f: open_results_folder(f, {"command": "neurons"}), FileExistsError, "finished results",
         lambda m, s, ms, f: (f / "manifest.json").write_text(json.dumps({"command": "neurons", "complete": True}))),
    Case("unknown position class", lambda m, s, ms, f: collect_neuron_stats(m, make_samples(2), classes=["pixels"], progress=False), ValueError,
         "unknown position classes ['pixels']"),
    Case("top rate above 1", lambda m, s, ms, f: select_domain_neurons(s, top_rate=1.5), ValueError, "is 1.5; pass a fraction in [0, 1]"),
    Case("module never collected", lambda m, s, ms, f: select_domain_neurons(s, modules=["lm_attn"]), ValueError, "no statistics for modules ['lm_attn']"),
    Case("mean of a domain never seen", lambda m, s, ms, f: s.neuron_means(domains=["underwater"]), ValueError, "unknown domains ['underwater']"),
    Case("MINER ratio 0", lambda m, s, ms, f: select_modality_neurons(ms, ratio=0.0), ValueError, "ratio is 0.0"),
    Case("MINER unknown strategy", lambda m, s, ms, f: select_modality_neurons(ms, strategy="best"), ValueError, "unknown strategy 'best'"),
    Case("neuron set of another width", lambda m, s, ms, f: deactivation_hooks(m, _other_widths(m)), ValueError, "is 2 layers x 128 neurons but this model's is 2 x 64"),
    Case("unknown deactivation mode", lambda m, s, ms, f: deactivation_hooks(m, _lm_set(m), mode="half"), ValueError, "unknown mode 'half'"),
    Case("constant mode without a value", lambda m, s, ms, f: deactivation_hooks(m, _lm_set(m), mode="constant"), ValueError, "needs value="),
    Case("no seed for the random control", lambda m, s, ms, f: evaluate_cross_domain(m, make_samples(2), _lm_set(m), seeds=(), progress=False),
         ValueError, "at least one seed"),
    Case("samples without answers", lambda m, s, ms, f: score_answers(m, [{k: v for k, v in x.items() if k != "answer"} for x in make_samples(2)]),
         ValueError, "no 'answer' field"),
    Case("deactivating at an unknown position", lambda m, s, ms, f: Deactivation(_lm_set(m), positions="nowhere").hooks(m), ValueError, "nowhere"),
    Case("lens over domains the samples lack", lambda m, s, ms, f: logit_lens_summary(m, make_samples(3), domains=["noise"], progress=False),
         ValueError, "not in domains="),
    Case("patching prompts of different lengths", lambda m, s, ms, f: _patch_lengths(m), ValueError,
         "patching across images needs the same prompts"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", API_CASES, ids=[case.name for case in API_CASES])
def test_public_api_refuses_with_a_clear_error_and_changes_no_file(case, llava, stats, miner_scores, tmp_path):
    if case.prepare is not None:
        case.prepare(llava, stats, miner_scores, tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(case.error) as raised:
        case.act(llava, stats, miner_scores, tmp_path)
    assert case.phrase in str(raised.value), f"{case.name}: {raised.value}"
    assert _snapshot(tmp_path) == before


def _unfinished_run_of_other_data(folder: Path) -> None:
    (folder / "out").mkdir()
    manifest = {"command": "logit-lens", "model": {}, "data": {"n_samples": 1}, "settings": {}, "complete": False}
    (folder / "out" / "manifest.json").write_text(json.dumps(manifest))


# (name, arguments (OUT: the results folder), what the user had on disk, phrase of the error line)
CLI_CASES = [
    ("dataset with a truncated image", ["logit-lens", "--data", "WORK", "--out", "OUT"], _truncated_image, "red.png cannot be decoded"),
    ("dataset with broken JSON", ["neurons", "--data", "WORK", "--out", "OUT"], lambda f: _write_jsonl(f, [ROW], "{\n"), "line 2: not valid JSON"),
    ("unfinished run of other data", ["logit-lens", "--limit", "1", "--out", "OUT"], _unfinished_run_of_other_data,
     "holds an unfinished run with another"),
    ("finished run", ["patch", "--out", "OUT"], lambda f: (f / "out").mkdir() or (f / "out" / "manifest.json").write_text('{"complete": true}'),
     "already holds finished results"),
]


@pytest.mark.parametrize("name,args,prepare,phrase", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_command_line_refuses_in_one_line_and_changes_no_file(name, args, prepare, phrase, tmp_path):
    prepare(tmp_path)
    before = _snapshot(tmp_path)
    args = [{"WORK": str(tmp_path), "OUT": str(tmp_path / "out")}.get(a, a) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0], result.stderr
    assert _snapshot(tmp_path) == before
