"""Idefics3: a tiny random model through mm_lens against the untouched HF model."""

from __future__ import annotations

import re

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

SIDE = 2  # tokens per side of a crop: 28-pixel crops, 7-pixel patches, pixel shuffle by 2
PATCHES = 4  # patches per side of a crop


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder("idefics3")


@pytest.fixture(scope="module")
def pictures():
    """Split by the processor into 2x2, 2x1 and 1x2 crops (each plus a global view): in
    ``mixed_image_batch`` the rows hold 5, 6 and 0 crops, so pixel_values are padded with
    all-zero crops."""
    return [random_image(30, 50, 0), random_image(60, 20, 1), random_image(20, 60, 2)]


def _unsplit_batch(model, pictures):
    """Image splitting off: every image is its global view alone."""
    processor = model.processor
    texts, images = [chat_text(processor, 2), chat_text(processor, 1)], [pictures[:2], pictures[2:]]
    inputs = dict(processor(text=texts, images=images, do_image_splitting=False, return_tensors="pt", padding=True))
    return MultimodalBatch(inputs, model.modality_map(inputs))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_equal_hf(model, hf_reference, pictures, padding_side):
    batch = mixed_image_batch(model, pictures, padding_side)
    assert batch["pixel_values"].shape[1] == 6 and batch.modality_map.image_tiles.tolist() == [5, 3, 3]
    assert_logits_equal_hf(model, hf_reference, batch)


def test_logits_equal_hf_without_image_splitting(model, hf_reference, pictures):
    batch = _unsplit_batch(model, pictures)
    assert batch.modality_map.image_tiles.tolist() == [1, 1, 1] and batch.modality_map.grids == (((SIDE, SIDE),),) * 3
    assert_logits_equal_hf(model, hf_reference, batch)


def test_hooks_fire_with_documented_shapes(model, pictures):
    batch = mixed_image_batch(model, pictures)
    _, cache = model.run_with_cache(batch)
    assert_every_hook_fires(model, cache)
    assert_neuron_hooks(model, cache, {"lm_mlp": 2, "vision_mlp": 2})  # the connector has no hidden layer
    crops = int(batch.modality_map.image_tiles.sum())
    assert crops == 11  # the vision tower encodes the real crops only, as the map counts them
    n_batch, n_pos = batch["input_ids"].shape
    assert cache["blocks.0.mlp.hook_act"].shape == (n_batch, n_pos, 64)
    assert cache["vision_encoder.encoder_layers.0.mlp.hook_post"].shape == (crops, PATCHES * PATCHES, 64)
    assert cache["vision_encoder.hook_out"].shape == (crops, PATCHES * PATCHES, 32)
    assert cache["vision_projector.hook_out"].shape == (crops, SIDE * SIDE, 32)


def test_features_sit_where_the_map_says(model, hf_reference, pictures):
    for batch in (mixed_image_batch(model, pictures), mixed_image_batch(model, pictures, "right"), _unsplit_batch(model, pictures)):
        _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
        (projected,) = hf_module_outputs(hf_reference, hf_reference.model.connector, batch)
        assert_features_at_positions(batch, cache["blocks.0.hook_resid_pre"], {"image": projected.flatten(0, 1)})


