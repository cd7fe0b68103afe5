"""Gemma 3: a tiny random model through mm_lens against the untouched HF model."""

from __future__ import annotations

import pytest
import torch

from checks import (
    chat_text,
    mixed_image_batch,
    assert_analyses_run,
    assert_every_hook_fires,
    assert_features_at_positions,
    assert_logits_equal_hf,
    assert_neuron_hooks,
    assert_zeroing_matches_hf_hook,
    hf_module_outputs,
)
from helpers import VARIED_SIZES, make_samples, random_image
from mm_lens.model.inputs import MultimodalBatch

TOKENS = 4  # mm_tokens_per_image: the 4x4 patch grid pooled to 2x2


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder("gemma3")


@pytest.fixture(scope="module")
def pictures():
    return [random_image(30, 50, 0), random_image(60, 20, 1), random_image(40, 40, 2)]


def _pan_and_scan_batch(model):
    """Pan-and-scan on: the wide image is sent with its 3 crops, each an image of its own."""
    processor = model.processor
    texts = [chat_text(processor, 1), chat_text(processor, 1, "how many")]
    images = [[random_image(30, 90, 3)], [random_image(40, 40, 4)]]
    pan_and_scan = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20}
    inputs = dict(processor(text=texts, images=images, **pan_and_scan, return_tensors="pt", padding=True))
    return MultimodalBatch(inputs, model.modality_map(inputs))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_equal_hf_with_bidirectional_image_attention(model, hf_reference, pictures, padding_side):
    batch = mixed_image_batch(model, pictures, padding_side)
    assert torch.equal(batch["token_type_ids"].bool(), batch.modality_map.mask("image"))
    assert_logits_equal_hf(model, hf_reference, batch)
    causal = hf_reference(**{k: v for k, v in batch.items() if k != "token_type_ids"}).logits
    assert (causal - model(batch))[batch["attention_mask"].bool()].abs().max() > 1e-3  # token_type_ids matter


def test_logits_equal_hf_with_pan_and_scan(model, hf_reference):
    batch = _pan_and_scan_batch(model)
    assert batch["pixel_values"].shape[0] == 5 and batch.modality_map.n_images == 5
    assert_logits_equal_hf(model, hf_reference, batch)


def test_hooks_fire_with_documented_shapes(model, pictures):
    batch = mixed_image_batch(model, pictures)
    _, cache = model.run_with_cache(batch)
    assert_every_hook_fires(model, cache)
    assert_neuron_hooks(model, cache, {"lm_mlp": 2, "vision_mlp": 2})  # the projector has no hidden layer
    n_batch, n_pos = batch["input_ids"].shape
    assert cache["blocks.0.mlp.hook_act"].shape == (n_batch, n_pos, 64)
    assert cache["vision_encoder.encoder_layers.0.mlp.hook_post"].shape == (3, 16, 64)
    assert cache["vision_encoder.hook_out"].shape == (3, 16, 32)
    assert cache["vision_projector.hook_out"].shape == (3, TOKENS, 32)


def test_features_sit_where_the_map_says(model, hf_reference, pictures):
    for batch in (mixed_image_batch(model, pictures), mixed_image_batch(model, pictures, "right"), _pan_and_scan_batch(model)):
        _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
        (projected,) = hf_module_outputs(hf_reference, hf_reference.model.multi_modal_projector, batch)
        assert_features_at_positions(batch, cache["blocks.0.hook_resid_pre"], {"image": projected.flatten(0, 1)})


