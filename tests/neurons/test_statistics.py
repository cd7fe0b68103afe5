"""Streaming neuron statistics equal a direct computation from a full activation cache."""

from __future__ import annotations

import pytest
import torch

from helpers import DOMAINS, make_samples
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.neurons.statistics import POSITION_CLASSES, NeuronStats, NeuronStatsCollector

def reference_stats(model, samples, batch_size):
    """Loops over a full run_with_cache; every image is 40x60 so each takes the same tiles."""
    hooks = model.neuron_hooks
    result = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = model.prepare_inputs([s["question"] for s in chunk], [s["image"] for s in chunk])
        names = [n for hs in hooks.values() for n in hs]
        _, cache = model.run_with_cache(batch, names_filter=names)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        image_id, bos = model.hf_model.config.image_token_id, model.processor.tokenizer.bos_token_id
        with_image = [i for i, s in enumerate(chunk) if s["image"] is not None]
        for module, module_hooks in hooks.items():
            for layer, name in enumerate(module_hooks):
                act = cache[name].double()
                for b, sample in enumerate(chunk):
                    if name.startswith("blocks."):
                        last = int(torch.nonzero(mask[b]).max())
                        masks = {
                            "image": (ids[b] == image_id) & (mask[b] == 1),
                            "text": (ids[b] != image_id) & (ids[b] != bos) & (mask[b] == 1),
                            "all": mask[b] == 1,
                            "last": torch.arange(ids.shape[1]) == last,
                        }
                        rows = {c: act[b][m] for c, m in masks.items()}
                    elif sample["image"] is not None:
                        per_image = act.shape[0] // len(with_image)
                        k = with_image.index(b)
                        tiles = act[k * per_image : (k + 1) * per_image].flatten(0, 1)
                        rows = {"image": tiles, "all": tiles}
                    else:
                        rows = {}
                    for c, values in rows.items():
                        key = (module, layer, sample["domain"], c)
                        entry = result.setdefault(key, [])
                        entry.append(values)
    return result


@pytest.fixture(scope="module")
def samples():
    return make_samples()


def test_streaming_equals_full_cache_reduction(model, samples):
    stats = collect_neuron_stats(model, samples, batch_size=4, progress=False)
    with model.fast_attention():  # the statistics' attention path, so that max and min agree to the bit
        reference = reference_stats(model, samples, batch_size=4)
    assert stats.domains == DOMAINS and stats.classes == POSITION_CLASSES
    for (module, layer, domain, c), chunks in reference.items():
        values = torch.cat(chunks)
        s = stats.modules[module]
        d, k = DOMAINS.index(domain), POSITION_CLASSES.index(c)
        assert int(s.n_tokens[layer, d, k]) == values.shape[0]
        assert torch.equal(s.over_zero[layer, d, k], (values > 0).sum(0))
        assert torch.allclose(s.sum[layer, d, k], values.sum(0), rtol=1e-10, atol=1e-9)
        assert torch.allclose(s.sum_sq[layer, d, k], (values**2).sum(0), rtol=1e-10, atol=1e-9)
        assert torch.equal(s.max[layer, d, k], values.max(0).values)
        assert torch.equal(s.min[layer, d, k], values.min(0).values)
    covered = {(m, l, d, c) for (m, l, d, c) in reference}
    for module, s in stats.modules.items():
        for layer in range(s.n_tokens.shape[0]):
            for d, domain in enumerate(DOMAINS):
                for k, c in enumerate(POSITION_CLASSES):
                    if (module, layer, domain, c) not in covered:
                        assert int(s.n_tokens[layer, d, k]) == 0


def test_padding_never_counts(model, samples):
    stats = collect_neuron_stats(model, samples, batch_size=5, modules=["lm_mlp"], progress=False)
    n_all = stats.n_tokens("lm_mlp", "all")
    expected = torch.zeros(len(DOMAINS), dtype=torch.long)
    for start in range(0, len(samples), 5):
        chunk = samples[start : start + 5]
        batch = model.prepare_inputs([s["question"] for s in chunk], [s["image"] for s in chunk])
        for b, s in enumerate(chunk):
            expected[DOMAINS.index(s["domain"])] += int(batch["attention_mask"][b].sum())
    assert torch.equal(n_all, expected)
    assert torch.equal(stats.n_tokens("lm_mlp", "last"), torch.tensor([4, 3, 3]))


def test_lape_layout_accessor(model, samples):
    stats = collect_neuron_stats(model, samples[:6], batch_size=3, modules=["lm_mlp"], progress=False)
    counts = stats.over_zero("lm_mlp")
    assert counts.shape == (model.cfg.n_layers, model.cfg.d_mlp, len(DOMAINS))
    assert torch.equal(counts[1, :, 2], stats.modules["lm_mlp"].over_zero[1, 2, POSITION_CLASSES.index("all")])


def test_save_load_round_trip(model, samples, tmp_path):
    stats = collect_neuron_stats(model, samples[:4], batch_size=2, progress=False)
    stats.save(tmp_path / "s.safetensors")
    assert NeuronStats.load(tmp_path / "s.safetensors").equals(stats)


def test_state_size_does_not_grow_with_data(model, samples):
    collector = NeuronStatsCollector(model, DOMAINS)
    def size():
        return sum(t.numel() * t.element_size() for m in collector.stats.modules.values() for t in m.tensors().values())
    before = size()
    for start in range(0, len(samples), 2):
        chunk = samples[start : start + 2]
        collector.update(model.prepare_inputs([s["question"] for s in chunk], [s["image"] for s in chunk]), [s["domain"] for s in chunk])
    assert size() == before


