"""Attention through SDPA when no hook needs the pattern: on every tiny architecture, on
left-padded batches and on one unpadded row (where the plain causal mask becomes SDPA's
``is_causal``), the logits, every hooked activation and greedy generation (KV cache) equal the eager
TransformerLens path; a hook on the pattern brings the eager path back; a disagreeing SDPA
falls back with a warning."""

from __future__ import annotations

import pytest
import torch
from helpers import random_image
from test_tl_tools import media_batches
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components import AttentionBridge

from mm_lens import HookedMLLM
from mm_lens.base.fast_path import FastPathWarning
from mm_lens.model.architectures import bridge_components
from mm_lens.model.architectures.bridge_components import attend_through_sdpa
from mm_lens.model.tiny import TINY_BUILDERS

ARCHS = tuple(TINY_BUILDERS)
ATOL = 2e-5


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(tiny_folder, arch) -> HookedMLLM:
    loaded = HookedMLLM.from_pretrained(tiny_folder(arch))
    attend_through_sdpa(loaded.bridge, True)  # on for the whole module, as inside fast_attention()
    return loaded


def eager_only_hooks(model: HookedMLLM) -> set[str]:
    """Hook names only the eager path fires: an attention bridge's own hook points but
    ``hook_in``/``hook_out`` (pattern, scores, rotated q/k, normed q/k, cos/sin)."""
    points = {
        id(m) for module in model.bridge.modules() if isinstance(module, AttentionBridge)
        for child, m in module._modules.items() if isinstance(m, HookPoint) and child not in ("hook_in", "hook_out")
    }
    names = {name for name, point in model.bridge.hook_dict.items() if id(point) in points}
    return names


class CountingSdpa:
    def __init__(self):
        self.calls, self.original = 0, torch.nn.functional.scaled_dot_product_attention

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def run_both(model: HookedMLLM, batch, names_filter, monkeypatch):
    """(eager logits, eager cache), (sdpa logits, sdpa cache), SDPA calls on the fast run."""
    attend_through_sdpa(model.bridge, False)
    with torch.no_grad():
        eager = model.run_with_cache(batch, names_filter=names_filter)
    attend_through_sdpa(model.bridge, True)
    counter = CountingSdpa()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counter)
    with torch.no_grad():
        fast = model.run_with_cache(batch, names_filter=names_filter)
    return eager, fast, counter.calls


def test_sdpa_path_gives_the_eager_logits_and_every_hooked_activation(model, arch, monkeypatch):
    skip = eager_only_hooks(model)
    attention_modules = sum(isinstance(m, AttentionBridge) for m in model.bridge.modules())
    with _no_fast_path_warning():
        unpadded = {"one unpadded row": model.prepare_inputs(["what is the color"], [random_image(30, 50, 3)])} if arch != "qwen2_audio" else {}
        for modality, batch in (media_batches(model, arch) | unpadded).items():
            (eager_logits, eager_cache), (fast_logits, fast_cache), calls = run_both(model, batch, lambda n: n not in skip, monkeypatch)
            assert calls >= attention_modules, f"{arch} {modality}: SDPA ran {calls} times for {attention_modules} attention modules"
            assert set(eager_cache.keys()) == set(fast_cache.keys())
            assert (fast_logits - eager_logits).abs().max() <= ATOL * max(1.0, float(eager_logits.abs().max()))
            for name in eager_cache.keys():
                error = float((fast_cache[name] - eager_cache[name]).abs().max())
                assert error <= ATOL * max(1.0, float(eager_cache[name].abs().max())), f"{arch} {modality} {name}: {error:.3g}"


class _no_fast_path_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", FastPathWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def test_a_hook_on_the_pattern_brings_the_eager_path_back(model, arch, monkeypatch):
    (batch, *_) = media_batches(model, arch).values()
    pattern_names = {n for n in eager_only_hooks(model) if n.endswith("hook_pattern")}
    (eager_logits, eager_cache), (fast_logits, fast_cache), calls = run_both(model, batch, lambda n: n in pattern_names, monkeypatch)
    assert calls == 0
    assert set(fast_cache.keys()) == pattern_names
    assert torch.equal(fast_logits, eager_logits)


def test_greedy_generation_with_the_kv_cache_matches_the_eager_path(model, arch, monkeypatch):
    (batch, *_) = media_batches(model, arch).values()
    attend_through_sdpa(model.bridge, False)
    eager = model.generate(batch, max_new_tokens=5)
    attend_through_sdpa(model.bridge, True)
    counter = CountingSdpa()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counter)
    fast = model.generate(batch, max_new_tokens=5)
    assert counter.calls > 0
    assert torch.equal(fast.tokens, eager.tokens)


def test_a_disagreeing_sdpa_falls_back_to_the_eager_path_with_a_warning(model, arch, monkeypatch):
    (batch, *_) = media_batches(model, arch).values()
    attend_through_sdpa(model.bridge, False)
    with torch.no_grad():
        eager_logits = model(batch)
    attend_through_sdpa(model.bridge, True)
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: 2 * original(*a, **k))
    monkeypatch.setattr(bridge_components, "SDPA_CHECKED", {})
    monkeypatch.setattr("mm_lens.base.fast_path._warned", set())
    with pytest.warns(FastPathWarning, match="SDPA attention"), torch.no_grad():
        logits = model(batch)
    assert (logits - eager_logits).abs().max() <= ATOL * max(1.0, float(eager_logits.abs().max()))


def test_a_loaded_model_is_eager_outside_fast_attention_and_statistics_run_inside(tiny_folder, monkeypatch):
    from mm_lens.neurons.statistics import NeuronStatsCollector

    model = HookedMLLM.from_pretrained(tiny_folder("llava"))
    batch = model.prepare_inputs(["what is the color", "how many"], [random_image(30, 50, 3), random_image(40, 30, 3)])
    counter = CountingSdpa()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counter)
    with torch.no_grad():
        plain = model(batch)
        assert counter.calls == 0  # TL's eager attention: hooked and plain runs stay bit-identical
        with model.fast_attention():
            fast = model(batch)
        assert counter.calls >= model.cfg.n_layers
        assert (fast - plain).abs().max() <= ATOL * max(1.0, float(plain.abs().max()))
        assert torch.equal(model(batch), plain)  # back to eager on exit
    calls = counter.calls
    NeuronStatsCollector(model, ["a"]).update(batch, ["a", "a"])
    assert counter.calls > calls
    model.use_sdpa = False
    calls = counter.calls
    NeuronStatsCollector(model, ["a"]).update(batch, ["a", "a"])
    assert counter.calls == calls
