"""The TransformerLens tools a researcher reaches for, on every architecture and at image,
video and audio positions, each checked numerically: hooks and ``hook_embed`` against the
untouched HF model's decoder input, the residual decompositions against the final residual,
``logit_attrs`` against the logit difference, backward hooks against autograd and finite
differences, TL's patching through ``with_inputs`` against mm_lens' own, and every TL entry
point given token ids alone refused instead of running without the media."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from helpers import random_image
from transformer_lens import patching as tl_patching
from transformer_lens.tools.analysis import (
    direct_logit_attribution as tl_direct_logit_attribution,
)
from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens

from mm_lens import HookedMLLM, MultimodalBatch
from mm_lens.analysis.direct_attribution import direct_logit_attribution
from mm_lens.analysis.patching import patch_sweep, with_inputs
from mm_lens.model.tiny import TINY_BUILDERS

ARCHS = tuple(TINY_BUILDERS)  # every architecture, a new one included
MEDIA = ("image", "video", "audio")
ATOL = 1e-5
# Gemma 3 normalises each sublayer's output before adding it to the residual stream, so
# TransformerLens' per-head and per-neuron stacks (which skip those norms) do not add up to
# the layer's output there, at text positions as at image ones (docs/hooks.md).
POST_NORMS = ("gemma3",)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(tiny_folder, arch) -> str:
    return tiny_folder(arch)


@pytest.fixture(scope="module")
def model(folder) -> HookedMLLM:
    return HookedMLLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def compat_model(folder) -> HookedMLLM:
    return HookedMLLM.from_pretrained(folder, compatibility_mode=True)


@pytest.fixture(scope="module", params=["plain", "compatibility"])
def any_model(request, model, compat_model) -> HookedMLLM:
    return model if request.param == "plain" else compat_model


def _waveform(n_samples: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.RandomState(seed).randn(n_samples)).astype(np.float32)


def _onevision_video(model: HookedMLLM, frames: int = 3) -> MultimodalBatch:
    """A video prompt beside a text-only one; random frames (HF's video processor needs
    torchvision), the ``<video>`` tokens expanded to the processor's own count."""
    processor = model.processor
    (n_tokens,) = processor._get_num_multimodal_tokens(video_sizes=[(frames, 28, 28)])["num_video_tokens"]
    texts = ["USER : " + "<video>" * n_tokens + " what is the color ASSISTANT :", "USER : how many ASSISTANT :"]
    inputs = dict(processor.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left"))
    inputs["pixel_values_videos"] = torch.randn(1, frames, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return MultimodalBatch(inputs, model.modality_map(inputs))


def _qwen_video(model: HookedMLLM) -> MultimodalBatch:
    """A video of two temporal patches of a 4x4 patch grid beside a text-only prompt; random
    patch rows (HF's video processor needs torchvision)."""
    config = model.hf_model.config
    vision, grid = config.vision_config, (2, 4, 4)
    n_tokens = grid[0] * grid[1] * grid[2] // vision.spatial_merge_size**2
    video = "<|vision_start|>" + "<|video_pad|>" * n_tokens + "<|vision_end|>"
    texts = [f"USER : {video} what is this ASSISTANT :", "USER : how many are there ASSISTANT :"]
    inputs = dict(model.processor.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left"))
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    inputs["pixel_values_videos"] = torch.randn(grid[0] * grid[1] * grid[2], width, generator=torch.Generator().manual_seed(0))
    inputs["video_grid_thw"] = torch.tensor([grid])
    inputs["mm_token_type_ids"] = 2 * (inputs["input_ids"] == config.video_token_id).long()
    return MultimodalBatch(inputs, model.modality_map(inputs))


def media_batches(
    model: HookedMLLM, arch: str, seed: int = 0, prompts: tuple[str, str] = ("what is the color", "how many are there")
) -> dict[str, MultimodalBatch]:
    """Modality -> a left-padded batch holding that modality's items (pictures and clips
    drawn with ``seed``), beside a text-only row where the architecture allows one
    (InstructBLIP takes one image per prompt)."""
    if arch == "qwen2_audio":
        return {"audio": model.prepare_inputs(prompts, audios=[_waveform(7000, seed), None])}
    second = random_image(40, 40, seed + 1) if arch == "instructblip" else None
    batches = {"image": model.prepare_inputs(prompts, [random_image(30, 50, seed), second])}
    if arch == "llava_onevision":
        batches["video"] = _onevision_video(model)
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        batches["video"] = _qwen_video(model)
    return batches


@pytest.fixture(scope="module")
def batches(model, arch) -> dict[str, MultimodalBatch]:
    return media_batches(model, arch)


@pytest.fixture(scope="module")
def runs(any_model, batches) -> dict[str, tuple[MultimodalBatch, torch.Tensor, object]]:
    """Modality -> (batch, logits, full cache) on ``any_model``."""
    return {modality: (batch, *any_model.run_with_cache(batch)) for modality, batch in batches.items()}


def _decoder(model_or_hf: torch.nn.Module, model: HookedMLLM) -> torch.nn.Module:
    """The module that runs the language model's blocks (its ``inputs_embeds`` is what the
    language model receives)."""
    path = model.bridge.adapter.components["blocks"].name.rpartition(".")[0]
    return model_or_hf.get_submodule(path)


def _media(batch: MultimodalBatch) -> torch.Tensor:
    return batch.modality_map.mask(*MEDIA)


def _real(batch: MultimodalBatch) -> torch.Tensor:
    return ~batch.modality_map.mask("padding")


def _max_error(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    return float((a - b)[where.to(a.device)].abs().max())


# ---- hook_embed ------------------------------------------------------------------------


def test_hook_embed_is_what_the_untouched_hf_language_model_receives(model, batches, folder):
    hf = getattr(transformers, model.spec.hf_class).from_pretrained(folder, attn_implementation="eager").eval()
    received = []
    _decoder(hf, model).register_forward_pre_hook(lambda _m, _a, kwargs: received.append(kwargs["inputs_embeds"]), with_kwargs=True)
    for batch in batches.values():
        received.clear()
        hf(**batch)
        _, cache = model.run_with_cache(batch, names_filter=["hook_embed", "blocks.0.hook_resid_pre"])
        (expected,) = received
        assert _media(batch).any()
        assert _max_error(cache["hook_embed"], expected, _real(batch)) <= 1e-6
        assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])  # no position embedding here


def _shift_media_embeddings(model: HookedMLLM, batch: MultimodalBatch) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, object]:
    """Run ``batch`` with a hook on ``hook_embed`` adding ``shift`` at the media positions:
    (what the hook saw, the shift, the logits, the cache of ``blocks.0.hook_resid_pre``)."""
    shift = batch.modality_map.mask(*MEDIA)[..., None] * torch.eye(model.cfg.d_model)[0] * 0.5
    seen = []

    def add(embeds, hook):
        seen.append(embeds.clone())
        return embeds + shift

    with model.hooks(fwd_hooks=[("hook_embed", add)]):
        logits, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    return seen, shift, logits, cache


def test_hook_embed_fires_once_and_what_a_hook_returns_is_what_the_model_receives(model, batches):
    for batch in batches.values():
        seen, shift, logits, cache = _shift_media_embeddings(model, batch)
        assert len(seen) == 1
        torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], seen[0] + shift, atol=0, rtol=0)
        assert _max_error(logits, model(batch), _real(batch)) > 1e-4


