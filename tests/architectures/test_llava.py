"""Image layouts of LLaVA-1.5 and LLaVA-NeXT agree with the processor's token expansion."""

from __future__ import annotations

import pytest
import torch

from conftest import random_image

SIZES = [(28, 28), (30, 50), (60, 20), (13, 90), (90, 13), (57, 56), (200, 120)]


@pytest.mark.parametrize("height,width", SIZES)
def test_layout_length_equals_processor_expansion(model, height, width):
    batch = model.prepare_inputs(["what"], [random_image(height, width, seed=height * width)])
    n_tokens = int((batch["input_ids"] == model.hf_model.config.image_token_id).sum())
    layouts = model.spec.image_layouts(model.hf_model.config, batch.inputs)
    assert [len(layout) for layout in layouts] == [n_tokens]


@pytest.mark.parametrize("height,width", SIZES)
def test_anyres_features_are_distinct_and_inside_their_tiles(models, height, width):
    model = models["llava_next"]
    batch = model.prepare_inputs(["what"], [random_image(height, width, seed=1)])
    (layout,) = model.spec.image_layouts(model.hf_model.config, batch.inputs)
    features = layout.feature[~layout.newline]
    assert features.unique().numel() == features.numel()
    assert int(features.max()) < layout.n_features
    side = model.hf_model.config.vision_config.image_size // model.hf_model.config.vision_config.patch_size
    assert torch.equal(features // (side * side), layout.tile[~layout.newline])
    rows, cols = layout.grids[1]
    hires = layout.tile >= 1
    assert int(hires.sum()) == rows * cols
    assert int(layout.newline.sum()) == rows
