"""HookedMLLM: logits equal HF's, TL's hook tools accept multimodal inputs, loading paths."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForImageTextToText

from helpers import hf_logits_with_act_zeroed
from mm_lens import HookedMLLM, MultimodalBatch

BATCHES = {
    "one_image": (["what is the color"], lambda im: [im[0]]),
    "two_images_one_prompt": (["how many"], lambda im: [[im[0], im[1]]]),
    "mixed_sizes_and_text_only": (
        ["what is the color", "how many are there", "describe"],
        lambda im: [im[0], [im[1], im[2]], None],
    ),
}


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_logits_equal_hf(model, hf_reference, images, batch_name, padding_side):
    prompts, pick = BATCHES[batch_name]
    batch = model.prepare_inputs(prompts, pick(images), padding_side=padding_side)
    ours = model(**batch)
    reference = hf_reference(**batch).logits
    assert ours.shape == (len(prompts), batch["input_ids"].shape[1], model.cfg.d_vocab)
    mask = batch["attention_mask"].bool()
    assert (ours - reference)[mask].abs().max() <= 1e-5


def test_batch_object_and_keywords_give_same_logits(model, images):
    batch = model.prepare_inputs(["what is the color"], [images[0]])
    assert isinstance(batch, MultimodalBatch)
    assert torch.equal(model(batch), model(**batch))


def test_run_with_cache_returns_logits_and_filtered_cache(model, images):
    batch = model.prepare_inputs(["what is the color"], [images[0]])
    logits, cache = model.run_with_cache(batch, names_filter=lambda name: name.endswith("mlp.hook_act"))
    assert torch.equal(logits, model(batch))
    assert sorted(cache.keys()) == sorted(model.neuron_hooks["lm_mlp"])


def test_run_with_hooks_zeroing_neurons_matches_hf_forward_hook(model, hf_reference, images):
    batch = model.prepare_inputs(["what is the color"], [images[0]])
    channels = [0, 3, 5]

    def zero(act, hook):
        act[..., channels] = 0.0
        return act

    ours = model.run_with_hooks(batch, fwd_hooks=[("blocks.1.mlp.hook_act", zero)])
    reference = hf_logits_with_act_zeroed(hf_reference, batch, 1, channels)
    assert (ours - reference).abs().max() <= 1e-5
    assert (ours - model(batch)).abs().max() > 1e-4


def test_hooks_context_applies_inside_and_removes_after(model, images):
    batch = model.prepare_inputs(["what is the color"], [images[0]])
    clean = model(batch)

    def zero_projection(out, hook):
        return torch.zeros_like(out)

    with model.hooks(fwd_hooks=[("vision_projector.hook_out", zero_projection)]):
        inside = model(batch)
    assert not torch.allclose(inside, clean)
    assert torch.equal(model(batch), clean)


def test_from_hf_model_wraps_loaded_model(model_folders, arch, hf_reference, images):
    hf_model = AutoModelForImageTextToText.from_pretrained(model_folders[arch], attn_implementation="eager").eval()
    wrapped = HookedMLLM.from_pretrained(model_folders[arch], hf_model=hf_model)
    batch = wrapped.prepare_inputs(["what is the color"], [images[1]])
    assert wrapped.hf_model is hf_model
    assert (wrapped(batch) - hf_reference(**batch).logits).abs().max() <= 1e-5


def test_compatibility_mode_log_probs_match_within_tolerance(model_folders, arch, hf_reference, images):
    compat = HookedMLLM.from_pretrained(model_folders[arch], compatibility_mode=True)
    batch = compat.prepare_inputs(["what is the color"], [images[0]])
    logits, cache = compat.run_with_cache(batch, names_filter="blocks.0.mlp.hook_act")
    reference = hf_reference(**batch).logits
    assert (logits.log_softmax(-1) - reference.log_softmax(-1)).abs().max() <= 1e-4
    assert cache["blocks.0.mlp.hook_act"].shape[-1] == compat.cfg.d_mlp


def test_dtype_argument_casts_the_model(model_folders, arch, images):
    half = HookedMLLM.from_pretrained(model_folders[arch], dtype=torch.bfloat16)
    batch = half.prepare_inputs(["what is the color"], [images[0]])
    batch = MultimodalBatch({**batch.inputs, "pixel_values": batch["pixel_values"].bfloat16()}, batch.modality_map)
    assert half(batch).dtype == torch.bfloat16


def test_loaded_model_is_in_evaluation_mode(model):
    assert not model.training and not model.hf_model.training


def test_model_paths_that_do_not_exist_are_refused_at_once(tmp_path, monkeypatch):
    from mm_lens.model.hooked import resolve_model

    with pytest.raises(FileNotFoundError, match="/no/such/folder is not a local model folder"):
        HookedMLLM.from_pretrained("/no/such/folder")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        HookedMLLM.from_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="someorg/somemodel is not a local model folder .the hub is off"):
        HookedMLLM.from_pretrained("someorg/somemodel")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("someorg/somemodel") == "someorg/somemodel"  # online, a hub name is HF's to resolve


def test_media_tensors_of_the_wrong_kind_or_shape_are_refused(model, images):
    batch = model.prepare_inputs(["what is the color"], [images[0]])
    pixels = batch["pixel_values"]
    cases = [
        ({"pixel_values": (pixels * 255).to(torch.uint8)}, "pixel_values has dtype torch.uint8; pass floating-point image features"),
        ({"pixel_values": pixels[..., :2, :, :]}, "channels where the vision tower takes 3"),
        ({"pixel_values": pixels.flatten()}, "pass at least one image item's features"),
        ({"pixel_values": pixels.tolist()}, "pixel_values is a list; pass the processor's image features as a tensor"),
        ({"input_ids": batch["input_ids"][:, :0], "attention_mask": batch["attention_mask"][:, :0], "pixel_values": None}, "an empty prompt"),
    ]
    for change, phrase in cases:
        inputs = {**batch.inputs, **change}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        with pytest.raises(ValueError, match=re.escape(phrase)):
            model(**inputs)