def test_a_decoder_called_with_token_ids_still_fires_hook_embed(model, batches):
    batch = next(iter(batches.values()))
    ids = torch.where(_media(batch), model.processor.tokenizer.pad_token_id, batch["input_ids"])  # text alone
    decoder, seen = _decoder(model.hf_model, model), []
    with model.hooks(fwd_hooks=[("hook_embed", lambda embeds, hook: seen.append(embeds))]):
        by_ids = decoder(input_ids=ids).last_hidden_state
    by_embeds = decoder(inputs_embeds=model.hf_model.get_input_embeddings()(ids)).last_hidden_state
    assert len(seen) == 1 and torch.equal(by_ids, by_embeds)


# ---- residual decompositions ---------------------------------------------------------


def test_residual_decompositions_sum_to_the_final_residual_at_media_positions(any_model, runs, arch):
    for modality, (batch, _, cache) in runs.items():
        final, real, media = cache["ln_final.hook_in"], _real(batch), batch.modality_map.mask(modality)
        assert torch.equal(final, cache[f"blocks.{any_model.cfg.n_layers - 1}.hook_resid_post"])
        assert _max_error(cache.decompose_resid().sum(0), final, media) <= ATOL
        assert _max_error(cache.decompose_resid().sum(0), final, real) <= ATOL
        accumulated = cache.accumulated_resid()
        assert torch.equal(accumulated[-1], final) and torch.equal(accumulated[0], cache["hook_embed"])
        for layer in range(any_model.cfg.n_layers + 1):  # every residual stream is its components' sum
            assert _max_error(cache.decompose_resid(layer=layer).sum(0), accumulated[layer], real) <= ATOL
        stacked = cache["hook_embed"] + cache.stack_activation("attn_out").sum(0) + cache.stack_activation("mlp_out").sum(0)
        assert _max_error(stacked, final, real) <= ATOL
        if arch not in POST_NORMS:
            for expand_neurons in (True, False):
                full = cache.get_full_resid_decomposition(expand_neurons=expand_neurons)
                assert _max_error(full.sum(0), final, media) <= ATOL


