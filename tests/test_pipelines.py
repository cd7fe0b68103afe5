"""End-to-end analyses write their tables, tensors and plots from one call."""

from __future__ import annotations

from conftest import make_samples
from mm_lens.neurons import NeuronSet
from mm_lens.pipelines import run_miner


def test_run_miner_writes_tables_and_plots(model, tmp_path):
    with_images = [s for s in make_samples(12) if s["image"] is not None][:6]
    text_only = [dict(s, image=None) for s in make_samples(4)]
    run = run_miner(model, {"vqa": with_images, "mmlu": text_only}, tmp_path, ratio=0.1, seeds=(0, 1),
                    evaluation_samples=4, max_new_tokens=2, progress=False)
    for name in ("scores.safetensors", "neurons.txt", "neurons_per_layer.png", "neurons_overlap.png",
                 "deactivation.txt", "deactivation_accuracy.png", "deactivation_logprob.png",
                 "convergence.txt", "convergence.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert NeuronSet.load(tmp_path / "neurons") == run.neurons
    assert run.deactivation.groups == ["text", "image", "(all)"]
    assert run.deactivation.domains == ["mmlu", "vqa"]
    assert set(run.convergence.curves) == {"baseline", "neurons_off"}
    assert "image" in (tmp_path / "neurons.txt").read_text()