def test_bad_labels_and_modules_are_errors(model, samples):
    collector = NeuronStatsCollector(model, DOMAINS)
    batch = model.prepare_inputs(["what"], [samples[0]["image"]])
    with pytest.raises(ValueError, match=r"domain labels \['space'\] are not among"):
        collector.update(batch, ["space"])
    with pytest.raises(ValueError, match="2 domain labels for a batch of 1 rows"):
        collector.update(batch, ["noise", "plain"])
    with pytest.raises(ValueError, match="unknown neuron modules"):
        NeuronStatsCollector(model, DOMAINS, modules=["qformer"])
    with pytest.raises(ValueError, match="unknown position classes"):
        NeuronStatsCollector(model, DOMAINS, classes=["image", "pixels"])
    with pytest.raises(ValueError, match="no 'domain' field"):
        collect_neuron_stats(model, [{"question": "what", "image": None}], progress=False)


def test_reducing_a_cache_equals_reducing_inside_hooks(model, samples):
    chunk = samples[:4]
    batch = model.prepare_inputs([s["question"] for s in chunk], [s["image"] for s in chunk])
    labels = [s["domain"] for s in chunk]
    streamed, cached = NeuronStatsCollector(model, DOMAINS), NeuronStatsCollector(model, DOMAINS)
    streamed.update(batch, labels)
    names = [n for hooks in model.neuron_hooks.values() for n in hooks]
    with model.fast_attention():  # update()'s attention path; an eager cache differs in the last bits
        _, cache = model.run_with_cache(batch, names_filter=names)
    cached.add_cache(cache, batch, labels)
    assert cached.stats.equals(streamed.stats)


def test_neuron_means_pool_domains_by_token_counts(model, samples):
    stats = collect_neuron_stats(model, samples, batch_size=5, progress=False)
    means = stats.neuron_means()
    s, c = stats.modules["lm_mlp"], POSITION_CLASSES.index("all")
    expected = s.sum[:, :, c].sum(1) / s.n_tokens[:, :, c].sum(1, keepdim=True)
    assert torch.allclose(means["lm_mlp"].double(), expected, atol=1e-6)
    one = stats.neuron_means(domains=["plain"])["projector"]
    assert torch.allclose(one.double(), stats.modules["projector"].mean()[:, 1, c], atol=1e-6)
    with pytest.raises(ValueError, match="unknown domains"):
        stats.neuron_means(domains=["space"])


def test_nan_or_inf_in_an_activation_names_the_hook_layer_and_batch(model, samples):
    from mm_lens.model.samples import prompt_batch

    batch = prompt_batch(model, samples[:2])
    labels = [s["domain"] for s in samples[:2]]

    def poison(act, hook, value=float("nan")):
        act = act.clone()
        act[0, -1, 3] = value
        return act

    collector = NeuronStatsCollector(model, DOMAINS, modules=["lm_mlp"])
    collector.update(batch, labels)  # batch 0 is clean
    with model.hooks(fwd_hooks=[("blocks.1.mlp.hook_act", poison)]):
        with pytest.raises(ValueError, match=r"hook blocks\.1\.mlp\.hook_act \(lm_mlp layer 1\) holds NaN or inf activations in batch 1"):
            collector.update(batch, labels)
    with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_act", lambda act, hook: poison(act, hook, float("inf")))]):
        with pytest.raises(ValueError, match="allow_nonfinite=True"):
            collect_neuron_stats(model, samples[:2], domains=DOMAINS, modules=["lm_mlp"], progress=False)
        counted = collect_neuron_stats(model, samples[:2], domains=DOMAINS, modules=["lm_mlp"], progress=False, allow_nonfinite=True)
    assert counted.modules["lm_mlp"].n_tokens.sum() > 0


def test_empty_groups_have_nan_means_and_no_mean_to_ablate_with(model, samples):
    stats = collect_neuron_stats(model, samples[:3], domains=(*DOMAINS, "unseen"), progress=False)
    lm = stats.modules["lm_mlp"]
    unseen = stats.domains.index("unseen")
    assert torch.isnan(lm.mean()[:, unseen]).all() and torch.isnan(lm.probability()[:, unseen]).all()
    seen = stats.domains.index(samples[0]["domain"])
    assert not torch.isnan(lm.mean()[:, seen, stats.classes.index("all")]).any()
    with pytest.raises(ValueError, match=r"lm_mlp saw no 'all' position in domain\(s\) \['unseen'\]"):
        stats.neuron_means("all", domains=["unseen"])


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_span_reductions_equal_plain_reductions_across_chunk_boundaries(chunk):
    from mm_lens.neurons.statistics import _span_reductions

    rows = torch.randn(50, 7) * 3 + 1
    rows[20, 2] = torch.nan  # stays in its own span
    spans = [(0, 13, [(0, 0)]), (13, 31, [(1, 0), (1, 2)]), (31, 50, [(0, 1)])]
    reduced = list(_span_reductions(rows, spans, chunk=chunk))
    assert [r[:3] for r in reduced] == spans
    for start, end, _, (fired, total, squares, high, low) in reduced:
        values = rows[start:end].double()
        assert fired.dtype == torch.int64 and torch.equal(fired, (values > 0).sum(0))
        assert torch.allclose(total, values.sum(0), rtol=1e-12, atol=1e-12, equal_nan=True)
        assert torch.allclose(squares, (values**2).sum(0), rtol=1e-12, atol=1e-12, equal_nan=True)
        assert torch.equal(high.isnan(), values.amax(0).isnan()) and torch.equal(high.nan_to_num(), values.amax(0).nan_to_num())
        assert torch.equal(low.nan_to_num(), values.amin(0).nan_to_num())
    nan_spans = [bool(r[3][1].isnan().any()) for r in reduced]
    assert nan_spans == [False, True, False]