def test_heads_sum_to_each_attention_output_and_the_final_norm_applies_to_the_stack(any_model, runs):
    n_layers, n_heads = any_model.cfg.n_layers, any_model.cfg.n_heads
    for batch, _, cache in runs.values():
        heads = cache.stack_head_results().reshape(n_layers, n_heads, *cache["hook_embed"].shape)
        for layer in range(n_layers):  # the o-projection's output (before Gemma 3's post-attention norm)
            assert _max_error(heads[layer].sum(0), cache[f"blocks.{layer}.attn.hook_out"], _real(batch)) <= ATOL
        normalized = cache.apply_ln_to_stack(cache.decompose_resid(), layer=-1).sum(0)
        assert _max_error(normalized, cache["ln_final.hook_normalized"], _real(batch)) <= ATOL


def test_logit_attrs_give_the_logit_difference_at_every_position(compat_model, batches):
    # TL's residual directions assume the final norm's gain folded into W_U: compatibility mode
    for batch in batches.values():
        logits, cache = compat_model.run_with_cache(batch)
        rows, pos = batch["input_ids"].shape
        answer, wrong = logits[:, -1].topk(2).indices.T
        tokens, incorrect = answer[:, None].expand(rows, pos), wrong[:, None].expand(rows, pos)
        expected = logits[torch.arange(rows), :, answer] - logits[torch.arange(rows), :, wrong]
        attrs = cache.logit_attrs(cache.decompose_resid(), tokens=tokens, incorrect_tokens=incorrect)
        assert _max_error(attrs.sum(0), expected, _media(batch)) <= ATOL
        assert _max_error(attrs.sum(0), expected, _real(batch)) <= ATOL
        tl = tl_direct_logit_attribution(compat_model.bridge, answer_tokens=tokens, incorrect_tokens=incorrect, cache=cache, pos=None)
        assert _max_error(tl.attribution.sum(0), expected, _media(batch)) <= ATOL


def test_mm_lens_direct_logit_attribution_sums_to_the_logit_difference_per_head(any_model, batches):
    for batch in batches.values():
        result = direct_logit_attribution(any_model, batch)
        keep = _media(batch)
        assert _max_error(result.attribution.sum(0) + result.bias[:, None], result.logit_diff, keep) <= ATOL
        assert result.sum_error() <= ATOL


# ---- backward hooks -------------------------------------------------------------------


