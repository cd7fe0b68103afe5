"""MINER core: importance metrics, aggregation, weighting and selection on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mm_lens.neurons.miner import (
    DEFAULT_METRIC_WEIGHTS,
    MINER_METRICS,
    MINER_STRATEGIES,
    ScoreAccumulator,
    aggregate_scores,
    combine_datasets,
    importance_scores,
    min_max_normalize,
    miner_select,
    weighted_score,
)

# --- plain-Python references -----------------------------------------------------------


def ref_minmax(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]


def ref_softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def ref_metrics(act: list[list[float]], attn: list[list[float]], published: bool) -> dict:
    """Metrics of one layer by loops over tokens (t), queries (q), keys (k), neurons (n)."""
    n_tok, n_neu = len(act), len(act[0])
    cols = [[act[t][n] for t in range(n_tok)] for n in range(n_neu)]
    raw = {
        "prob": [sum(v > 0 for v in col) / n_tok for col in cols],
        "mean": [sum(col) / n_tok for col in cols],
        "max": [max(col) for col in cols],
    }
    if published:
        w_q = [ref_softmax(row) for row in attn]  # softmax over keys, per query
        by_key = [ref_softmax([attn[q][k] for q in range(n_tok)]) for k in range(n_tok)]
        w_k = [[by_key[k][q] for k in range(n_tok)] for q in range(n_tok)]  # over queries
    else:
        w_q = w_k = attn
    raw["attn_q"] = [
        sum(w_q[q][k] * act[k][n] for q in range(n_tok) for k in range(n_tok))
        for n in range(n_neu)
    ]
    raw["attn_k"] = [
        sum(w_k[q][k] * act[q][n] for q in range(n_tok) for k in range(n_tok))
        for n in range(n_neu)
    ]
    return {name: ref_minmax(v) for name, v in raw.items()}


def ref_select(scores: list, ratio: float, strategy: str) -> dict[int, list[tuple[int, int]]]:
    """Published selection by sorting Python lists; keys are modality indices."""
    n_mod, n_lay, n_neu = len(scores), len(scores[0]), len(scores[0][0])
    k_total = int(ratio * n_lay * n_neu)
    out: dict[int, set] = {m: set() for m in range(n_mod)}

    def top(items, k):  # items: (value, *key)
        return [item[1:] for item in sorted(items, key=lambda it: -it[0])[:k]]

    if strategy == "LA_MU":
        for m in range(n_mod):
            items = [(scores[m][l][n], l, n) for l in range(n_lay) for n in range(n_neu)]
            out[m].update(top(items, k_total // n_mod))
    elif strategy == "adaptive":
        items = [
            (sum(scores[m][l][n] for m in range(n_mod)), l, n)
            for l in range(n_lay)
            for n in range(n_neu)
        ]
        for l, n in top(items, k_total):
            best = max(range(n_mod), key=lambda m: scores[m][l][n])
            out[best].add((l, n))
    elif strategy == "LU_MA":
        for l in range(n_lay):
            items = [(scores[m][l][n], m, n) for m in range(n_mod) for n in range(n_neu)]
            for m, n in top(items, k_total // n_lay):
                out[m].add((l, n))
    elif strategy == "uniform":
        for m in range(n_mod):
            for l in range(n_lay):
                items = [(scores[m][l][n], n) for n in range(n_neu)]
                out[m].update((l, n) for (n,) in top(items, k_total // (n_mod * n_lay)))
    return {m: sorted(pairs) for m, pairs in out.items()}


def as_pairs(t: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(p) for p in t.tolist()]


# --- importance_scores -----------------------------------------------------------------


@pytest.fixture
def sample():
    g = torch.Generator().manual_seed(0)
    act = torch.randn(6, 5, generator=g, dtype=torch.float64)
    logits = torch.randn(6, 6, generator=g, dtype=torch.float64)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    pattern = logits.masked_fill(~causal, -math.inf).softmax(-1)[1:, 1:]  # restricted
    return act[1:], pattern, logits[1:, 1:]


def test_metrics_equal_loops_for_causal_pattern(sample):
    act, pattern, _ = sample
    got = importance_scores(act, pattern)
    want = ref_metrics(act.tolist(), pattern.tolist(), published=False)
    assert list(got) == list(MINER_METRICS)
    for name in MINER_METRICS:
        torch.testing.assert_close(got[name], torch.tensor(want[name], dtype=torch.float64))


def test_metrics_equal_loops_for_published_scores(sample):
    act, _, scores = sample
    got = importance_scores(act, scores, published_attention=True)
    want = ref_metrics(act.tolist(), scores.tolist(), published=True)
    for name in MINER_METRICS:
        torch.testing.assert_close(got[name], torch.tensor(want[name], dtype=torch.float64))


def test_published_variant_equals_public_code_expressions(sample):
    act, _, s = sample
    got = importance_scores(act, s, published_attention=True)
    attn_k = (torch.softmax(s, dim=0).T @ act).sum(dim=0)
    attn_q = (torch.softmax(s, dim=1) @ act).sum(dim=0)
    torch.testing.assert_close(got["attn_k"], min_max_normalize(attn_k))
    torch.testing.assert_close(got["attn_q"], min_max_normalize(attn_q))


def test_attn_q_weights_tokens_by_attention_received():
    act = torch.tensor([[1.0, 5.0, 3.0], [9.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    pattern = torch.zeros(3, 3)
    pattern[:, 0] = 1.0  # every query attends only to token 0
    got = importance_scores(act, pattern)
    torch.testing.assert_close(got["attn_q"], torch.tensor([0.0, 1.0, 0.5]))
    # each token pays attention 1, so attn_k is the token sum of act
    torch.testing.assert_close(got["attn_k"], min_max_normalize(act.sum(0)))


def test_metrics_without_attention_are_the_activation_statistics(sample):
    act, _, _ = sample
    assert list(importance_scores(act)) == ["prob", "mean", "max"]


def test_layer_batch_equals_one_layer_at_a_time():
    g = torch.Generator().manual_seed(1)
    act = torch.randn(3, 7, 4, generator=g)
    attn = torch.rand(3, 7, 7, generator=g)
    for published in (False, True):
        batched = importance_scores(act, attn, published_attention=published)
        for layer in range(3):
            single = importance_scores(act[layer], attn[layer], published_attention=published)
            for name in MINER_METRICS:
                torch.testing.assert_close(batched[name][layer], single[name])


def test_min_max_maps_constant_rows_to_zeros():
    x = torch.tensor([[1.0, 3.0, 2.0], [4.0, 4.0, 4.0]])
    torch.testing.assert_close(min_max_normalize(x), torch.tensor([[0, 1, 0.5], [0, 0, 0.0]]))


def test_constant_activations_give_zero_scores_not_nan():
    got = importance_scores(torch.full((3, 4), 2.0), torch.rand(3, 3))
    for value in got.values():
        assert torch.equal(value, torch.zeros(4))


def test_low_precision_activations_are_scored_in_float32(sample):
    act, pattern, _ = sample
    got = importance_scores(act.bfloat16(), pattern.bfloat16())
    assert all(v.dtype == torch.float32 for v in got.values())


def test_importance_scores_errors():
    with pytest.raises(ValueError, match="absent from this sample"):
        importance_scores(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"pass the attention among the same tokens, \[3, 3\]"):
        importance_scores(torch.zeros(3, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="needs attn"):
        importance_scores(torch.zeros(3, 4), published_attention=True)
    with pytest.raises(ValueError, match=r"\[token, neuron\]"):
        importance_scores(torch.zeros(4))


# --- aggregation -----------------------------------------------------------------------


def test_accumulator_and_combination_equal_direct_computation():
    modalities, n_lay, n_neu = ("text", "image", "audio"), 2, 3
    g = torch.Generator().manual_seed(2)
    # dataset -> samples -> modalities present in that sample
    datasets = [
        [("text", "image"), ("text", "image"), ("text",)],
        [("text",), ("text",)],
        [("text", "image"), ("image",)],
    ]
    data = [
        [{m: torch.rand(len(MINER_METRICS), n_lay, n_neu, generator=g) for m in s} for s in ds]
        for ds in datasets
    ]
    accs = []
    for ds in data:
        acc = ScoreAccumulator(MINER_METRICS, modalities, n_lay, n_neu)
        for sample in ds:
            for m, x in sample.items():
                acc.add(m, dict(zip(MINER_METRICS, x)))
        accs.append(acc)

    want = torch.zeros(len(MINER_METRICS), 3, n_lay, n_neu, dtype=torch.float64)
    for i, m in enumerate(modalities):
        per_dataset = []
        for ds in data:
            seen = [sample[m].double() for sample in ds if m in sample]
            if seen:
                per_dataset.append(sum(seen) / len(seen))
        if per_dataset:
            want[:, i] = sum(per_dataset) / len(per_dataset)

    got = aggregate_scores(accs)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        combine_datasets([a.mean() for a in accs], [a.present for a in accs]), want
    )
    assert accs[1].present.tolist() == [True, False, False]
    assert accs[0].counts.tolist() == [3, 2, 0]


def test_accumulator_errors():
    acc = ScoreAccumulator(MINER_METRICS, ("text",), 2, 3)
    no_attn = {m: torch.zeros(2, 3) for m in ("prob", "mean", "max")}
    with pytest.raises(ValueError, match="lack metric"):
        acc.add("text", no_attn)
    with pytest.raises(ValueError, match="unknown modality 'image'"):
        acc.add("image", no_attn)
    with pytest.raises(ValueError, match=r"expected \[layer, neuron\]"):
        acc.add("text", {m: torch.zeros(3, 2) for m in MINER_METRICS})
    with pytest.raises(ValueError, match="same metrics and modalities"):
        aggregate_scores([acc, ScoreAccumulator(MINER_METRICS, ("image",), 2, 3)])


def test_weighted_score_equals_loop():
    scores = torch.rand(5, 2, 3, 4, dtype=torch.float64)
    got = weighted_score(scores)
    want = sum(DEFAULT_METRIC_WEIGHTS[m] * scores[i] for i, m in enumerate(MINER_METRICS))
    torch.testing.assert_close(got, want)
    assert DEFAULT_METRIC_WEIGHTS == {"prob": 0, "mean": 0.25, "max": 0.25, "attn_k": 0.5,
                                      "attn_q": 0}


def test_weighted_score_rejects_weights_for_missing_metrics():
    scores = torch.rand(3, 2, 3, 4)
    with pytest.raises(ValueError, match=r"weights for \['attn_k'\]"):
        weighted_score(scores, metrics=("prob", "mean", "max"))
    got = weighted_score(scores, {"mean": 1.0, "attn_k": 0.0}, metrics=("prob", "mean", "max"))
    torch.testing.assert_close(got, scores[1])


# --- selection -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["LA_MU", "adaptive", "LU_MA", "uniform"])
@pytest.mark.parametrize("ratio", [0.1, 0.37])
def test_selection_equals_reference(strategy, ratio):
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 4, 50, generator=g, dtype=torch.float64)
    modalities = ("text", "image", "audio")
    got = miner_select(scores, modalities, ratio=ratio, strategy=strategy)
    want = ref_select(scores.tolist(), ratio, strategy)
    assert list(got) == list(modalities)
    for i, m in enumerate(modalities):
        assert got[m].dtype == torch.long and got[m].shape[1] == 2
        assert as_pairs(got[m]) == want[i]


def test_selection_sizes_follow_published_integer_division():
    scores = torch.rand(3, 4, 50)
    k = int(0.37 * 4 * 50)  # 74
    sizes = {s: [len(v) for v in miner_select(scores, "abc", 0.37, s).values()]
             for s in MINER_STRATEGIES}
    assert sizes["LA_MU"] == sizes["random"] == [k // 3] * 3
    assert sum(sizes["adaptive"]) == k
    assert sum(sizes["LU_MA"]) == (k // 4) * 4
    assert sizes["uniform"] == [(k // 12) * 4] * 3


def test_random_draws_distinct_seeded_neurons_per_modality():
    scores = torch.rand(2, 4, 50)
    a = miner_select(scores, ("text", "image"), 0.1, "random", seed=5)
    b = miner_select(scores, ("text", "image"), 0.1, "random", seed=5)
    c = miner_select(scores, ("text", "image"), 0.1, "random", seed=6)
    for m in ("text", "image"):
        pairs = as_pairs(a[m])
        assert len(pairs) == 10 and len(set(pairs)) == 10 and pairs == sorted(pairs)
        assert torch.equal(a[m], b[m])
    assert not torch.equal(a["text"], c["text"])
    assert not torch.equal(a["text"], a["image"])


def test_la_mu_recovers_planted_neurons_and_random_does_not():
    g = torch.Generator().manual_seed(4)
    n_mod, n_lay, n_neu, ratio = 2, 8, 500, 0.02
    per_mod = int(ratio * n_lay * n_neu) // n_mod
    scores = (0.3 + 0.1 * torch.randn(n_mod, n_lay, n_neu, generator=g)).clamp(0, 1)
    planted = torch.randperm(n_lay * n_neu, generator=g)[: n_mod * per_mod].view(n_mod, per_mod)
    for m in range(n_mod):
        flat = scores[m].view(-1)
        flat[planted[m]] = (0.8 + 0.1 * torch.randn(per_mod, generator=g)).clamp(0, 1)
    truth = {m: {divmod(int(i), n_neu) for i in planted[m]} for m in range(n_mod)}

    def precision_recall(strategy):
        got = miner_select(scores, ("text", "image"), ratio, strategy)
        out = []
        for m, name in enumerate(("text", "image")):
            chosen = set(as_pairs(got[name]))
            hits = len(chosen & truth[m])
            out.append((hits / len(chosen), hits / len(truth[m])))
        return out

    for precision, recall in precision_recall("LA_MU"):
        assert precision >= 0.95 and recall >= 0.95
    for precision, _ in precision_recall("random"):
        assert precision < 0.2


def test_ties_go_to_lower_layer_and_neuron():
    got = miner_select(torch.zeros(1, 2, 10), ("text",), ratio=0.15, strategy="LA_MU")
    assert as_pairs(got["text"]) == [(0, 0), (0, 1), (0, 2)]


def test_selection_errors():
    scores = torch.rand(2, 4, 50)
    with pytest.raises(ValueError, match="expected one of .*LA_MU.*adaptive.*LU_MA"):
        miner_select(scores, ("text", "image"), strategy="topk")
    with pytest.raises(ValueError, match="3 modality names .* scores has 2"):
        miner_select(scores, ("text", "image", "audio"))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
            miner_select(scores, ("text", "image"), ratio=bad)
    with pytest.raises(ValueError, match="repeat"):
        miner_select(scores, ("text", "text"))
    with pytest.raises(ValueError, match=r"\[modality, layer, neuron\]"):
        miner_select(torch.rand(4, 50), ("text",))


def test_too_small_ratio_error_names_a_ratio_that_works():
    scores = torch.rand(2, 4, 50)
    with pytest.raises(ValueError, match="uniform splits K into 8 parts") as err:
        miner_select(scores, ("text", "image"), ratio=0.02, strategy="uniform")
    suggested = float(str(err.value).rsplit(" ", 1)[-1])
    got = miner_select(scores, ("text", "image"), ratio=suggested, strategy="uniform")
    assert all(len(v) == 4 for v in got.values())
