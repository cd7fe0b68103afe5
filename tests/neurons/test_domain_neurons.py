"""Domain-specific neurons: the pipeline recovers neurons planted in a model by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import DOMAINS, make_samples
from mm_lens import HookedMLLM
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.neurons.domain_neurons import select_domain_neurons
from mm_lens.model.tiny.llava import build_tiny_llava

COLORS = {"field": (40, 160, 40), "page": (250, 240, 200), "road": (90, 90, 90), "scan": (230, 230, 230)}
PLANTED_PER_DOMAIN = 5


def _picture(domain: str, seed: int) -> Image.Image:
    noise = np.random.RandomState(seed).normal(0, 12, (28, 28, 3))
    return Image.fromarray((np.array(COLORS[domain]) + noise).clip(0, 255).astype(np.uint8))


def _samples() -> list[dict]:
    questions = ["what is the color", "how many are there", "describe the picture", "which domain is this"]
    return [
        {"question": questions[i % 4], "image": _picture(d, 100 * j + i), "domain": d}
        for j, d in enumerate(COLORS)
        for i in range(8)
    ]


def _mlp_inputs(model, samples, layer):
    """MLP inputs of one layer at every non-padding position, with each position's domain."""
    domains = sorted(COLORS)
    xs, labels = [], []
    for start in range(0, len(samples), 8):
        chunk = samples[start : start + 8]
        batch = model.prepare_inputs([s["question"] for s in chunk], [s["image"] for s in chunk])
        _, cache = model.run_with_cache(batch, names_filter=f"blocks.{layer}.mlp.hook_in")
        keep = ~batch.modality_map.mask("padding")
        xs.append(cache[f"blocks.{layer}.mlp.hook_in"][keep])
        rows = torch.tensor([domains.index(s["domain"]) for s in chunk])
        labels.append(rows[:, None].expand_as(keep)[keep])
    return torch.cat(xs), torch.cat(labels)


@pytest.fixture(scope="module")
@torch.no_grad()
def planted(tmp_path_factory):
    """A tiny LLaVA whose layer-0 gate rows of chosen neurons separate one domain's positions
    from the rest (least squares on the MLP input), while every other gate row is made blind
    to the domains (the mean and the between-domain directions projected out)."""
    model = HookedMLLM.from_pretrained(build_tiny_llava(tmp_path_factory.mktemp("planted"), width=64, seed=3))
    samples, domains = _samples(), sorted(COLORS)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(model.cfg.d_mlp, generator=generator)
    truth = {d: order[i * PLANTED_PER_DOMAIN : (i + 1) * PLANTED_PER_DOMAIN].tolist() for i, d in enumerate(domains)}
    for layer in range(model.cfg.n_layers):
        x, label = _mlp_inputs(model, samples, layer)
        means = torch.stack([x[label == d].mean(0) for d in range(len(domains))])
        basis = torch.linalg.qr(torch.cat([x.mean(0, keepdim=True), means - means.mean(0)]).T).Q
        gate = model.hf_model.model.language_model.layers[layer].mlp.gate_proj.weight
        gate -= (gate @ basis) @ basis.T
        if layer == 0:
            for d, domain in enumerate(domains):
                direction = torch.linalg.lstsq(x, torch.where(label == d, 1.0, -1.0)[:, None]).solution[:, 0]
                for k in truth[domain]:
                    gate[k] = 3 * direction + 0.05 * torch.randn(direction.shape, generator=generator)
    stats = collect_neuron_stats(model, samples, modules=["lm_mlp"], batch_size=8, progress=False)
    planted_triples = {(d, 0, k) for d, ks in truth.items() for k in ks}
    return model, stats, planted_triples


def _triples(neuron_set, module="lm_mlp"):
    return {(g, l, int(k)) for g in neuron_set.groups for l, t in enumerate(neuron_set.neurons[g][module]) for k in t}


def test_planted_domain_neurons_are_recovered(planted):
    model, stats, truth = planted
    top_rate = len(truth) / (model.cfg.n_layers * model.cfg.d_mlp)
    found = _triples(select_domain_neurons(stats, top_rate=top_rate))
    precision, recall = len(found & truth) / max(len(found), 1), len(found & truth) / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_random_control_does_not_recover_planted_neurons(planted):
    model, stats, truth = planted
    top_rate = len(truth) / (model.cfg.n_layers * model.cfg.d_mlp)
    chosen = select_domain_neurons(stats, top_rate=top_rate)
    for seed in range(3):
        control = _triples(chosen.random_control(seed=seed))
        assert len(control) == len(truth)
        assert len(control & truth) / len(control) < 0.2


def test_every_module_gets_a_neuron_set_with_provenance(model):
    stats = collect_neuron_stats(model, make_samples(), batch_size=5, progress=False)
    chosen = select_domain_neurons(stats)
    assert chosen.groups == list(DOMAINS)
    assert chosen.modules == list(model.neuron_hooks)
    assert chosen.metadata["parameters"]["top_rate"] == 0.01
    assert chosen.metadata["statistics"]["settings"]["n_samples"] == 10
    lm_total = sum(len(t) for g in chosen.groups for t in chosen.neurons[g]["lm_mlp"])
    assert lm_total <= len(DOMAINS) * round(model.cfg.n_layers * model.cfg.d_mlp * 0.01)


def test_unknown_module_or_class_is_an_error(model):
    stats = collect_neuron_stats(model, make_samples(4), batch_size=4, modules=["projector"], progress=False)
    with pytest.raises(ValueError, match=r"no statistics for modules \['lm_mlp'\]"):
        select_domain_neurons(stats, modules=["lm_mlp"])
    with pytest.raises(ValueError, match="position class 'video' was not collected"):
        select_domain_neurons(stats, position_class="video")


def test_a_domain_without_positions_of_the_class_is_named(model):
    samples = make_samples(6)
    for s in samples:
        if s["domain"] == DOMAINS[1]:
            s["image"] = None  # this domain's samples hold no image position
    stats = collect_neuron_stats(model, samples, batch_size=6, modules=["lm_mlp"], progress=False)
    with pytest.raises(ValueError, match=rf"lm_mlp: no 'image' position was counted in domain\(s\) \['{DOMAINS[1]}'\]"):
        select_domain_neurons(stats, position_class="image")
