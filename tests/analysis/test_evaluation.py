"""Cross-domain evaluation: every metric per group and domain, random controls, effects vs random."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from helpers import DOMAINS, make_samples
from mm_lens.analysis.evaluation import METRICS, CrossDomainResult, evaluate_cross_domain
from mm_lens.neurons.neuron_set import NeuronSet


@pytest.fixture(scope="module")
def samples():
    return make_samples(6)


def _lm_set(model, chosen):
    """A NeuronSet over the LM MLP: ``chosen`` maps group -> (layer, [neurons])."""
    layers = model.cfg.n_layers
    neurons = {}
    for group, (layer, idx) in chosen.items():
        per_layer = [torch.tensor(idx if l == layer else [], dtype=torch.long) for l in range(layers)]
        neurons[group] = {"lm_mlp": per_layer}
    return NeuronSet(neurons, {"lm_mlp": model.cfg.d_mlp}, {"method": "test"})


def test_cross_domain_matrix_shapes_and_identities(model, samples, tmp_path):
    width = model.cfg.d_mlp
    neuron_set = _lm_set(model, {"noise": (0, list(range(width // 2))), "plain": (1, []), "stripes": (1, list(range(width // 2)))})
    result = evaluate_cross_domain(model, samples, neuron_set, seeds=(0, 1), max_new_tokens=2, progress=False)
    assert result.groups == ["noise", "plain", "stripes"] and result.domains == list(DOMAINS)
    for metric in METRICS:
        assert result.chosen[metric].shape == (3, 3)
        assert result.random[metric].shape == (2, 3, 3)
    # a group with no neuron changes nothing, for itself and for its random control
    assert torch.equal(result.chosen["answer_logprob"][1], result.baseline["answer_logprob"])
    assert torch.equal(result.chosen["hidden_change"][1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(result.random["hidden_change"][:, 1], torch.zeros(2, 3, dtype=torch.float64))
    # switching off half a layer moves the final hidden state
    assert (result.chosen["hidden_change"][2] > 0).all()
    mean, std = result.random_delta("answer_logprob")
    assert mean.shape == std.shape == (3, 3)
    assert "stripes off" in result.table("accuracy")
    assert isinstance(result.plot("answer_logprob"), Figure)
    result.save(tmp_path)
    loaded = CrossDomainResult.load(tmp_path)
    assert loaded.groups == result.groups and all(torch.equal(loaded.chosen[m], result.chosen[m]) for m in METRICS)


def test_missing_answers_or_seeds_are_errors(model, samples):
    neuron_set = _lm_set(model, {"noise": (0, [1])})
    with pytest.raises(ValueError, match="no 'answer' field"):
        evaluate_cross_domain(model, [{k: v for k, v in s.items() if k != "answer"} for s in samples], neuron_set, progress=False)
    with pytest.raises(ValueError, match="at least one seed"):
        evaluate_cross_domain(model, samples, neuron_set, seeds=(), progress=False)


def test_union_row_and_complementary_deactivation(model, samples):
    width = model.cfg.d_mlp
    neuron_set = _lm_set(model, {"noise": (0, [0, 1]), "plain": (1, [2])})
    result = evaluate_cross_domain(model, samples, neuron_set, seeds=(0,), include_union=True, max_new_tokens=1, progress=False)
    assert result.groups == ["noise", "plain", "(all)"]
    everything_but = evaluate_cross_domain(
        model, samples, _lm_set(model, {"noise": (0, list(range(width // 2)))}), seeds=(0,), complementary=True, max_new_tokens=1, progress=False
    )
    # keeping half of layer 0 and switching off the rest, and all of layer 1, moves the answer
    assert (everything_but.chosen["hidden_change"] > 0).all()
    assert everything_but.metadata["complementary"] is True


def _constructed() -> CrossDomainResult:
    """Two domain groups and a union row over two domains, three seeds, known numbers."""
    baseline = {m: torch.tensor([-1.0, -2.0], dtype=torch.float64) for m in METRICS}
    chosen = {m: torch.tensor([[-1.9, -2.1], [-1.1, -2.05], [-2.0, -3.0]], dtype=torch.float64) for m in METRICS}
    random = {m: torch.stack([chosen[m] * 0 + baseline[m] + shift for shift in (-0.1, -0.2, -0.3)]) for m in METRICS}
    return CrossDomainResult(["a", "b", "(all)"], ["a", "b"], baseline, chosen, random)


def test_effects_put_own_and_other_domains_next_to_random():
    a, b, union = _constructed().effects("answer_logprob")
    assert a.own == pytest.approx(-0.9) and a.own_random == pytest.approx(-0.2) and a.own_random_sd == pytest.approx(0.1)  # sample sd over the 3 seeds
    assert a.others == pytest.approx(-0.1) and a.others_ratio == pytest.approx(0.5) and a.own_ratio == pytest.approx(4.5)
    assert a.beyond_random and not b.beyond_random  # b: -0.05 against random -0.2 ± 0.1
    assert union.own is None and union.others == pytest.approx(-1.0)


def test_summary_is_written_from_the_numbers():
    text = _constructed().summary("answer_logprob")
    assert text.startswith("a neurons off change a answers' answer logprob by -0.900 nats (4.5× the matched random neurons, -0.200 ± 0.100)")
    assert "other domains -0.100 (0.5× random)" in text
    assert text.endswith("1 of 2 domains' own answer logprob drops by more than random's mean - 2 sd (and more than 0.001): a.")
    flat = _constructed()
    flat.chosen = {m: v * 0 + flat.baseline[m] for m, v in flat.chosen.items()}
    flat.random = {m: v * 0 + flat.baseline[m] for m, v in flat.random.items()}
    assert flat.summary("answer_logprob") == ("No group's neurons change its own domain's answer logprob by 0.001 nats or more. "
                                              "0 of 2 domains' own answer logprob drops by more than random's mean - 2 sd (and more than 0.001).")
    with pytest.raises(ValueError, match="unknown metric 'loss'"):
        _constructed().summary("loss")


def test_summary_leads_with_groups_beyond_random_and_names_opposite_signs():
    result = _constructed()
    result.chosen = {m: torch.tensor([[-1.3, -2.1], [-1.0, -3.0], [-2.0, -3.0]], dtype=torch.float64) for m in METRICS}
    # a: -0.3 within random's -0.2 ± 0.1; b: -1.0 far beyond: b leads although a is listed first
    assert result.summary("answer_logprob").startswith("b neurons off change b answers'")
    result.chosen = {m: torch.tensor([[-0.5, -2.1], [-1.0, -3.0], [-2.0, -3.0]], dtype=torch.float64) for m in METRICS}
    assert "+0.500 nats (the opposite way to the matched random neurons, -0.200 ± 0.100)" in result.summary("answer_logprob")


def test_modality_groups_are_never_read_as_the_domain_of_the_same_name():
    """MINER's ``text`` group against a ``text`` evaluation dataset: no own domain."""
    result = _constructed()
    result.groups, result.domains = ["text", "image", "(all)"], ["document", "text"]
    result.metadata = {"neurons": {"method": "miner"}}
    assert all(e.own is None for e in result.effects())
    assert result.summary().startswith("text neurons off change answer logprob by")
    result.metadata = {"neurons": {"method": "lape"}}
    assert result.effects()[0].own is not None


def test_mean_ablation_runs_end_to_end_with_the_statistics_means(model, samples):
    from mm_lens.neurons.collection import collect_neuron_stats

    neuron_set = _lm_set(model, {"noise": (0, [0, 1, 2])})
    with pytest.raises(ValueError, match="mode='mean' needs means="):
        evaluate_cross_domain(model, samples, neuron_set, mode="mean", progress=False)
    means = collect_neuron_stats(model, samples, modules=["lm_mlp"], progress=False).neuron_means()
    result = evaluate_cross_domain(model, samples, neuron_set, mode="mean", means=means, seeds=(0,), max_new_tokens=1, progress=False)
    zero = evaluate_cross_domain(model, samples, neuron_set, seeds=(0,), max_new_tokens=1, progress=False)
    assert (result.chosen["hidden_change"] > 0).all() and not torch.equal(result.chosen["answer_logprob"], zero.chosen["answer_logprob"])