def _gradients_at_embeddings(model: HookedMLLM, batch: MultimodalBatch, answer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d logit[row 0, last, answer] / d hook_embed, once from a backward hook on ``hook_embed``
    and once from ``torch.autograd.grad`` on the activation a forward hook kept."""
    kept: dict[str, torch.Tensor] = {}

    def keep_activation(embeds, hook):
        kept["activation"] = embeds

    def keep_gradient(grad, hook):
        kept["gradient"] = grad

    with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", keep_activation)], bwd_hooks=[("hook_embed", keep_gradient)]):
        metric = model(batch)[0, -1, answer]
        (autograd,) = torch.autograd.grad(metric, kept["activation"], retain_graph=True)
        metric.backward()
    return kept["gradient"], autograd


def _logit_moved_along(model: HookedMLLM, batch: MultimodalBatch, answer: int, move: torch.Tensor) -> float:
    """logit[row 0, last, answer] with ``move`` added to ``hook_embed``."""
    with model.hooks(fwd_hooks=[("hook_embed", lambda embeds, hook: embeds + move)]):
        return float(model(batch)[0, -1, answer])


def test_backward_hooks_at_media_positions_give_the_autograd_gradient(model, batches):
    for batch in batches.values():
        media = _media(batch)
        answer = int(model(batch)[0, -1].argmax())
        gradient, autograd = _gradients_at_embeddings(model, batch, answer)
        assert torch.equal(gradient, autograd)
        assert gradient[media].abs().max() > 0  # the answer depends on the media
        # and autograd is the derivative: central differences along the gradient at the media positions
        direction = torch.where(media[..., None], autograd, 0.0)
        direction, step = direction / direction.norm(), 1e-3
        up, down = (_logit_moved_along(model, batch, answer, sign * step * direction) for sign in (1.0, -1.0))
        slope = (up - down) / (2 * step)
        assert abs(slope - float((autograd * direction).sum())) <= 1e-2 * abs(slope) + 1e-4


# ---- tokens ----------------------------------------------------------------------------


def test_to_str_tokens_show_the_media_placeholders(model, batches):
    token_ids = model.spec.token_ids(model.hf_model.config)
    for modality, batch in batches.items():
        strings = model.to_str_tokens(batch["input_ids"][0])
        assert len(strings) == batch["input_ids"].shape[1]
        placeholder = model.processor.tokenizer.convert_ids_to_tokens(token_ids[modality])
        at_media = [strings[p] for p in torch.nonzero(batch.modality_map.mask(modality)[0]).flatten().tolist()]
        assert at_media and all(s.strip() == placeholder for s in at_media)


# ---- patching ----------------------------------------------------------------------------


def test_transformer_lens_patching_through_with_inputs_equals_patch_sweep(model, arch):
    media = "audio" if arch == "qwen2_audio" else "image"
    clean, corrupted = (media_batches(model, arch, seed=seed)[media] for seed in (0, 5))  # other pictures, same layout
    answer, wrong = (int(i) for i in model(clean)[0, -1].topk(2).indices)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    mm = clean.modality_map
    positions = sorted({*torch.nonzero(mm.mask(media)[0]).flatten()[:3].tolist(), int(mm.last[0])})
    mask = torch.zeros(mm.shape, dtype=torch.bool)
    mask[:, positions] = True
    _, clean_cache = model.run_with_cache(clean)
    index = pd.DataFrame([(layer, p) for layer in range(model.cfg.n_layers) for p in positions], columns=["layer", "pos"])
    tl = tl_patching.generic_activation_patch(
        with_inputs(model, corrupted), corrupted["input_ids"], clean_cache, metric,
        tl_patching.layer_pos_patch_setter, "resid_pre", index_df=index,
    )
    ours = patch_sweep(model, clean, corrupted, hook="resid_pre", positions=mask, metric=metric, fast=False, progress=False)
    torch.testing.assert_close(tl.cpu().reshape(model.cfg.n_layers, len(positions)), ours.metric, atol=1e-5, rtol=0)


def test_with_inputs_refuses_a_cache_of_a_longer_prompt(model, arch):
    media = "audio" if arch == "qwen2_audio" else "image"
    batch = media_batches(model, arch)[media]
    longer = media_batches(model, arch, prompts=("what is the color of the picture", "how many are there"))[media]
    _, other_cache = model.run_with_cache(longer, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match=r"blocks.0.hook_resid_pre does not line up .* is \(2, \d+\) \(rows, positions\)"):
        tl_patching.get_act_patch_resid_pre(with_inputs(model, batch), batch["input_ids"], other_cache, lambda logits: logits.sum())


# ---- nothing runs without the media --------------------------------------------------------


def _entry_points(model: HookedMLLM, ids: torch.Tensor, cache: object) -> dict[str, object]:
    """TransformerLens entry points, each a call on token ids alone."""
    def metric(logits):
        return logits.sum()

    return {
        "bridge forward": lambda: model.bridge(ids),
        "bridge run_with_cache": lambda: model.bridge.run_with_cache(ids),
        "bridge run_with_hooks": lambda: model.bridge.run_with_hooks(ids, fwd_hooks=[]),
        "bridge generate": lambda: model.bridge.generate(ids, max_new_tokens=1, verbose=False),
        "bridge input_to_embed": lambda: model.bridge.input_to_embed(ids),
        "HookedMLLM run_with_cache": lambda: model.run_with_cache(ids),
        "TL patching on HookedMLLM": lambda: tl_patching.get_act_patch_resid_pre(model, ids, cache, metric),
        "TL patching on the bridge": lambda: tl_patching.get_act_patch_resid_pre(model.bridge, ids, cache, metric),
        "TL logit lens": lambda: tl_logit_lens(model.bridge, ids),
    }


def test_transformer_lens_given_token_ids_alone_refuses_to_run_without_the_media(model, batches):
    for modality, batch in batches.items():
        _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
        for what, call in _entry_points(model, batch["input_ids"], cache).items():
            with pytest.raises(ValueError, match=f"{modality} tokens but no {model.spec.feature_inputs[modality]}"):
                call()
                pytest.fail(f"{what} ran without the {modality}")
