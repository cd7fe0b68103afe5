"""Every hook point fires; the documented ones have the documented shapes and values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch


def _documented_shapes(model, batch) -> dict[str, tuple[int, ...]]:
    """The hook table of docs/hooks.md, evaluated for one batch."""
    cfg, hf_cfg = model.cfg, model.hf_model.config
    vis = hf_cfg.vision_config
    b, p = batch["input_ids"].shape
    tiles = model.modality_map(batch).feature.max().item() // (vis.image_size // vis.patch_size) ** 2 + 1
    patches = (vis.image_size // vis.patch_size) ** 2
    shapes = {}
    for l in range(cfg.n_layers):
        for name in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            shapes[f"blocks.{l}.{name}"] = (b, p, cfg.d_model)
        shapes[f"blocks.{l}.attn.hook_pattern"] = (b, cfg.n_heads, p, p)
        for name in ("hook_pre", "hook_act", "hook_post"):
            shapes[f"blocks.{l}.mlp.{name}"] = (b, p, cfg.d_mlp)
    for l in range(vis.num_hidden_layers):
        prefix = f"vision_encoder.encoder_layers.{l}"
        for name in ("hook_resid_pre", "hook_resid_post"):
            shapes[f"{prefix}.{name}"] = (tiles, patches + 1, vis.hidden_size)
        for name in ("mlp.hook_pre", "mlp.hook_post"):
            shapes[f"{prefix}.{name}"] = (tiles, patches + 1, vis.intermediate_size)
        shapes[f"{prefix}.attn.hook_pattern"] = (tiles, vis.num_attention_heads, patches + 1, patches + 1)
    shapes["vision_projector.hook_hidden"] = (tiles, patches, model.hf_model.model.multi_modal_projector.linear_1.out_features)
    shapes["vision_projector.hook_out"] = (tiles, patches, cfg.d_model)
    shapes["hook_embed"] = (b, p, cfg.d_model)
    return shapes


@pytest.fixture(scope="module")
def run(models, images):
    cached = {}
    for arch, model in models.items():
        batch = model.prepare_inputs(["what is the color", "how many"], [images[0], [images[1], images[2]]])
        with torch.no_grad():
            _, cache = model.run_with_cache(batch)
        cached[arch] = (model, batch, cache)
    return cached


def test_every_hook_fires_except_gated_and_documented_inert(run, arch):
    model, _, cache = run[arch]
    silent = {name for name in model.hook_dict if name not in cache.keys()}
    explained = {
        name
        for name in silent
        if model.bridge._gated_hook_reason(name) is not None or name.endswith(model.spec.inert_hooks)
    }
    assert silent == explained, f"hooks that never fired: {sorted(silent - explained)}"


def test_documented_hooks_have_documented_shapes(run, arch):
    model, batch, cache = run[arch]
    for name, shape in _documented_shapes(model, batch).items():
        assert tuple(cache[name].shape) == shape, name


def test_neuron_hooks_name_one_hook_per_layer(run, arch):
    model, _, cache = run[arch]
    modules = model.neuron_hooks
    assert len(modules["lm_mlp"]) == model.cfg.n_layers
    assert len(modules["vision_mlp"]) == model.hf_model.config.vision_config.num_hidden_layers
    assert modules["projector"] == ["vision_projector.hook_hidden"]
    assert all(name in cache.keys() for hooks in modules.values() for name in hooks)


def test_hook_act_is_activation_of_gate(run, arch):
    model, _, cache = run[arch]
    for l in range(model.cfg.n_layers):
        expected = torch.nn.functional.silu(cache[f"blocks.{l}.mlp.hook_pre"])
        assert torch.allclose(cache[f"blocks.{l}.mlp.hook_act"], expected, atol=1e-6)
        product = cache[f"blocks.{l}.mlp.hook_act"] * cache[f"blocks.{l}.mlp.hook_pre_linear"]
        assert torch.allclose(cache[f"blocks.{l}.mlp.hook_post"], product, atol=1e-6)


def test_projector_hidden_equals_hf_projector_activation(run, arch):
    model, _, cache = run[arch]
    projector = model.hf_model.model.multi_modal_projector
    vision_in = cache["vision_projector.hook_in"]
    expected = torch.nn.functional.gelu(projector.linear_1(vision_in))
    assert torch.allclose(cache["vision_projector.hook_hidden"], expected, atol=1e-6)


def test_documented_hooks_are_listed_in_docs(run, arch):
    model, batch, _ = run[arch]
    with open(Path(__file__).parents[2] / "docs" / "hooks.md") as handle:
        text = handle.read()
    for name in _documented_shapes(model, batch):
        generic = re.sub(r"\.\d+\.", ".{l}.", name)
        assert f"`{generic}`" in text, f"{generic} missing from docs/hooks.md"


def test_neuron_widths_equal_hook_widths(run, arch):
    model, _, cache = run[arch]
    for module, hooks in model.neuron_hooks.items():
        assert all(cache[name].shape[-1] == model.neuron_widths[module] for name in hooks), module


def test_transformer_lens_act_names_and_the_language_model_filter_cache_the_lm_only(model, images):
    from transformer_lens.utilities import get_act_name

    from mm_lens.base.hooks import language_model_filter

    batch = model.prepare_inputs(["what is the color"], [images[0]])
    _, by_tl_name = model.run_with_cache(batch, names_filter=get_act_name("resid_pre", 1))
    _, by_alias = model.run_with_cache(batch, names_filter="blocks.1.hook_resid_pre")
    assert torch.equal(by_tl_name[get_act_name("resid_pre", 1)], by_alias["blocks.1.hook_resid_pre"])
    _, lm_only = model.run_with_cache(batch, names_filter=language_model_filter("mlp.hook_post"))
    assert lm_only.keys() and all(name.startswith("blocks.") for name in lm_only.keys())
    _, naive = model.run_with_cache(batch, names_filter=lambda name: name.endswith("mlp.hook_post"))
    assert any(name.startswith("vision_encoder.") for name in naive.keys())  # what the helper guards against


def test_norm_hook_values_are_computed_only_when_hooked_and_edits_still_propagate(model, images):
    """Norm bridges skip TransformerLens' hook_scale / hook_normalized computation when no
    hook watches them: same logits to the bit; watched, the values fire; edited, they count."""
    from mm_lens.model.architectures.bridge_components import _UnwatchedNormSkipsItsHookValues

    norms = [m for m in model.bridge.modules() if isinstance(m, _UnwatchedNormSkipsItsHookValues)]
    assert len(norms) >= 2 * model.cfg.n_layers + 1  # every LM block's two norms and the final one, at least
    batch = model.prepare_inputs(["what is the color"], [images[0]])
    with torch.no_grad():
        plain = model(batch)
        names = [n for n in model.bridge.hook_dict if n.endswith(("hook_scale", "hook_normalized"))]
        watched, cache = model.run_with_cache(batch, names_filter=names + ["ln_final.hook_in"])
        halved = model.run_with_hooks(batch, fwd_hooks=[("ln_final.hook_normalized", lambda act, hook: act * 0.5)])
    assert torch.equal(plain, watched)
    assert set(cache.keys()) == {*names, "ln_final.hook_in"} and len(names) >= 2 * len(norms)
    restored = cache["ln_final.hook_normalized"] * cache["ln_final.hook_scale"]  # RMS norm: x / scale
    assert torch.allclose(restored, cache["ln_final.hook_in"], atol=1e-5)
    assert not torch.allclose(halved, plain, atol=1e-3), "an edit of hook_normalized must still reach the logits"
