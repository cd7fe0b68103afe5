"""MINER on a HookedMLLM: wiring of the scores, planted modality-specific neurons."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import make_samples
from mm_lens import HookedMLLM
from mm_lens.base import fast_path
from mm_lens.neurons import modality_neurons
from mm_lens.neurons.modality_neurons import (
    MinerScoreCollector,
    MinerScores,
    collect_miner_scores,
    modality_masks,
    select_modality_neurons,
)
from mm_lens.neurons.miner import MINER_METRICS, attention_sums, importance_scores
from mm_lens.model.tiny.llava import build_tiny_llava


def _one_batch(model, samples):
    return model.prepare_inputs([s["question"] for s in samples], [s["image"] for s in samples])


def test_masks_follow_the_modality_map(model):
    batch = _one_batch(model, make_samples(4))
    mm = batch.modality_map
    masks = modality_masks(mm, ("text", "image", "special", "special_text", "prompt"))
    assert torch.equal(masks["special_text"], masks["special"] | masks["text"])
    assert torch.equal(masks["prompt"], batch["attention_mask"].bool())
    assert not (masks["text"] & masks["image"]).any()
    with pytest.raises(ValueError, match="unknown MINER modalities"):
        modality_masks(mm, ("pixels",))


def _direct_scores(model, samples, published, sdpa_activations=False):
    """Scores computed sample by sample from a full cache (one row per forward); with
    ``sdpa_activations`` the activations come from a forward through SDPA (the fast
    route's), whose last bits differ from the eager forward's."""
    totals = {m: {k: torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.float64) for k in MINER_METRICS} for m in ("text", "image")}
    counts = {"text": 0, "image": 0}
    for sample in samples:
        batch = _one_batch(model, [sample])
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith(("hook_act", "hook_pattern", "hook_rot_q", "hook_rot_k")))
        activations = cache
        if sdpa_activations:
            with model.fast_attention():
                _, activations = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_act"))
        masks = modality_masks(batch.modality_map, ("text", "image"))
        for m, mask in masks.items():
            where = mask[0]
            if not where.any():
                continue
            counts[m] += 1
            for layer in range(model.cfg.n_layers):
                if published:
                    q, k = cache[f"blocks.{layer}.attn.hook_rot_q"][0], cache[f"blocks.{layer}.attn.hook_rot_k"][0]
                    group = q.shape[1] // k.shape[1]
                    per_head = [torch.softmax(q[:, h] @ k[:, h // group].T / q.shape[-1] ** 0.5, dim=-1) for h in range(q.shape[1])]
                    attention = torch.stack(per_head).mean(0)
                else:
                    attention = cache[f"blocks.{layer}.attn.hook_pattern"][0].mean(0)
                scores = importance_scores(activations[f"blocks.{layer}.mlp.hook_act"][0][where], attention[where][:, where], published_attention=published)
                for metric, value in scores.items():
                    totals[m][metric][layer] += value.double()
    return {m: {k: v / counts[m] for k, v in per.items()} for m, per in totals.items()}


@pytest.mark.parametrize("route", ["fast", "pattern", "published"])
def test_batched_streaming_scores_equal_sample_by_sample(model, route):
    samples = make_samples(6)
    published = route == "published"
    collector = MinerScoreCollector(model, ("text", "image"), published_attention=published, route="pattern" if published else route)
    for start in (0, 3):
        collector.update(_one_batch(model, samples[start : start + 3]), "toy")
    mean = collector.accumulators["toy"].mean()
    expected = _direct_scores(model, samples, published, sdpa_activations=route == "fast")
    for i, m in enumerate(("text", "image")):
        for j, metric in enumerate(MINER_METRICS):
            assert torch.allclose(mean[j, i], expected[m][metric], atol=1e-5), (m, metric)


# --- the fast route: attention sums from the SDPA inputs ------------------------------


def _materialised_sums(q, k, groups, scale, additive):
    """Reference for ``attention_sums``: the full head-averaged pattern, then its sums."""
    keys = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    pattern = torch.softmax(q @ keys.transpose(1, 2) * scale + additive, dim=-1).mean(0)
    scored = groups.any(0)
    paid = torch.stack([torch.where(scored, pattern[:, g].sum(-1), 0.0) for g in groups])
    received = torch.stack([pattern[g & scored].sum(0) for g in groups])
    return paid, received


@pytest.mark.parametrize("masking", ["causal", "padding_bool", "padding_additive", "sliding_window", "bidirectional_span"])
@pytest.mark.parametrize("block", [1, 5, 256])
def test_attention_sums_equal_the_materialised_pattern(masking, block):
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, n, d = 6, 2, 23, 8  # grouped-query attention: 3 query heads per key head
    q, k = torch.randn(heads, n, d, generator=g), torch.randn(kv_heads, n, d, generator=g)
    groups = torch.zeros(2, n, dtype=torch.bool)
    groups[0, 3:6], groups[1, 6:17], groups[0, 17:] = True, True, True  # text, image, text; 0-2 padding
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if masking != "causal":
        allowed[:, :3] = False
    if masking == "sliding_window":
        allowed &= ~torch.ones(n, n, dtype=torch.bool).tril(-5)
    if masking == "bidirectional_span":
        allowed[6:17, 6:17] = True
    additive = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    mask = {"causal": None, "padding_bool": allowed}.get(masking, additive)
    got = attention_sums(q, k, groups, scale=0.3, mask=mask, causal=masking == "causal", block=block)
    for value, expected in zip(got, _materialised_sums(q, k, groups, 0.3, additive)):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def _all_routes_agree(fast, pattern):
    """The fast and pattern routes' scores: equal up to float32 rounding, except ``prob``
    where an activation within rounding of 0 (SDPA vs eager forward) may flip one token."""
    for j, metric in enumerate(MINER_METRICS):
        if metric == "prob":
            assert ((fast[j] - pattern[j]).abs() > 1e-5).double().mean() < 0.01
        else:
            torch.testing.assert_close(fast[j], pattern[j], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", params=["llava", "llava_next", "gemma3", "qwen2_vl"])
def any_model(request, models, tiny_folder):
    """The analysis models, Gemma 3 (a sliding-window layer, bidirectional image spans,
    its own attention scale) and Qwen2-VL (M-RoPE inside HF's attention)."""
    return models[request.param] if request.param in models else HookedMLLM.from_pretrained(tiny_folder(request.param))


def test_fast_and_pattern_routes_give_the_same_scores_on_a_padded_batch(any_model, monkeypatch):
    batch = _one_batch(any_model, make_samples(3))
    assert batch.modality_map.mask("padding").any(), "the batch should hold a padded row"
    monkeypatch.setattr(fast_path, "_warned", set())
    collectors = {route: MinerScoreCollector(any_model, route=route) for route in ("fast", "pattern")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", fast_path.FastPathWarning)  # the self-check passes
        for collector in collectors.values():
            collector.update(batch, "toy")
            collector.update(batch, "toy")  # the second batch: the fast route alone
    assert collectors["fast"].route == "fast" and collectors["fast"].checked
    _all_routes_agree(collectors["fast"].accumulators["toy"].mean(), collectors["pattern"].accumulators["toy"].mean())


def test_blocks_smaller_than_the_prompt_give_the_same_scores(model):
    batch = _one_batch(model, make_samples(3))
    assert batch["input_ids"].shape[1] > 4 * 3  # several blocks per row
    scores = {}
    for block_size in (3, 256):
        collector = MinerScoreCollector(model, block_size=block_size)
        collector.update(batch, "toy")
        scores[block_size] = collector.accumulators["toy"].mean()
    torch.testing.assert_close(scores[3], scores[256], rtol=1e-5, atol=1e-6)


def test_a_wrong_scale_in_the_fast_route_is_caught_by_the_self_check(model, monkeypatch):
    right = modality_neurons.attention_sums

    def wrong_scale(*args, scale, **kwargs):
        return right(*args, scale=2 * scale, **kwargs)

    monkeypatch.setattr(modality_neurons, "attention_sums", wrong_scale)
    monkeypatch.setattr(fast_path, "_warned", set())
    batch = _one_batch(model, make_samples(3))
    collector, plain = MinerScoreCollector(model), MinerScoreCollector(model, route="pattern")
    with pytest.warns(fast_path.FastPathWarning, match=r"MINER attention sums .*blocks\.0\.attn \(layer 0\), text row sums \(paid\): max \|fast - plain\|"):
        collector.update(batch, "toy")
    assert collector.route == "pattern"
    plain.update(batch, "toy")
    assert torch.equal(collector.accumulators["toy"].mean(), plain.accumulators["toy"].mean())  # the plain scores were kept


def test_attention_outside_sdpa_falls_back_to_the_pattern_route_with_a_warning(model, monkeypatch):
    batch = _one_batch(model, make_samples(2))
    plain = MinerScoreCollector(model, route="pattern")
    plain.update(batch, "toy")
    collector = MinerScoreCollector(model)
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", lambda scores, hook: None)]):  # layer 1 eager
        with pytest.warns(fast_path.FastPathWarning, match=r"blocks\.1\.attn's attention did not run through a prefill SDPA call"):
            collector.update(batch, "toy")
    assert collector.route == "pattern"
    assert torch.equal(collector.accumulators["toy"].mean(), plain.accumulators["toy"].mean())
    monkeypatch.setattr(model, "use_sdpa", False)
    eager = MinerScoreCollector(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fast_path.FastPathWarning)
        eager.update(batch, "toy")  # a model kept eager scores on the pattern route, silently
    assert eager.route == "pattern"


def test_scores_average_over_datasets_where_the_modality_occurs(model):
    with_images = [s for s in make_samples(8) if s["image"] is not None][:4]
    text_only = [dict(s, image=None) for s in make_samples(4)]
    scores = collect_miner_scores(model, {"vqa": with_images, "text": text_only}, progress=False)
    assert scores.present.tolist() == [[True, True], [True, False]]
    alone = collect_miner_scores(model, {"vqa": with_images}, progress=False)
    assert torch.allclose(scores.scores[:, 1], alone.scores[:, 1])
    both_text = (alone.scores[:, 0] + collect_miner_scores(model, {"text": text_only}, progress=False).scores[:, 0]) / 2
    assert torch.allclose(scores.scores[:, 0], both_text)


def test_scores_save_and_load(model, tmp_path):
    scores = collect_miner_scores(model, {"toy": make_samples(3)}, progress=False)
    scores.save(tmp_path / "miner.safetensors")
    loaded = MinerScores.load(tmp_path / "miner.safetensors")
    assert torch.equal(loaded.scores, scores.scores) and loaded.modalities == scores.modalities


@pytest.fixture(scope="module")
@torch.no_grad()
def planted(tmp_path_factory):
    """A tiny LLaVA whose chosen layer-0 gate rows fire strongly on one modality's positions
    (least squares separating image from text positions at the MLP input)."""
    model = HookedMLLM.from_pretrained(build_tiny_llava(tmp_path_factory.mktemp("miner"), width=64, seed=5))
    samples = [dict(s, image=s["image"] or make_samples(1)[0]["image"]) for s in make_samples(12)]
    batch = _one_batch(model, samples)
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.mlp.hook_in")
    masks = modality_masks(batch.modality_map, ("text", "image"))
    x = cache["blocks.0.mlp.hook_in"]
    keep = masks["text"] | masks["image"]
    target = torch.where(masks["image"], 1.0, -1.0)[keep]
    direction = torch.linalg.lstsq(x[keep], target[:, None]).solution[:, 0]
    gate = model.hf_model.model.language_model.layers[0].mlp.gate_proj.weight
    order = torch.randperm(model.cfg.d_mlp, generator=torch.Generator().manual_seed(1))
    n_planted = 5
    truth = {"image": order[:n_planted].tolist(), "text": order[n_planted : 2 * n_planted].tolist()}
    for k in truth["image"]:
        gate[k] = 8 * direction
    for k in truth["text"]:
        gate[k] = -8 * direction
    return model, samples, truth, n_planted


def test_planted_modality_neurons_are_recovered(planted):
    model, samples, truth, n_planted = planted
    scores = collect_miner_scores(model, {"toy": samples}, progress=False)
    n_neurons = model.cfg.n_layers * model.cfg.d_mlp
    ratio = 2 * n_planted / n_neurons  # K // M = n_planted per modality
    chosen = select_modality_neurons(scores, ratio=ratio)
    for modality in ("image", "text"):
        found = {(l, int(k)) for l, t in enumerate(chosen.neurons[modality]["lm_mlp"]) for k in t}
        planted_pairs = {(0, k) for k in truth[modality]}
        precision, recall = len(found & planted_pairs) / max(len(found), 1), len(found & planted_pairs) / len(planted_pairs)
        assert precision >= 0.95 and recall >= 0.95, (modality, precision, recall)
    random_set = select_modality_neurons(scores, ratio=ratio, strategy="random")
    for modality in ("image", "text"):
        found = {(l, int(k)) for l, t in enumerate(random_set.neurons[modality]["lm_mlp"]) for k in t}
        assert len(found & {(0, k) for k in truth[modality]}) / len(found) < 0.2


def test_selection_is_a_neuron_set_with_provenance(model):
    scores = collect_miner_scores(model, {"toy": make_samples(4)}, progress=False)
    chosen = select_modality_neurons(scores, ratio=0.1, strategy="uniform")
    assert chosen.groups == ["text", "image"] and chosen.modules == ["lm_mlp"]
    assert chosen.metadata["parameters"]["strategy"] == "uniform"
    k = int(0.1 * model.cfg.n_layers * model.cfg.d_mlp)
    assert chosen.count("text") == (k // (2 * model.cfg.n_layers)) * model.cfg.n_layers


def test_nan_activations_stop_the_scores_naming_hook_batch_and_dataset(model):
    from mm_lens.model.samples import prompt_batch

    batch = prompt_batch(model, make_samples(2))

    def poison(act, hook):
        act = act.clone()
        act[0, -1, 0] = float("nan")
        return act

    collector = MinerScoreCollector(model)
    collector.update(batch, "vqa")
    with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_act", poison)]):
        with pytest.raises(ValueError, match=r"hook blocks\.1\.mlp\.hook_act \(lm_mlp layer 1\) holds NaN or inf activations in batch 1 of dataset 'vqa'"):
            collector.update(batch, "vqa")
        MinerScoreCollector(model, allow_nonfinite=True).update(batch, "vqa")  # counted when asked


def test_a_modality_absent_from_every_dataset_is_refused_by_name(model):
    text_only = [dict(s, image=None) for s in make_samples(3)]
    scores = collect_miner_scores(model, {"facts": text_only}, progress=False)
    with pytest.raises(ValueError, match=r"modality \['image'\] occurred in none of the datasets \['facts'\]"):
        select_modality_neurons(scores)
