"""LAPE selection (MMNeuron's steps 1-7, see mm_lens.neurons.lape) on hand-made and random counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mm_lens.neurons.lape import activation_probability, lape_entropy, lape_select


def reference_lape(over_zero, n_tokens, top_rate, filter_rate, activation_bar_ratio):
    """The published steps, one neuron at a time, in plain Python on float64 numbers.

    Ties in entropy go to the lower (layer, neuron); filtered neurons are never kept.
    """
    n_layer, n_neuron, n_domain = over_zero.shape
    p = np.zeros(over_zero.shape).tolist()
    for l in range(n_layer):
        for j in range(n_neuron):
            for d in range(n_domain):
                p[l][j][d] = int(over_zero[l, j, d]) / int(n_tokens[d])
    ranked = sorted(x for layer in p for neuron in layer for x in neuron)

    def kth(ratio):
        k = min(max(round(len(ranked) * ratio), 1), len(ranked))
        return ranked[k - 1]

    bar, activation_bar = kth(filter_rate), kth(activation_bar_ratio)
    entropies = []  # (H, layer, neuron), in module order
    for l in range(n_layer):
        for j in range(n_neuron):
            probs = p[l][j]
            total = sum(probs)
            normed = [x / total for x in probs] if total > 0 else [0.0] * n_domain
            h = -sum(x * math.log(x) for x in normed if x > 0)
            if not any(x > bar for x in probs):
                h = math.inf
            entropies.append((h, l, j))
    n_keep = round(n_layer * n_neuron * top_rate)
    kept = [(l, j) for h, l, j in sorted(entropies) if h < math.inf][:n_keep]
    result = [[[] for _ in range(n_layer)] for _ in range(n_domain)]
    for l, j in kept:
        for d in range(n_domain):
            if p[l][j][d] > activation_bar:
                result[d][l].append(j)
    return [[sorted(neurons) for neurons in domain] for domain in result]


def rates(top, filter, activation):
    return {"top_rate": top, "filter_rate": filter, "activation_bar_ratio": activation}


def as_lists(selection):
    return [[t.tolist() for t in domain] for domain in selection]


def distinct_counts(seed):
    """Counts without repeated values, so entropies have no ties; random shape."""
    rng = np.random.default_rng(seed)
    n_layer, n_neuron, n_domain = rng.integers(1, 5), rng.integers(5, 120), rng.integers(2, 7)
    size = n_layer * n_neuron * n_domain
    over_zero = rng.permutation(10**6)[:size].reshape(n_layer, n_neuron, n_domain)
    n_tokens = rng.integers(10**6, 2 * 10**6, size=n_domain)
    return torch.from_numpy(over_zero), torch.from_numpy(n_tokens)


def sparse_counts(seed):
    """Small counts, mostly zero: many neurons fire for one domain only (H = 0, tied)."""
    rng = np.random.default_rng(seed)
    n_layer, n_neuron, n_domain = rng.integers(1, 5), rng.integers(5, 120), rng.integers(2, 7)
    over_zero = rng.integers(0, 50, size=(n_layer, n_neuron, n_domain))
    over_zero[rng.random(over_zero.shape) < 0.7] = 0
    n_tokens = rng.integers(50, 80, size=n_domain)
    return torch.from_numpy(over_zero), torch.from_numpy(n_tokens)


RATES = [  # (top_rate, filter_rate, activation_bar_ratio)
    (0.01, 0.95, 0.95),
    (0.05, 0.9, 0.9),
    (0.2, 0.8, 0.5),
    (0.5, 0.5, 0.7),
    (1.0, 0.6, 0.3),
]


@pytest.mark.parametrize("seed", range(40))
def test_lape_matches_direct_reimplementation_on_random_counts(seed):
    over_zero, n_tokens = distinct_counts(seed)
    for rates in RATES:
        assert as_lists(lape_select(over_zero, n_tokens, *rates)) == reference_lape(
            over_zero.numpy(), n_tokens.numpy(), *rates
        )


@pytest.mark.parametrize("seed", range(20))
def test_lape_breaks_entropy_ties_by_layer_then_neuron_like_reimplementation(seed):
    over_zero, n_tokens = sparse_counts(seed)
    for rates in RATES:
        assert as_lists(lape_select(over_zero, n_tokens, *rates)) == reference_lape(
            over_zero.numpy(), n_tokens.numpy(), *rates
        )


def test_lape_entropy_is_entropy_of_probabilities_normalised_over_domains():
    over_zero = torch.tensor([[[5, 5], [10, 0], [0, 0], [3, 1]]])
    n_tokens = torch.tensor([10, 20])
    # p: [.5, .25], [1, 0], [0, 0], [.3, .05] -> p': [2/3, 1/3], [1, 0], [0, 0], [6/7, 1/7]
    expected = [
        -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)),
        0.0,
        0.0,
        -(6 / 7 * math.log(6 / 7) + 1 / 7 * math.log(1 / 7)),
    ]
    entropy = lape_entropy(over_zero, n_tokens)
    assert entropy.shape == (1, 4) and entropy.dtype == torch.float64
    torch.testing.assert_close(entropy[0], torch.tensor(expected, dtype=torch.float64))


def test_activation_probability_divides_each_domain_by_its_token_count():
    over_zero = torch.tensor([[[1, 3], [2, 0]]])
    p = activation_probability(over_zero, torch.tensor([4, 6]))
    torch.testing.assert_close(p, torch.tensor([[[0.25, 0.5], [0.5, 0.0]]], dtype=torch.float64))


def test_lape_distinguishes_probabilities_closer_than_float32_resolution():
    # Realistic token counts (2**26): p = 0.5 + 2**-26 and 0.5 + 2**-25 are equal in float32.
    over_zero = torch.tensor([[[2**25 + 1], [2**25 + 2]]])
    n_tokens = torch.tensor([2**26])
    selection = lape_select(over_zero, n_tokens, **rates(top=1.0, filter=0.5, activation=0.5))
    assert as_lists(selection) == [[[1]]]


def test_lape_single_domain_keeps_first_neurons_above_filter_bar():
    # One domain: every firing neuron has H = 0, so the filter alone decides, then module order.
    over_zero = torch.tensor([[3, 9, 1, 7, 5], [8, 2, 10, 4, 6]]).unsqueeze(-1)
    n_tokens = torch.tensor([10])
    # bar = 5th smallest of 10 values = 0.5 -> above it: (0,1), (0,3), (1,0), (1,2), (1,4)
    selection = lape_select(over_zero, n_tokens, **rates(top=0.3, filter=0.5, activation=0.5))
    assert as_lists(selection) == [[[1, 3], [0]]]


def test_lape_keeps_lowest_entropy_neurons_of_all_layers_together():
    # Layer 0: each neuron fires for one domain (H = 0). Layer 1: spread over both (H > 0).
    over_zero = torch.tensor([[[9, 0], [0, 8], [7, 0]], [[9, 8], [8, 9], [9, 9]]])
    n_tokens = torch.tensor([10, 10])
    selection = lape_select(over_zero, n_tokens, **rates(top=0.5, filter=0.0, activation=0.0))
    assert as_lists(selection) == [[[0, 2], []], [[1], []]]


def test_lape_gives_domain_no_neuron_empty_tensor_for_every_layer():
    # Neuron 0 fires almost always in domain 0 only; domain 2 never exceeds the bar.
    over_zero = torch.tensor(
        [
            [[9, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 1]],
            [[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]],
        ]
    )
    n_tokens = torch.tensor([10, 10, 10])
    selection = lape_select(over_zero, n_tokens, **rates(top=1.0, filter=0.9, activation=0.9))
    assert len(selection) == 3
    assert as_lists(selection) == [[[0], []], [[], []], [[], []]]
    assert all(t.dtype == torch.int64 and t.numel() == 0 for t in selection[2])


def test_lape_never_selects_neurons_that_never_fire():
    over_zero = torch.tensor([[[0, 0], [4, 0], [0, 0]], [[0, 3], [0, 0], [2, 5]]])
    n_tokens = torch.tensor([10, 10])
    # Every rate at its loosest: all neurons that fire anywhere are kept and assigned.
    selection = lape_select(over_zero, n_tokens, **rates(top=1.0, filter=0.0, activation=0.0))
    assert as_lists(selection) == [[[1], [2]], [[], [0, 2]]]


def test_lape_never_selects_filtered_neurons_even_when_top_k_exceeds_survivors():
    # Only neuron 0 passes the filter (bar = 0.5); the others sit at or below it in every
    # domain but above the lower activation bar (0.1). Keeping all (top_rate=1) must not
    # pull them in through the activation bar.
    over_zero = torch.tensor([[[9, 0], [5, 5], [2, 5], [5, 2]]])
    n_tokens = torch.tensor([10, 10])
    selection = lape_select(over_zero, n_tokens, **rates(top=1.0, filter=0.75, activation=0.25))
    assert as_lists(selection) == [[[0]], [[]]]


def test_lape_assigns_neuron_to_every_domain_above_bar():
    over_zero = torch.tensor([[[9, 8, 0], [1, 0, 0], [0, 1, 0], [1, 1, 1]]])
    n_tokens = torch.tensor([10, 10, 10])
    # bar = 9th smallest of 12 probabilities = 0.1; neuron 0 exceeds it in domains 0 and 1.
    selection = lape_select(over_zero, n_tokens, **rates(top=1.0, filter=0.75, activation=0.75))
    assert as_lists(selection) == [[[0]], [[0]], [[]]]


def test_lape_returns_sorted_int64_per_layer_ordered_by_domain():
    over_zero, n_tokens = distinct_counts(7)
    selection = lape_select(over_zero, n_tokens, **rates(top=0.3, filter=0.5, activation=0.5))
    p = activation_probability(over_zero, n_tokens)
    bar = p.flatten().kthvalue(round(p.numel() * 0.5)).values
    assert len(selection) == over_zero.shape[2]
    assert sum(t.numel() for domain in selection for t in domain) > 0
    for d, domain in enumerate(selection):
        assert len(domain) == over_zero.shape[0]
        for layer, neurons in enumerate(domain):
            assert neurons.dtype == torch.int64 and neurons.ndim == 1
            assert torch.equal(neurons, neurons.sort().values)
            assert (p[layer, neurons, d] > bar).all()  # domain d's list holds domain d's neurons


def test_lape_clamps_kthvalue_rank_to_one_for_zero_rates():
    # round(numel * 0.0) = 0 is not a valid kthvalue rank: the bar is the minimum instead.
    over_zero = torch.tensor([[[1, 2], [3, 4]]])
    n_tokens = torch.tensor([10, 10])
    selection = lape_select(over_zero, n_tokens, **rates(top=1.0, filter=0.0, activation=0.0))
    # bar = 0.1: neuron 0 passes through domain 1 only, neuron 1 through both.
    assert as_lists(selection) == [[[1]], [[0, 1]]]


def test_lape_selects_nothing_when_top_rate_rounds_to_zero():
    over_zero, n_tokens = distinct_counts(3)
    selection = lape_select(over_zero, n_tokens, top_rate=0.0)
    assert all(t.numel() == 0 for domain in selection for t in domain)


ONES = torch.ones(1, 2, 2, dtype=torch.long)
FIVES = torch.tensor([5, 5])


@pytest.mark.parametrize(
    ("over_zero", "n_tokens", "message"),
    [
        (torch.ones(2, 3, dtype=torch.long), FIVES, r"over_zero has shape \(2, 3\)"),
        (
            torch.ones(1, 2, 3, dtype=torch.long),
            FIVES,
            r"n_tokens has shape \(2,\) but over_zero has shape \(1, 2, 3\)",
        ),
        (ONES, torch.tensor([[5, 5]]), r"n_tokens has shape \(1, 2\)"),
        (torch.ones(0, 2, 2, dtype=torch.long), FIVES, "need at least one layer"),
        (ONES, torch.tensor([5, 0]), r"n_tokens is 0 for domain\(s\) \[1\]"),
        (-ONES, FIVES, "over_zero holds negative values"),
        (ONES, torch.tensor([5, -5]), "n_tokens holds negative values"),
        (torch.tensor([[[1, 6], [2, 2]]]), FIVES, r"exceeds n_tokens in domain\(s\) \[1\]"),
        (torch.tensor([[[1.0, float("nan")]]]), FIVES, "over_zero holds NaN or inf"),
        (ONES.bool(), FIVES, "over_zero has dtype torch.bool"),
    ],
)
def test_lape_rejects_bad_counts_with_message(over_zero, n_tokens, message):
    with pytest.raises(ValueError, match=message):
        lape_select(over_zero, n_tokens)


@pytest.mark.parametrize("name", ["top_rate", "filter_rate", "activation_bar_ratio"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_lape_rejects_rates_outside_unit_interval(name, value):
    with pytest.raises(ValueError, match=f"{name} is {value}; pass a fraction in"):
        lape_select(ONES, FIVES, **{name: value})
