"""The shipped model organism can show what mm_lens measures (issue 17).

``scripts/train_default_model.py`` ships a model only when its acceptance checks pass and
stores them in ``training_report.json``; here the report is read back, and MMNeuron's check
(b) is recomputed on the shipped weights and held-out split: each domain's LAPE neurons
switched off lower that domain's answer log-probability by more than matched random neurons
(mean + 2 sd over the report's seeds) for at least three of the five domains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mm_lens
from mm_lens import HookedMLLM
from mm_lens.analysis.evaluation import score_answers
from mm_lens.base.data import load_default_samples
from mm_lens.base.synthetic import DOMAINS
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.neurons.deactivation import Deactivation
from mm_lens.neurons.domain_neurons import select_domain_neurons

MODEL = Path(mm_lens.__file__).parent / "assets" / "default_model"
CHECKS = ("a_layers", "b_domain_neurons", "c_modality_neurons")


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((MODEL / "training_report.json").read_text())


def test_training_report_holds_every_acceptance_check_passing(report):
    acceptance = report["acceptance"]
    assert set(CHECKS) <= set(acceptance)
    assert acceptance["passed"] and all(acceptance[check]["passed"] for check in CHECKS)


def test_every_lm_mlp_layer_matters_in_the_report(report):
    config = json.loads((MODEL / "config.json").read_text())
    n_layers = config["text_config"]["num_hidden_layers"]
    layers = report["acceptance"]["a_layers"]["layers"]
    assert n_layers >= 6
    assert [row["layer"] for row in layers] == list(range(n_layers))
    assert all(row["drop"] > 0 for row in layers)


def test_modality_neurons_hurt_more_than_random_ones_in_the_report(report):
    check = report["acceptance"]["c_modality_neurons"]
    assert check["chosen_logprob_drop"] > check["random_logprob_drop_mean"] + 2 * check["random_logprob_drop_sd"]


def test_answers_are_moderately_confident_in_the_report(report):
    """Margins of a few nats, not ~10: partial deactivation can move an answer."""
    assert 1.0 < report["confidence"]["margin_median"] < 6.0


def test_domain_neurons_lower_their_own_domain_beyond_random_neurons(report):
    """Check (b) recomputed on the shipped weights and held-out split, with the report's seeds."""
    torch.set_num_threads(2)
    seeds = [int(s) for s in str(report["settings"]["seeds"]).split(",")]
    model = HookedMLLM.from_pretrained("default")
    samples = [s for s in load_default_samples("test") if s["image"] is not None]
    neurons = select_domain_neurons(collect_neuron_stats(model, samples, batch_size=64, progress=False))
    assert neurons.groups == sorted(DOMAINS)
    controls = [neurons.random_control(seed) for seed in seeds]
    expected = report["acceptance"]["b_domain_neurons"]["domains"]
    passed = []
    for domain in neurons.groups:
        own = [s for s in samples if s["domain"] == domain]

        def logprob(off=None) -> float:
            scores = score_answers(model, own, deactivate=off, batch_size=64, max_new_tokens=2)
            return float(scores.answer_logprob.mean())

        baseline = logprob()
        drop = baseline - logprob(Deactivation(neurons, groups=[domain]))
        random_drops = torch.tensor([baseline - logprob(Deactivation(c, groups=[domain])) for c in controls], dtype=torch.float64)
        passed.append(drop > float(random_drops.mean() + 2 * random_drops.std()))
        assert drop == pytest.approx(expected[domain]["chosen_drop"], abs=2e-3), domain  # the report describes these weights
    assert sum(passed) >= 3, dict(zip(neurons.groups, passed))
