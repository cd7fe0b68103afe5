"""The logit lens' pure core: chunked statistics equal the full-vocabulary computation,
and the stage rule recovers planted breakpoints."""

from __future__ import annotations

import pytest
import torch

from helpers import plateau_fall_tail
from mm_lens.analysis.lens_core import lens_logits, lens_logits_stats, three_stages


# ---- pure core ------------------------------------------------------------------------
def _problem(n=37, d=16, vocab=1000, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    resid = torch.randn(n, d, generator=g, dtype=dtype) * 3
    W_U = torch.randn(d, vocab, generator=g, dtype=dtype)
    b_U = torch.randn(vocab, generator=g, dtype=dtype)
    weight = torch.rand(d, generator=g, dtype=dtype) + 0.5
    targets = torch.randint(0, vocab, (n, 4), generator=g)

    def norm(x):
        return weight * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()

    return resid, norm, W_U, b_U, targets


def _direct(resid, norm, W_U, b_U, targets, k):
    logits = norm(resid) @ W_U + b_U
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(k)
    target_logits = logits.gather(1, targets)
    return {
        "entropy": -(logprobs.exp() * logprobs).sum(-1),
        "top_ids": top.indices,
        "top_probs": top.values.exp(),
        "target_logprobs": logprobs.gather(1, targets),
        "target_ranks": (logits[:, None, :] > target_logits[:, :, None]).sum(-1),
    }


@pytest.mark.parametrize("position_chunk, vocab_chunk", [(1, 1), (3, 7), (5, 77), (37, 1000), (8, 999), (256, 32768), (36, 333)])
def test_chunked_stats_equal_the_full_vocabulary_computation(position_chunk, vocab_chunk):
    resid, norm, W_U, b_U, targets = _problem()
    stats = lens_logits_stats(resid, norm, W_U, b_U, k=7, targets=targets, position_chunk=position_chunk, vocab_chunk=vocab_chunk)
    expected = _direct(resid, norm, W_U, b_U, targets, k=7)
    torch.testing.assert_close(stats.entropy, expected["entropy"], atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.top_probs, expected["top_probs"], atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.target_logprobs, expected["target_logprobs"], atol=1e-6, rtol=0)
    assert torch.equal(stats.top_ids, expected["top_ids"])
    assert torch.equal(stats.target_ranks, expected["target_ranks"])


def test_chunked_stats_in_float32_match_float64_within_rounding():
    resid, norm, W_U, b_U, targets = _problem(vocab=5000)
    exact = _direct(resid, norm, W_U, b_U, targets, k=5)
    stats = lens_logits_stats(resid.float(), lambda x: norm(x.double()).float(), W_U.float(), b_U.float(), k=5, targets=targets, position_chunk=6, vocab_chunk=1234)
    assert stats.entropy.dtype == torch.float32
    torch.testing.assert_close(stats.entropy.double(), exact["entropy"], atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.top_probs.double(), exact["top_probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.target_logprobs.double(), exact["target_logprobs"], atol=1e-4, rtol=0)


def test_bfloat16_weights_are_read_as_the_model_reads_them():
    resid, norm, W_U, b_U, targets = _problem(vocab=3000)
    resid, W_U, b_U = resid.bfloat16(), W_U.bfloat16(), b_U.bfloat16()

    def bf16_norm(x):
        return norm(x.double()).bfloat16()

    stats = lens_logits_stats(resid, bf16_norm, W_U, b_U, k=5, targets=targets, vocab_chunk=1000, position_chunk=8)
    logits = torch.nn.functional.linear(bf16_norm(resid), W_U.T, b_U).float()  # what a bfloat16 lm_head returns
    logprobs = logits.log_softmax(-1)
    assert stats.entropy.dtype == torch.float32
    torch.testing.assert_close(stats.entropy, -(logprobs.exp() * logprobs).sum(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats.target_logprobs, logprobs.gather(1, targets), atol=1e-4, rtol=0)
    assert torch.equal(stats.target_ranks, (logits[:, None, :] > logits.gather(1, targets)[:, :, None]).sum(-1))
    torch.testing.assert_close(stats.top_probs, logprobs.topk(5).values.exp(), atol=1e-5, rtol=0)  # ties make ids ambiguous


def test_rank_counts_the_tokens_with_a_strictly_larger_logit():
    resid, norm, W_U, b_U, _ = _problem(n=6, vocab=50)
    logits = lens_logits(resid, norm, W_U, b_U)
    order = logits.argsort(-1, descending=True)
    targets = order[:, [0, 1, 10, 49]]  # the top token, the second, the eleventh, the last
    stats = lens_logits_stats(resid, norm, W_U, b_U, k=3, targets=targets, vocab_chunk=7)
    assert stats.target_ranks.tolist() == [[0, 1, 10, 49]] * 6
    assert torch.equal(stats.top_ids[:, 0], targets[:, 0])


def test_uniform_logits_have_entropy_log_vocab():
    stats = lens_logits_stats(torch.randn(4, 8), None, torch.zeros(8, 300), k=2, vocab_chunk=64)
    torch.testing.assert_close(stats.entropy, torch.full((4,), torch.log(torch.tensor(300.0)).item()))
    torch.testing.assert_close(stats.top_probs, torch.full((4, 2), 1 / 300))


def test_final_norm_sees_at_most_position_chunk_rows():
    resid, norm, W_U, b_U, _ = _problem(n=37)
    seen = []
    lens_logits_stats(resid, lambda x: seen.append(x.shape[0]) or norm(x), W_U, b_U, position_chunk=10)
    assert seen == [10, 10, 10, 7]


@pytest.mark.parametrize("k", [0, -1, 1001, 2.5, True])
def test_core_rejects_bad_k(k):
    resid, norm, W_U, b_U, _ = _problem()
    with pytest.raises(ValueError, match="k must be an integer"):
        lens_logits_stats(resid, norm, W_U, b_U, k=k)


def test_core_rejects_bad_shapes_and_targets():
    resid, norm, W_U, _, targets = _problem()
    with pytest.raises(ValueError, match="resid must be"):
        lens_logits_stats(resid[None], norm, W_U)
    with pytest.raises(ValueError, match="W_U must be"):
        lens_logits_stats(resid, norm, W_U.T)
    with pytest.raises(ValueError, match="target ids must lie"):
        lens_logits_stats(resid, norm, W_U, targets=targets + 1000)
    with pytest.raises(ValueError, match="targets must be integer"):
        lens_logits_stats(resid, norm, W_U, targets=targets[:3])
    with pytest.raises(ValueError, match="chunks must be"):
        lens_logits_stats(resid, norm, W_U, vocab_chunk=0)


# ---- stage rule -----------------------------------------------------------------------
@pytest.mark.parametrize("n_layers, b1, b2", [(32, 8, 20), (32, 4, 12), (24, 10, 14), (40, 15, 30), (12, 3, 9)])
def test_three_stages_recovers_planted_breakpoints(n_layers, b1, b2):
    assert three_stages(plateau_fall_tail(n_layers, b1, b2)) == (b1, b2)


@pytest.mark.parametrize("seed", range(5))
def test_three_stages_recovers_planted_breakpoints_under_noise(seed):
    found = three_stages(plateau_fall_tail(32, 9, 21, noise=0.15, seed=seed))
    assert abs(found[0] - 9) <= 1 and abs(found[1] - 21) <= 1


def test_three_stages_recovers_planted_steps():
    curve = torch.tensor([9.0] * 7 + [5.0] * 9 + [1.5] * 8)
    assert three_stages(curve) == (7, 16)


def test_three_stages_needs_three_layers_and_finite_values():
    with pytest.raises(ValueError, match="impossible"):
        three_stages(torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        three_stages(torch.tensor([3.0, float("nan"), 1.0, 0.5]))
