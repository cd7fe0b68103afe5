"""Logit lens: the chunked core against a direct full-vocabulary computation, the model edge
against the model's own log-probabilities, the dataset summary, and the stage rule."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch

from helpers import make_samples, plateau_fall_tail, random_image
from mm_lens import HookedMLLM
from mm_lens.analysis.lens import LensSummary, final_norm_and_unembed, logit_lens, logit_lens_summary, normalize_component
from mm_lens.analysis.lens_core import lens_logits, lens_logits_stats


def _synthetic_summary(curves: dict[str, torch.Tensor], n=10) -> LensSummary:
    means = torch.stack(list(curves.values()))
    n_layers = means.shape[1]
    return LensSummary(
        domains=list(curves), layers=list(range(n_layers)), hook="resid_post", k=1,
        n_positions=torch.full((len(curves),), n), n_samples=torch.full((len(curves),), 2),
        entropy_sum=means * n, entropy_sq_sum=(means**2 + 0.25) * n,
        top_counts={d: [{5: n - 3, 7: 3} for _ in range(n_layers)] for d in curves},
        token_strings={5: "car", 7: "road"},
    )


def test_summary_stages_split_each_domain_curve():
    summary = _synthetic_summary({"driving": plateau_fall_tail(20, 5, 12), "medical": plateau_fall_tail(20, 8, 16)})
    assert summary.stages() == {"driving": (5, 12), "medical": (8, 16)}
    torch.testing.assert_close(summary.std(), torch.full((2, 20), 0.5, dtype=torch.float64))
    assert summary.top_tokens("driving", 3, n=2) == [("car", 0.7), ("road", 0.3)]
    assert "stages start at layers 0, 5, 12" in summary.table()
    summary.plot()



def test_summary_sentences_carry_the_measured_numbers():
    driving, medical = plateau_fall_tail(20, 5, 12), plateau_fall_tail(20, 8, 16) + 0.5
    summary = _synthetic_summary({"driving": driving, "medical": medical})
    text = summary.summary()
    start, end = float((driving[0] + medical[0]) / 2), float((driving[-1] + medical[-1]) / 2)
    assert f"goes from {start:.2f} nats at layer 0 to {end:.2f} at layer 19" in text
    assert f"driving is the most certain ({float(driving[-1]):.2f} nats) and medical the least ({float(medical[-1]):.2f})" in text
    assert "driving 'car' (70%)" in text and "medical 'car' (70%)" in text

# ---- the model edge -------------------------------------------------------------------
def _batch(model, n=4):
    samples = make_samples(n)
    return model.prepare_inputs([s["question"] for s in samples], [s["image"] for s in samples])


@pytest.mark.parametrize("positions", ["image", "last", "all"])
def test_lens_at_last_resid_post_equals_model_log_probs(model, positions):
    batch = _batch(model)
    vocab = model.cfg.d_vocab
    targets = torch.tensor([3, 10, vocab - 1])
    lens = logit_lens(model, batch, positions=positions, layers=[model.cfg.n_layers - 1], k=5, targets=targets, vocab_chunk=17, position_chunk=13)
    logits = model(batch)[lens.rows, lens.positions]
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(5)
    target_logits = logits[:, targets]
    torch.testing.assert_close(lens.entropy[0], -(logprobs.exp() * logprobs).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.top_probs[0], top.values.exp(), atol=1e-5, rtol=0)
    assert torch.equal(lens.top_ids[0], top.indices)
    torch.testing.assert_close(lens.target_logprobs[0], logprobs[:, targets], atol=1e-5, rtol=0)
    assert torch.equal(lens.target_ranks[0], (logits[:, None, :] > target_logits[:, :, None]).sum(-1))


def test_lens_in_compatibility_mode_equals_model_log_probs(model_folders):
    model = HookedMLLM.from_pretrained(model_folders["llava"], compatibility_mode=True)
    batch = _batch(model)
    lens = logit_lens(model, batch, layers=[model.cfg.n_layers - 1], k=3)
    logprobs = model(batch)[lens.rows, lens.positions].log_softmax(-1)
    torch.testing.assert_close(lens.entropy[0], -(logprobs.exp() * logprobs).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.top_probs[0], logprobs.topk(3).values.exp(), atol=1e-5, rtol=0)


def test_lens_reads_image_positions_by_default_in_batch_order(model):
    batch = _batch(model)
    lens = logit_lens(model, batch, k=2)
    rows, positions = torch.nonzero(batch.modality_map.mask("image"), as_tuple=True)
    assert torch.equal(lens.rows, rows) and torch.equal(lens.positions, positions)
    assert lens.layers == list(range(model.cfg.n_layers))
    assert lens.entropy.shape == (model.cfg.n_layers, len(rows))
    assert lens.top_ids.shape == lens.top_probs.shape == (model.cfg.n_layers, len(rows), 2)
    assert lens.target_ranks is None


def test_lens_of_each_layer_equals_the_core_on_cached_residuals(model):
    batch = _batch(model)
    kinds = ["resid_pre", "resid_mid", "resid_post"]
    lens = logit_lens(model, batch, hooks=kinds, k=4, targets=[5, 6])
    _, cache = model.run_with_cache(batch, names_filter=lambda n: any(n.endswith(f"hook_{kind}") for kind in kinds))
    mask = batch.modality_map.mask("image")
    norm, W_U, b_U = final_norm_and_unembed(model)
    for kind in kinds:
        for layer in lens.layers:
            expected = lens_logits_stats(cache[f"blocks.{layer}.hook_{kind}"][mask], norm, W_U, b_U, k=4, targets=lens.targets)
            torch.testing.assert_close(lens[kind].entropy[layer], expected.entropy, atol=1e-6, rtol=0)
            assert torch.equal(lens[kind].top_ids[layer], expected.top_ids)
            assert torch.equal(lens[kind].target_ranks[layer], expected.target_ranks)
    # the residual leaving a layer is the one entering the next
    torch.testing.assert_close(lens["resid_post"].entropy[0], lens["resid_pre"].entropy[1])


def test_component_direct_logits_add_up_to_the_model_logits(model):
    batch = _batch(model)
    names = ["blocks.0.hook_resid_pre", "ln_final.hook_scale"] + [
        f"blocks.{l}.hook_{kind}" for l in range(model.cfg.n_layers) for kind in ("attn_out", "mlp_out", "resid_mid", "resid_post")
    ]
    logits, cache = model.run_with_cache(batch, names_filter=names)
    scale = cache["ln_final.hook_scale"]
    _, W_U, _ = final_norm_and_unembed(model)
    b_U = model.bridge.unembed.b_U  # zeros when lm_head has no bias

    def direct(component):
        return lens_logits(normalize_component(model, component, scale).flatten(0, 1), None, W_U)

    parts = [direct(cache["blocks.0.hook_resid_pre"])]
    parts += [direct(cache[f"blocks.{l}.hook_{kind}"]) for l in range(model.cfg.n_layers) for kind in ("attn_out", "mlp_out")]
    torch.testing.assert_close(torch.stack(parts).sum(0) + b_U, logits.flatten(0, 1), atol=1e-4, rtol=0)
    # per layer: resid_post = resid_mid + mlp_out, in the residual and in direct logits
    for l in range(model.cfg.n_layers):
        mid, mlp, post = (cache[f"blocks.{l}.hook_{kind}"] for kind in ("resid_mid", "mlp_out", "resid_post"))
        torch.testing.assert_close(mid + mlp, post, atol=1e-5, rtol=0)
        torch.testing.assert_close(direct(mid) + direct(mlp), direct(post), atol=1e-4, rtol=0)


def test_component_lens_divides_by_the_final_residual_scale(model):
    batch = _batch(model)
    lens = logit_lens(model, batch, hooks=["attn_out", "mlp_out"], positions="all", k=3)
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n == "ln_final.hook_scale" or n.endswith(("hook_attn_out", "hook_mlp_out")))
    mask = ~batch.modality_map.mask("padding")
    scale = cache["ln_final.hook_scale"][mask]
    _, W_U, _ = final_norm_and_unembed(model)
    for kind in ("attn_out", "mlp_out"):
        for layer in lens.layers:
            logits = lens_logits(normalize_component(model, cache[f"blocks.{layer}.hook_{kind}"][mask], scale), None, W_U)
            logprobs = logits.log_softmax(-1)
            torch.testing.assert_close(lens[kind].entropy[layer], -(logprobs.exp() * logprobs).sum(-1), atol=1e-5, rtol=0)
            assert torch.equal(lens[kind].top_ids[layer], logprobs.topk(3).indices)


def test_top_tokens_decode_with_the_processor_tokenizer(model):
    lens = logit_lens(model, _batch(model), positions="last", k=3)
    decoded = lens.top_tokens(1)
    tokenizer = model.processor.tokenizer
    assert decoded == [[tokenizer.decode([i]) for i in row] for row in lens.top_ids[1].tolist()]
    assert "most frequent top-1" in lens.table()


def test_targets_given_as_words(model):
    batch = _batch(model)
    tokenizer = model.processor.tokenizer
    by_word = logit_lens(model, batch, positions="last", targets=["car", "road"], k=2)
    ids = torch.tensor([tokenizer.convert_tokens_to_ids("car"), tokenizer.convert_tokens_to_ids("road")])
    by_id = logit_lens(model, batch, positions="last", targets=ids, k=2)
    assert torch.equal(by_word.targets, by_id.targets)
    torch.testing.assert_close(by_word.target_logprobs, by_id.target_logprobs)


def test_lens_errors_say_what_to_do(model):
    batch = _batch(model)
    with pytest.raises(ValueError, match="hooks must be distinct kinds"):
        logit_lens(model, batch, hooks="resid_final")
    with pytest.raises(ValueError, match="unknown positions"):
        logit_lens(model, batch, positions="pixels")
    with pytest.raises(ValueError, match="bool tensor"):
        logit_lens(model, batch, positions=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must be an integer"):
        logit_lens(model, batch, k=0)
    with pytest.raises(ValueError, match="k must be an integer"):
        logit_lens(model, batch, k=model.cfg.d_vocab + 1)
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(model, batch, layers=[model.cfg.n_layers])
    with pytest.raises(ValueError, match="named twice"):
        logit_lens(model, batch, layers=[0, 0])
    with pytest.raises(ValueError, match="single tokens"):
        logit_lens(model, batch, targets=["red car"])
    with pytest.raises(ValueError, match="target ids must lie"):
        logit_lens(model, batch, targets=[model.cfg.d_vocab])
    with pytest.raises(ValueError, match="pick one with lens"):
        _ = logit_lens(model, batch, hooks=["resid_pre", "resid_post"], k=1).entropy
    text_only = model.prepare_inputs(["what is the color"], [None])
    with pytest.raises(ValueError, match="no position of the batch matches positions='image'"):
        logit_lens(model, text_only)


# ---- dataset summary ------------------------------------------------------------------
def test_summary_equals_direct_per_domain_aggregation(model):
    samples = make_samples(9)
    summary = logit_lens_summary(model, samples, batch_size=4, k=2, progress=False)
    assert summary.domains == sorted({s["domain"] for s in samples})
    entropies = {d: [] for d in summary.domains}
    counts = {d: [Counter() for _ in summary.layers] for d in summary.domains}
    for start in range(0, len(samples), 4):
        chunk = samples[start : start + 4]
        batch = model.prepare_inputs([s["question"] for s in chunk], [s["image"] for s in chunk])
        lens = logit_lens(model, batch, k=2)
        for column, row in enumerate(lens.rows.tolist()):
            domain = chunk[row]["domain"]
            entropies[domain].append(lens.entropy[:, column].double())
            for layer in summary.layers:
                counts[domain][layer].update(lens.top_ids[layer, column].tolist())
    for i, d in enumerate(summary.domains):
        values = torch.stack(entropies[d])  # [positions, layer]
        assert int(summary.n_positions[i]) == values.shape[0]
        torch.testing.assert_close(summary.mean()[i], values.mean(0), atol=1e-9, rtol=0)
        torch.testing.assert_close(summary.std()[i], values.std(0, correction=0), atol=1e-6, rtol=0)
        assert summary.top_counts[d] == [dict(c) for c in counts[d]]
    assert summary.n_samples.tolist() == [sum(s["domain"] == d for s in samples) for d in summary.domains]


def test_summary_means_match_samples_read_one_at_a_time(model):
    samples = make_samples(6)
    summary = logit_lens_summary(model, samples, batch_size=3, progress=False)
    for i, d in enumerate(summary.domains):
        alone = [
            logit_lens(model, model.prepare_inputs([s["question"]], [s["image"]]), k=1).entropy
            for s in samples if s["domain"] == d and s["image"] is not None
        ]
        torch.testing.assert_close(summary.mean()[i].float(), torch.cat(alone, dim=1).mean(1), atol=1e-4, rtol=0)


def test_summary_saves_and_loads(model, tmp_path):
    summary = logit_lens_summary(model, make_samples(6), batch_size=3, progress=False)
    summary.save(tmp_path / "lens.safetensors")
    loaded = LensSummary.load(tmp_path / "lens.safetensors")
    for name in ("n_positions", "n_samples", "entropy_sum", "entropy_sq_sum"):
        assert torch.equal(getattr(loaded, name), getattr(summary, name))
    assert (loaded.domains, loaded.layers, loaded.hook, loaded.k) == (summary.domains, summary.layers, summary.hook, summary.k)
    assert loaded.top_counts == summary.top_counts and loaded.token_strings == summary.token_strings
    assert loaded.metadata == summary.metadata
    assert "entropy mean ± std" in loaded.table()
    curves = loaded.plot().axes[0]  # two layers: curves without stage lines, and a note saying why
    texts = [t.get_text() for t in curves.texts]
    assert "no stage split: 2 layer(s), three stages need at least 3" in texts
    ceiling = math.log(model.cfg.d_vocab)
    assert any(f"ln|V| = {ceiling:.2f}" in t for t in texts)
    assert any(list(line.get_ydata()) == [ceiling, ceiling] for line in curves.lines)


def test_summary_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="batch_size"):
        logit_lens_summary(model, make_samples(3), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="hook must be"):
        logit_lens_summary(model, make_samples(3), hook="resid", progress=False)
    with pytest.raises(ValueError, match="not in domains"):
        logit_lens_summary(model, make_samples(3), domains=["noise"], progress=False)


def test_lens_checks_its_unembedding_against_the_model(model, monkeypatch):
    """A logit transform the lens does not know (as a new release might add) is reported;
    a constant shift of the logits (compatibility mode centres the unembedding) is not."""
    from mm_lens.analysis import lens
    from mm_lens.base import fast_path

    batch = model.prepare_inputs(["what is the color"], [random_image(30, 50, 0)])
    monkeypatch.setattr(fast_path, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", fast_path.FastPathWarning)
        lens.logit_lens(model, batch, positions="image")  # the model's own unembedding: no warning
        with model.hooks(fwd_hooks=[("unembed.hook_out", lambda logits, hook: logits + 1)]):
            lens.logit_lens(model, batch, positions="image")
    with model.hooks(fwd_hooks=[("unembed.hook_out", lambda logits, hook: 3 * logits)]):  # a logit temperature
        with pytest.warns(fast_path.FastPathWarning, match="logit lens fast path disagrees"):
            lens.logit_lens(model, batch, positions="image")