def test_row_and_col_name_the_pooled_block_of_patches(model, hf_reference, pictures):
    """The token at (row, col) is the projection of the mean of the vision tower's 2x2 block
    of patches (row, col), computed here with HF's own norm and projection weight."""
    batch = mixed_image_batch(model, pictures)
    (patches,) = hf_module_outputs(hf_reference, hf_reference.model.vision_tower, batch)
    grid = patches.last_hidden_state.unflatten(1, (4, 4))  # [images, 4, 4, d]
    projector = hf_reference.model.multi_modal_projector
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    mm, embeddings = batch.modality_map, cache["blocks.0.hook_resid_pre"]
    for image in range(mm.n_images):
        row, positions = mm.image_positions(image)
        assert mm.grids[image] == ((2, 2),)
        for position in positions.tolist():
            r, c = int(mm.row[row, position]), int(mm.col[row, position])
            block = grid[image, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean((0, 1))
            expected = projector.mm_soft_emb_norm(block) @ projector.mm_input_projection_weight
            torch.testing.assert_close(embeddings[row, position], expected, atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors(model, pictures):
    inputs = dict(mixed_image_batch(model, pictures).inputs)
    image_id = model.hf_model.config.image_token_id
    word = model.processor.tokenizer.convert_tokens_to_ids("red")
    no_images = torch.where(inputs["input_ids"] == image_id, word, inputs["input_ids"])
    with pytest.raises(ValueError, match="no image token"):
        model({**inputs, "input_ids": no_images, "token_type_ids": torch.zeros_like(no_images)})
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model({k: v for k, v in inputs.items() if k != "pixel_values"})
    dropped, types = inputs["input_ids"].clone(), inputs["token_type_ids"].clone()
    first = torch.nonzero(dropped[1] == image_id)[0]
    dropped[1, first], types[1, first] = word, 0
    with pytest.raises(ValueError, match="image tokens but the 3 image"):
        model({**inputs, "input_ids": dropped, "token_type_ids": types})
    with pytest.raises(ValueError, match="token_type_ids must be 1 at the image tokens"):
        model({**inputs, "token_type_ids": torch.zeros_like(types)})
    with pytest.raises(ValueError, match="token_type_ids have shape"):
        model({**inputs, "token_type_ids": inputs["token_type_ids"][:, 1:]})
    with pytest.raises(ValueError, match="image tokens without token_type_ids"):
        model({k: v for k, v in inputs.items() if k != "token_type_ids"})


def test_zeroing_and_analyses(model, hf_reference, pictures):
    assert_zeroing_matches_hf_hook(model, hf_reference, mixed_image_batch(model, pictures))
    clean = model.prepare_inputs(["what is the color", "how many are there"], [pictures[0], pictures[0]])
    corrupted = model.prepare_inputs(["what is the color", "how many are there"], [pictures[2].resize(pictures[0].size)] * 2)
    assert_analyses_run(model, make_samples(6, VARIED_SIZES), clean, corrupted)


@pytest.mark.parametrize("renormalize", [False, True])
def test_knockout_cuts_the_bidirectional_image_edges_too(model, pictures, renormalize):
    """Image tokens attend forward inside their image: knocking out image -> image must cut
    those (upper-triangle) edges as well as the causal ones."""
    from mm_lens.analysis.attention import knockout_hooks

    batch = mixed_image_batch(model, pictures)
    image = batch.modality_map.mask("image")
    pairs = image[:, :, None] & image[:, None, :]
    item = batch.modality_map.image
    same_item = pairs & (item[:, :, None] == item[:, None, :])
    upper = same_item & torch.ones(pairs.shape[1:], dtype=torch.bool).triu(1)
    seen = {}
    record = ("blocks.0.attn.hook_pattern", lambda pattern, hook: seen.setdefault("pattern", pattern.detach()))
    model.run_with_hooks(batch, fwd_hooks=[record])
    assert (seen.pop("pattern").permute(0, 2, 3, 1)[upper] > 0).all()  # forward edges inside an image exist
    hooks = knockout_hooks(model, batch, query="image", keys="image", layers=[0], renormalize=renormalize)
    model.run_with_hooks(batch, fwd_hooks=hooks + [record])
    pattern = seen["pattern"].permute(0, 2, 3, 1)  # [batch, q, k, head]
    assert (pattern[pairs] == 0).all()
    if renormalize:  # image queries keep their other keys, renormalised
        rows = pattern.sum(2)[image]
        torch.testing.assert_close(rows, torch.ones_like(rows))


def test_generation_equals_hf(model, hf_reference, pictures):
    from checks import assert_generation_equals_hf

    assert_generation_equals_hf(model, hf_reference, mixed_image_batch(model, pictures, "left"))
