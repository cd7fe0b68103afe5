"""End-to-end analyses write their tables, tensors and plots from one call."""

from __future__ import annotations

import json

import pytest

from helpers import make_samples
from mm_lens.neurons.neuron_set import NeuronSet
from mm_lens.pipelines import run_miner


def test_run_miner_writes_tables_and_plots(model, tmp_path):
    with_images = [s for s in make_samples(12) if s["image"] is not None][:6]
    text_only = [dict(s, image=None) for s in make_samples(4)]
    run = run_miner(model, {"vqa": with_images, "mmlu": text_only}, tmp_path, ratio=0.1, seeds=(0, 1),
                    evaluation_samples=4, max_new_tokens=2, progress=False)
    for name in ("scores.safetensors", "neurons.txt", "neurons_per_layer.png", "neurons_overlap.png",
                 "deactivation.txt", "deactivation_accuracy.png", "deactivation_logprob.png",
                 "convergence.txt", "convergence.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert NeuronSet.load(tmp_path / "neurons") == run.neurons
    assert run.deactivation.groups == ["text", "image", "(all)"]
    assert run.deactivation.domains == ["mmlu", "vqa"]
    assert set(run.convergence.curves) == {"baseline", "neurons_off"}
    assert "image" in (tmp_path / "neurons.txt").read_text()


def test_run_domain_neurons_writes_tables_plots_and_report(model, tmp_path):
    from helpers import make_samples
    from mm_lens.pipelines import run_domain_neurons
    from mm_lens.presentation.report import remote_references

    run = run_domain_neurons(model, make_samples(12), tmp_path, top_rate=0.05, seeds=(0,), evaluation_samples=2,
                             max_new_tokens=2, progress=False)
    for name in ("stats.safetensors", "neurons.txt", "neurons_per_layer.png", "neurons_overlap.png",
                 "evaluation.txt", "evaluation_accuracy.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert run.neurons.groups == list(run.stats.domains)
    assert run.evaluation.domains == sorted(run.stats.domains)
    page = (tmp_path / "report.html").read_text()
    assert "Domain-specific neurons" in page and not remote_references(page)


def test_run_patching_picks_a_counterfactual_pair_and_draws_it(model, tmp_path):
    from helpers import random_image
    from mm_lens.pipelines import counterfactual_pair, folder_report, run_patching
    from mm_lens.presentation.report import remote_references

    samples = [
        {"question": "what is the color", "answer": "red", "domain": "plain", "image": random_image(28, 28, 1)},
        {"question": "how many are there", "answer": "two", "domain": "plain", "image": random_image(28, 28, 2)},
        {"question": "what is the color", "answer": "blue", "domain": "plain", "image": random_image(28, 28, 3)},
    ]
    clean, corrupted = counterfactual_pair(samples)
    assert (clean["answer"], corrupted["answer"]) == ("red", "blue")
    run = run_patching(model, samples, tmp_path, progress=False)
    assert run.by_position.effect.shape[0] == model.cfg.n_layers
    assert all(u.cell is not None for u in run.by_cell.units)
    for name in ("by_position.png", "by_cell_pictures.png", "report.html", "pair.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    rebuilt = folder_report(tmp_path)
    assert not remote_references(rebuilt.read_text())


def test_counterfactual_pair_missing_is_a_clear_error(images):
    from mm_lens.pipelines import counterfactual_pair

    lonely = [{"question": "what", "answer": "red", "domain": "d", "image": images[0]}]
    with pytest.raises(ValueError, match="no two samples of domain 'd'"):
        counterfactual_pair(lonely, "d")


def test_run_logit_lens_on_a_model_too_shallow_for_stages_says_so(model, tmp_path):
    from mm_lens.pipelines import run_logit_lens

    assert model.cfg.n_layers == 2
    run = run_logit_lens(model, make_samples(6), tmp_path, progress=False)
    text = (tmp_path / "logit_lens.txt").read_text()
    assert "no three-stage split: the model has 2 layer(s)" in text
    assert len(run.summary.layers) == 2 and (tmp_path / "report.html").exists()


def test_run_inspect_means_equal_a_cached_forward(model, tmp_path):
    from mm_lens.model.samples import prompt_batch
    from mm_lens.pipelines import run_inspect

    samples = [s for s in make_samples(2) if s["image"] is not None][:2] + [{"question": "how many", "image": None, "domain": "text"}]
    run = run_inspect(model, samples, tmp_path)
    batch = prompt_batch(model, samples)
    _, cache = model.run_with_cache(batch, names_filter="blocks.1.mlp.hook_act")
    acts = cache["blocks.1.mlp.hook_act"]
    for group in ("image", "text"):
        row = next(r for r in run.rows if (r["module"], r["layer"], r["group"]) == ("lm_mlp", 1, group))
        values = acts[batch.modality_map.mask(group)]
        assert row["tokens"] == values.shape[0]
        assert abs(row["mean"] - float(values.double().mean())) < 1e-5
        assert abs(row["fraction_positive"] - float((values > 0).double().mean())) < 1e-9
    assert {r["module"] for r in run.rows} == set(model.neuron_hooks)
    assert (tmp_path / "summary.json").exists() and (tmp_path / "neuron_means.safetensors").exists()
    assert "lm_mlp" in run.table()


def test_a_results_folder_is_not_overwritten_without_overwrite(model, tmp_path):
    from mm_lens.pipelines import run_logit_lens

    samples = make_samples(2)
    run_logit_lens(model, samples, tmp_path, batch_size=4, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["command"] == "logit-lens"
    assert set(manifest["model"]) == {"architecture", "config", "weights"} and manifest["data"].startswith("samples:")
    with pytest.raises(FileExistsError, match="already holds the finished results of `logit-lens`"):
        run_logit_lens(model, samples, tmp_path, batch_size=4, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing changed on disk
    run_logit_lens(model, samples, tmp_path, batch_size=4, progress=False, overwrite=True)
    assert (tmp_path / "manifest.json").stat().st_mtime_ns != before["manifest.json"]


def test_a_foreign_folder_or_another_unfinished_run_is_refused(model, tmp_path):
    from mm_lens.pipelines import run_logit_lens

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="files that no mm_lens run wrote"):
        run_logit_lens(model, make_samples(2), tmp_path, progress=False)
    other = tmp_path / "run"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"command": "logit-lens", "data": "samples:other:1", "complete": False}))
    with pytest.raises(FileExistsError, match="unfinished run with another"):
        run_logit_lens(model, make_samples(2), other, progress=False)


def test_a_checkpoint_of_other_data_is_refused_naming_what_differs(model, tmp_path):
    from mm_lens.neurons.collection import collect_neuron_stats

    checkpoint = tmp_path / "stats.checkpoint.safetensors"
    collect_neuron_stats(model, make_samples(2), checkpoint=checkpoint, checkpoint_every=1, progress=False)
    with pytest.raises(ValueError, match=r"belongs to another run \(data: checkpoint 'samples:"):
        collect_neuron_stats(model, make_samples(2, sizes=((30, 50),)), checkpoint=checkpoint, checkpoint_every=1, progress=False)
