"""Dose-response: each dose equals a plain cross-domain evaluation of that dose's neurons."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from helpers import DOMAINS, make_samples
from mm_lens.analysis.dose_response import DoseResponse, dose_response
from mm_lens.analysis.evaluation import evaluate_cross_domain
from mm_lens.neurons.neuron_set import NeuronSet


def _first_share(model, share: float) -> NeuronSet:
    """Each domain group: the first ``share`` of every LM MLP layer, shifted per group."""
    width, layers = model.cfg.d_mlp, model.cfg.n_layers
    k = max(1, round(share * width))
    neurons = {
        domain: {"lm_mlp": [(torch.arange(k) + 7 * g) % width for _ in range(layers)]} for g, domain in enumerate(DOMAINS)
    }
    return NeuronSet(neurons, {"lm_mlp": width}, {"method": "test", "share": share})


@pytest.fixture(scope="module")
def samples():
    return make_samples(6)


def test_every_dose_is_the_plain_evaluation_of_its_neurons(model, samples, tmp_path):
    curve = dose_response(model, samples, lambda r: _first_share(model, r), doses=(0.05, 0.25), seeds=(0, 1), progress=False)
    assert curve.counts == [{d: round(0.05 * model.cfg.d_mlp) * model.cfg.n_layers for d in DOMAINS},
                            {d: round(0.25 * model.cfg.d_mlp) * model.cfg.n_layers for d in DOMAINS}]
    plain = evaluate_cross_domain(model, samples, _first_share(model, 0.25), seeds=(0, 1), greedy=False, progress=False)
    for metric in plain.metrics:
        assert torch.allclose(curve.results[1].chosen[metric], plain.chosen[metric], equal_nan=True)
        assert torch.allclose(curve.results[1].random[metric], plain.random[metric], equal_nan=True)
    assert "accuracy" not in plain.metrics and "first_token_accuracy" in plain.metrics
    own = curve.curve(DOMAINS[0])
    effect = next(e for e in plain.effects() if e.group == DOMAINS[0])
    assert own["chosen"][1] == pytest.approx(effect.own) and own["random_sd"][1] == pytest.approx(effect.own_random_sd)
    assert "25%" in curve.table() and isinstance(curve.plot(), Figure)
    curve.save(tmp_path / "dose")
    loaded = DoseResponse.load(tmp_path / "dose")
    assert loaded.doses == curve.doses and loaded.counts == curve.counts
    assert torch.equal(loaded.results[0].chosen["margin"].nan_to_num(), curve.results[0].chosen["margin"].nan_to_num())
    with pytest.raises(FileExistsError):
        curve.save(tmp_path / "dose")


@pytest.mark.parametrize("doses", [(), (0.0, 0.1), (0.2, 0.1), (0.1, 1.5)])
def test_doses_must_be_increasing_fractions(model, samples, doses):
    with pytest.raises(ValueError, match="pass increasing fractions in"):
        dose_response(model, samples, lambda r: _first_share(model, r), doses=doses, progress=False)