def test_tiles_rows_and_cols_follow_the_crop_tags_and_the_pixel_shuffle(model, hf_reference, pictures):
    """Each crop's tokens sit on the assembled grid where its <row_i_col_j> tag says; and
    nudging one patch of one crop in HF's vision tower output moves exactly the token the map
    gives that crop (tile) and patch (row, col)."""
    batch = mixed_image_batch(model, pictures, "right")
    mm = batch.modality_map
    for b, image in ((0, 0), (1, 1), (1, 2)):
        positions = mm.image_positions(image)[1]
        for start in positions[:: SIDE * SIDE].tolist():
            tile = int(mm.tile[b, start])
            tag = model.processor.tokenizer.convert_ids_to_tokens(int(batch["input_ids"][b, start - 1]))
            if tile == 0:
                assert tag == "<global-img>"
                continue
            i, j = (int(n) - 1 for n in re.fullmatch(r"<row_(\d+)_col_(\d+)>", tag).groups())
            cells = slice(start, start + SIDE * SIDE)
            assert set((mm.row[b, cells] // SIDE).tolist()) == {i} and set((mm.col[b, cells] // SIDE).tolist()) == {j}
        for view in range(len(mm.grids[image])):  # the global view and the assembled crops fill their grids
            assert torch.isfinite(mm.to_grid(torch.ones(mm.shape), image, view)).all()

    encoded, patch = 0, (3, 1)  # the image's crops in HF's encoder order, and one patch of each
    for slot, tile in enumerate([1, 2, 3, 4, 0]):  # image 0: four crops, then its global view
        def nudge(_module, _args, out, slot=slot):
            out.last_hidden_state[slot, patch[0] * PATCHES + patch[1]] += 1.0
            return out

        embeds = []

        def keep(_module, _args, kwargs, embeds=embeds):
            embeds.append(kwargs["inputs_embeds"])

        handles = [
            hf_reference.model.vision_model.register_forward_hook(nudge),
            hf_reference.model.text_model.register_forward_pre_hook(keep, with_kwargs=True),
        ]
        try:
            hf_reference(**batch)
            handles[0].remove()
            hf_reference(**batch)
        finally:
            for handle in handles:
                handle.remove()
        changed = torch.nonzero((embeds[0] - embeds[1]).abs().amax(-1) > 0)
        cell = (patch[0] // 2, patch[1] // 2)  # the pixel shuffle merges 2x2 patches into a token
        expected = [
            [0, p]
            for p in torch.nonzero(mm.image[0] == 0).flatten().tolist()
            if int(mm.tile[0, p]) == tile and (int(mm.row[0, p]) % SIDE, int(mm.col[0, p]) % SIDE) == cell
        ]
        assert len(expected) == 1 and changed.tolist() == expected
        encoded += 1
    assert encoded == int(mm.image_tiles[0])


def test_bad_inputs_raise_clear_errors(model, pictures):
    inputs = dict(mixed_image_batch(model, pictures).inputs)
    image_id = model.hf_model.config.image_token_id
    word = model.processor.tokenizer.convert_tokens_to_ids("red")
    with pytest.raises(ValueError, match="no image token"):
        model({**inputs, "input_ids": torch.where(inputs["input_ids"] == image_id, word, inputs["input_ids"])})
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model({k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_attention_mask")})
    dropped = inputs["input_ids"].clone()
    dropped[1, torch.nonzero(dropped[1] == image_id)[0]] = word
    with pytest.raises(ValueError, match="runs of 4"):
        model({**inputs, "input_ids": dropped})
    blank = inputs["pixel_values"].clone()
    blank[1, 0] = 0.0  # HF would drop this crop before the vision tower
    with pytest.raises(ValueError, match=r"hold \[5, 5, 0\] crops .* \[5, 6, 0\] runs"):
        model({**inputs, "pixel_values": blank})
    with pytest.raises(ValueError, match="pixel_attention_mask has shape"):
        model({**inputs, "pixel_attention_mask": inputs["pixel_attention_mask"][:, :-1]})
    with pytest.raises(ValueError, match="pixel_values hold 2 rows but input_ids 3"):
        model({**inputs, "pixel_values": inputs["pixel_values"][:2], "pixel_attention_mask": inputs["pixel_attention_mask"][:2]})
    with pytest.raises(ValueError, match="pixel_values must be"):
        model({**inputs, "pixel_values": inputs["pixel_values"].flatten(0, 1)})

    one = model.prepare_inputs(["what"], [pictures[0]])
    newline = model.processor.tokenizer.convert_tokens_to_ids("\n")
    ids = one["input_ids"][one["input_ids"] != newline][None]
    with pytest.raises(ValueError, match="drops the newlines"):
        model.modality_map({**one.inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_zeroing_and_analyses(model, hf_reference, pictures):
    assert_zeroing_matches_hf_hook(model, hf_reference, mixed_image_batch(model, pictures))
    clean = model.prepare_inputs(["what is the color", "how many are there"], [pictures[0], pictures[0]])
    corrupted = model.prepare_inputs(["what is the color", "how many are there"], [pictures[2].resize(pictures[0].size)] * 2)
    assert_analyses_run(model, make_samples(6, VARIED_SIZES), clean, corrupted)


def test_generation_equals_hf(model, hf_reference, pictures):
    from checks import assert_generation_equals_hf

    assert_generation_equals_hf(model, hf_reference, mixed_image_batch(model, pictures, "left"))
