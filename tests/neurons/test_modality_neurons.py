"""MINER on a HookedMLLM: wiring of the scores, planted modality-specific neurons."""

from __future__ import annotations

import pytest
import torch

from helpers import make_samples
from mm_lens import HookedMLLM
from mm_lens.neurons.modality_neurons import (
    MinerScoreCollector,
    MinerScores,
    collect_miner_scores,
    modality_masks,
    select_modality_neurons,
)
from mm_lens.neurons.miner import MINER_METRICS, importance_scores
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


def _direct_scores(model, samples, published):
    """Scores computed sample by sample from a full cache (one row per forward)."""
    totals = {m: {k: torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.float64) for k in MINER_METRICS} for m in ("text", "image")}
    counts = {"text": 0, "image": 0}
    for sample in samples:
        batch = _one_batch(model, [sample])
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith(("hook_act", "hook_pattern", "hook_rot_q", "hook_rot_k")))
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
                scores = importance_scores(cache[f"blocks.{layer}.mlp.hook_act"][0][where], attention[where][:, where], published_attention=published)
                for metric, value in scores.items():
                    totals[m][metric][layer] += value.double()
    return {m: {k: v / counts[m] for k, v in per.items()} for m, per in totals.items()}


@pytest.mark.parametrize("published", [False, True])
def test_batched_streaming_scores_equal_sample_by_sample(model, published):
    samples = make_samples(6)
    collector = MinerScoreCollector(model, ("text", "image"), published_attention=published)
    for start in (0, 3):
        collector.update(_one_batch(model, samples[start : start + 3]), "toy")
    mean = collector.accumulators["toy"].mean()
    expected = _direct_scores(model, samples, published)
    for i, m in enumerate(("text", "image")):
        for j, metric in enumerate(MINER_METRICS):
            assert torch.allclose(mean[j, i], expected[m][metric], atol=1e-5), (m, metric)


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
