"""Convergence analysis: representations, curves with and without neurons off, results."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from helpers import make_samples
from mm_lens.analysis.convergence import ConvergenceResult, analyze_convergence, modality_representations
from mm_lens.neurons.neuron_set import NeuronSet


def test_representations_are_per_sample_modality_means(model):
    samples = make_samples(4)
    reps = modality_representations(model, samples, ("text", "image"), batch_size=3)
    assert reps.means.shape == (4, model.cfg.n_layers, 2, model.cfg.d_model)
    # sample 3 has no image: NaN there, finite text mean
    assert reps.means[3, :, 1].isnan().all() and not reps.means[3, :, 0].isnan().any()
    batch = model.prepare_inputs([samples[0]["question"]], [samples[0]["image"]])
    _, cache = model.run_with_cache(batch, names_filter="blocks.1.hook_resid_post")
    image = batch.modality_map.mask("image")[0]
    assert torch.allclose(reps.means[0, 1, 1], cache["blocks.1.hook_resid_post"][0][image].mean(0), atol=1e-5)


def test_cosine_and_cka_are_symmetric_with_unit_diagonal(model):
    reps = modality_representations(model, make_samples(7), ("text", "image"))
    cosine, cka = reps.cosine(), reps.cka()
    assert torch.allclose(cosine, cosine.transpose(1, 2), atol=1e-6)
    assert torch.allclose(torch.diagonal(cosine, dim1=1, dim2=2), torch.ones(model.cfg.n_layers, 2), atol=1e-5)
    assert torch.allclose(torch.diagonal(cka, dim1=1, dim2=2), torch.ones(model.cfg.n_layers, 2, dtype=torch.float64))
    assert ((cka >= 0) & (cka <= 1 + 1e-9)).all()


def test_analysis_with_neurons_off_gives_two_conditions_and_saves(model, tmp_path):
    samples = make_samples(4)
    off = [torch.arange(model.cfg.d_mlp // 2) for _ in range(model.cfg.n_layers)]
    neurons = NeuronSet({"image": {"lm_mlp": off}}, {"lm_mlp": model.cfg.d_mlp}, {"method": "test"})
    result = analyze_convergence(model, samples, neurons=neurons, batch_size=2, progress=False)
    assert set(result.curves) == {"baseline", "neurons_off"}
    base, off_curves = result.curves["baseline"], result.curves["neurons_off"]
    assert base["last_attention"].shape == (model.cfg.n_layers, 2)
    assert base["knockout"].shape == (model.cfg.n_layers, 2)
    assert ((base["last_attention"] >= 0) & (base["last_attention"] <= 1)).all()
    assert not torch.allclose(base["clean"], off_curves["clean"])
    assert "cos text-image" in result.table()
    assert isinstance(result.plot(), Figure)
    result.save(tmp_path)
    loaded = ConvergenceResult.load(tmp_path)
    assert torch.equal(loaded.curves["neurons_off"]["knockout"], off_curves["knockout"])
