"""Image layouts of LLaVA-1.5 and LLaVA-NeXT agree with the processor's token expansion."""

from __future__ import annotations

import pytest
import torch

from helpers import random_image

@pytest.fixture(scope="module")
def folder(model_folders, arch):
    return model_folders[arch]


SIZES = [(28, 28), (30, 50), (60, 20), (13, 90), (90, 13), (57, 56), (200, 120)]


@pytest.mark.parametrize("height,width", SIZES)
def test_layout_length_equals_processor_expansion(model, height, width):
    batch = model.prepare_inputs(["what"], [random_image(height, width, seed=height * width)])
    n_tokens = int((batch["input_ids"] == model.hf_model.config.image_token_id).sum())
    layouts = model.spec.layouts(model.hf_model.config, batch.inputs)
    assert [len(layout) for layout in layouts] == [n_tokens]


@pytest.mark.parametrize("height,width", SIZES)
def test_anyres_features_are_distinct_and_inside_their_tiles(models, height, width):
    model = models["llava_next"]
    batch = model.prepare_inputs(["what"], [random_image(height, width, seed=1)])
    (layout,) = model.spec.layouts(model.hf_model.config, batch.inputs)
    features = layout.feature[~layout.newline]
    assert features.unique().numel() == features.numel()
    assert int(features.max()) < layout.n_features
    side = model.hf_model.config.vision_config.image_size // model.hf_model.config.vision_config.patch_size
    assert torch.equal(features // (side * side), layout.tile[~layout.newline])
    rows, cols = layout.grids[1]
    hires = layout.tile >= 1
    assert int(hires.sum()) == rows * cols
    assert int(layout.newline.sum()) == rows


def test_shared_architecture_checks_hold(model, hf_reference, images):
    """The checks every other architecture's tests run, on LLaVA (where the rest of the
    suite checks the same properties in depth)."""
    from checks import (
        assert_analyses_run,
        assert_every_hook_fires,
        assert_features_at_positions,
        assert_logits_equal_hf,
        assert_neuron_hooks,
        assert_zeroing_matches_hf_hook,
        hf_module_outputs,
    )
    from helpers import VARIED_SIZES, make_samples

    batch = model.prepare_inputs(["what is the color", "how many"], [images[0], [images[1], images[2]]])
    assert_logits_equal_hf(model, hf_reference, batch)
    _, cache = model.run_with_cache(batch)
    assert_every_hook_fires(model, cache)
    assert_neuron_hooks(model, cache, {"lm_mlp": 2, "vision_mlp": 2, "projector": 1})
    (projected,) = hf_module_outputs(hf_reference, hf_reference.model.multi_modal_projector, batch)
    embeddings = cache["blocks.0.hook_resid_pre"]
    assert_features_at_positions(batch, embeddings, {"image": projected.flatten(0, 1)}, all_placed=model.spec.hf_class != "LlavaNextForConditionalGeneration")
    assert_zeroing_matches_hf_hook(model, hf_reference, batch)
    clean = model.prepare_inputs(["what is the color", "how many are there"], [images[0], images[0]])
    corrupted = model.prepare_inputs(["what is the color", "how many are there"], [images[2].resize(images[0].size)] * 2)
    assert_analyses_run(model, make_samples(6, VARIED_SIZES), clean, corrupted)


def test_generation_equals_hf(model, hf_reference, images):
    from checks import assert_generation_equals_hf

    batch = model.prepare_inputs(["what is the color", "how many"], [images[0], [images[1], images[2]]], padding_side="left")
    assert_generation_equals_hf(model, hf_reference, batch)
