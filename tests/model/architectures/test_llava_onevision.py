"""LLaVA-OneVision: a tiny random model through mm_lens against the untouched HF model."""

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
from mm_lens.model.architectures.llava import anyres_layout
from mm_lens.model.architectures.llava_onevision import ImageOnlyLlavaOnevisionProcessor
from mm_lens.model.inputs import MultimodalBatch

SIDE = 4  # patches per side of a 28-pixel view with 7-pixel patches
# 30x50 takes 2x2 tiles of which 4 of 8 patch rows stay after unpadding; 60x20 takes 2x1 tiles;
# 40x40 takes 2x2 tiles, its 8x8 grid downsized to 5x5 (anyres_max_2)
IMAGE_SIZES = [(30, 50), (60, 20), (40, 40)]


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder("llava_onevision")


def test_the_folder_loads_the_image_only_processor(model, pictures):
    # transformers builds LlavaOnevisionProcessor only with torchvision: the folder names the image-only one
    assert type(model.processor) is ImageOnlyLlavaOnevisionProcessor
    with pytest.raises(ValueError, match="takes no videos"):
        model.processor(text=["<video>"], videos=[[pictures[0]] * 2])


@pytest.fixture(scope="module")
def pictures():
    return [random_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGE_SIZES)]


def _nested_batch(model, pictures):
    """Images given per prompt to the processor: HF then keeps only the base view of images
    that share their prompt (``batch_num_images`` > 1)."""
    texts, images = [chat_text(model.processor, 1), chat_text(model.processor, 2)], [[pictures[2]], [pictures[0], pictures[1]]]
    inputs = dict(model.processor(text=texts, images=images, return_tensors="pt", padding=True))
    return MultimodalBatch(inputs, model.modality_map(inputs))


def _video_batch(model, picture=None, frames=3, padding_side="right"):
    """A video prompt next to a text-only one (or, with ``picture``, an image one), built by
    hand: transformers' video processor needs torchvision, so the frames are random pixel
    values and the ``<video>`` tokens are expanded with the processor's own count."""
    processor = model.processor
    (n_tokens,) = processor._get_num_multimodal_tokens(video_sizes=[(frames, 28, 28)])["num_video_tokens"]
    texts = ["USER : " + "<video>" * n_tokens + " what is the color ASSISTANT :", "USER : how many ASSISTANT :"]
    image_inputs = {}
    if picture is not None:  # the processor expands the image row; both rows are then padded together
        image_inputs = dict(processor(text=["USER : <image> how many ASSISTANT :"], images=[picture], return_tensors="pt"))
        texts[1] = processor.tokenizer.decode(image_inputs.pop("input_ids")[0])
        del image_inputs["attention_mask"]
    inputs = {**processor.tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side), **image_inputs}
    inputs["pixel_values_videos"] = torch.randn(1, frames, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return MultimodalBatch(inputs, model.modality_map(inputs))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_equal_hf(model, hf_reference, pictures, padding_side):
    batch = mixed_image_batch(model, pictures, padding_side)
    assert batch["batch_num_images"].tolist() == [1, 2]  # images per prompt: the second prompt's two share it
    assert_logits_equal_hf(model, hf_reference, batch)


def test_logits_equal_hf_for_images_sharing_a_prompt_and_for_videos(model, hf_reference, pictures):
    assert_logits_equal_hf(model, hf_reference, _nested_batch(model, pictures))
    assert_logits_equal_hf(model, hf_reference, _video_batch(model))
    assert_logits_equal_hf(model, hf_reference, _video_batch(model, pictures[0]))


def test_hooks_fire_with_documented_shapes(model, pictures):
    batch = mixed_image_batch(model, pictures)
    _, cache = model.run_with_cache(batch)
    assert_every_hook_fires(model, cache)
    assert_neuron_hooks(model, cache, {"lm_mlp": 2, "vision_mlp": 2, "projector": 1})
    crops = int(batch.modality_map.image_tiles.sum())
    assert crops == 5 + 1 + 1  # base view + 2x2 tiles; the two images sharing a prompt: base view only
    n_batch, n_pos = batch["input_ids"].shape
    assert cache["blocks.0.mlp.hook_act"].shape == (n_batch, n_pos, 64)
    assert cache["vision_encoder.encoder_layers.0.mlp.hook_post"].shape == (crops, SIDE * SIDE, 64)
    assert cache["vision_projector.hook_hidden"].shape == (crops, SIDE * SIDE, 32)
    assert cache["vision_encoder.hook_out"].shape == (crops, SIDE * SIDE, 32)


def test_features_sit_where_the_map_says(model, hf_reference, pictures):
    for batch in (mixed_image_batch(model, pictures), mixed_image_batch(model, pictures, "right"), _nested_batch(model, pictures)):
        _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
        (projected,) = hf_module_outputs(hf_reference, hf_reference.model.multi_modal_projector, batch)
        assert_features_at_positions(batch, cache["blocks.0.hook_resid_pre"], {"image": projected.flatten(0, 1)}, all_placed=False)

    for picture in (None, pictures[0]):
        batch = _video_batch(model, picture)
        _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
        pooled = hf_reference.model.get_video_features(batch["pixel_values_videos"]).pooler_output[:, :-1]  # last: newline
        features = {"video": pooled.flatten(0, 1)}
        if picture is not None:  # the projector runs on the image crops first, then on the frames
            features["image"] = hf_module_outputs(hf_reference, hf_reference.model.multi_modal_projector, batch)[0].flatten(0, 1)
        assert_features_at_positions(batch, cache["blocks.0.hook_resid_pre"], features, all_placed=False)
        mm = batch.modality_map
        video = int(mm.items("video")[0])
        assert mm.item_modality[video] == "video" and int(mm.image_tiles[video]) == 3
        row, positions = mm.image_positions(video)
        assert len(positions) == 3 * 2 * 2 + 1 and mm.newline[row, positions].tolist() == [False] * 12 + [True]
        assert mm.tile[row, positions[:-1]].tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_shared_prompt_images_are_base_view_and_newline(model, pictures):
    mm = _nested_batch(model, pictures).modality_map
    assert mm.image_tiles.tolist() == [5, 1, 1]  # the lone 40x40 image is tiled 2x2
    for image in (1, 2):
        row, positions = mm.image_positions(image)
        assert len(positions) == SIDE * SIDE + 1
        assert mm.newline[row, positions].tolist() == [False] * SIDE * SIDE + [True]
        assert torch.equal(mm.feature[row, positions[:-1]], torch.arange(SIDE * SIDE) + SIDE * SIDE * (5 + image - 1))


def test_downsized_grid_is_the_bilinear_resize_of_the_unpadded_grid(model, hf_reference, pictures):
    """The 2x2-tiled 40x40 image: its 8x8 unpadded grid is resized to 5x5; row/col of the
    map must be the cells of that resize."""
    batch = model.prepare_inputs(["what"], [pictures[2]])
    config = model.hf_model.config
    (layout,) = model.spec.layouts(config, batch.inputs)
    assert layout.grids == ((SIDE, SIDE), (5, 5)) and layout.n_tiles == 5
    hires = layout.tile >= 1
    assert bool((layout.feature[SIDE * SIDE :] == -1).all()) and set(layout.tile[hires].tolist()) == {1, 2, 3, 4}

    (projected,) = hf_module_outputs(hf_reference, hf_reference.model.multi_modal_projector, batch)
    full = anyres_layout(config, IMAGE_SIZES[2])  # the same image, not downsized
    keep = full.tile >= 1
    grid = torch.zeros(full.grids[1] + (projected.shape[-1],))
    grid[full.row[keep], full.col[keep]] = projected.flatten(0, 1)[full.feature[keep]]
    resized = torch.nn.functional.interpolate(grid.permute(2, 0, 1)[None], size=(5, 5), mode="bilinear")[0].permute(1, 2, 0)

    _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    mm, embeddings = batch.modality_map, cache["blocks.0.hook_resid_pre"]
    cells = (mm.tile[0] >= 1) & ~mm.newline[0]
    torch.testing.assert_close(embeddings[0, cells], resized[mm.row[0, cells], mm.col[0, cells]], atol=1e-6, rtol=0)
    assert int(mm.newline[0].sum()) == 5


def test_bad_inputs_raise_clear_errors(model, pictures):
    batch = mixed_image_batch(model, pictures)
    inputs, image_id = dict(batch.inputs), model.hf_model.config.image_token_id
    word = model.processor.tokenizer.convert_tokens_to_ids("red")
    with pytest.raises(ValueError, match="no image token"):
        model({**inputs, "input_ids": torch.where(inputs["input_ids"] == image_id, word, inputs["input_ids"])})
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model({k: v for k, v in inputs.items() if k != "pixel_values"})
    dropped = inputs["input_ids"].clone()
    dropped[1, torch.nonzero(dropped[1] == image_id)[0]] = word
    with pytest.raises(ValueError, match="image tokens but the 3 image"):
        model({**inputs, "input_ids": dropped})
    with pytest.raises(ValueError, match="needs image_sizes with pixel_values"):
        model({k: v for k, v in inputs.items() if k != "image_sizes"})
    with pytest.raises(ValueError, match="image_sizes describe 2 images"):
        model({**inputs, "image_sizes": inputs["image_sizes"][:2]})
    with pytest.raises(ValueError, match="batch_num_images count 1 images"):
        model({**inputs, "batch_num_images": inputs["batch_num_images"][:1]})
    video = dict(_video_batch(model).inputs)
    with pytest.raises(ValueError, match="pixel_values_videos must be"):
        model({**video, "pixel_values_videos": video["pixel_values_videos"][0]})
    with pytest.raises(ValueError, match="no pixel_values_videos were given"):
        model({k: v for k, v in video.items() if k != "pixel_values_videos"})


def test_zeroing_and_analyses(model, hf_reference, pictures):
    assert_zeroing_matches_hf_hook(model, hf_reference, mixed_image_batch(model, pictures))
    clean = model.prepare_inputs(["what is the color", "how many are there"], [pictures[0], pictures[0]])
    corrupted = model.prepare_inputs(["what is the color", "how many are there"], [pictures[1].resize(pictures[0].size)] * 2)
    assert_analyses_run(model, make_samples(6, VARIED_SIZES), clean, corrupted)


def test_statistics_of_a_batch_with_an_image_and_a_video_count_each_call(model, hf_reference, pictures):
    """The tower runs on the image crops, then on the video frames: each call's rows go to
    their own class, and the counts equal HF's vision-MLP activations caught by a PyTorch hook."""
    from mm_lens.neurons.statistics import NeuronStatsCollector

    batch = _video_batch(model, picture=pictures[1])
    collector = NeuronStatsCollector(model, ["d"], modules=["vision_mlp"], classes=("image", "video", "all"))
    collector.update(batch, ["d", "d"])
    stats = collector.stats
    activation = hf_reference.model.vision_tower.encoder.layers[0].mlp.activation_fn
    image_rows, video_rows = (act.reshape(-1, act.shape[-1]) for act in hf_module_outputs(hf_reference, activation, batch))
    assert int(stats.n_tokens("vision_mlp", "image")) == image_rows.shape[0]
    assert int(stats.n_tokens("vision_mlp", "video")) == video_rows.shape[0] == 3 * SIDE * SIDE
    assert torch.equal(stats.over_zero("vision_mlp", "image")[0, :, 0], (image_rows > 0).sum(0))
    assert torch.equal(stats.over_zero("vision_mlp", "video")[0, :, 0], (video_rows > 0).sum(0))


def test_generation_equals_hf(model, hf_reference, pictures):
    from checks import assert_generation_equals_hf

    assert_generation_equals_hf(model, hf_reference, mixed_image_batch(model, pictures, "left"))
    assert_generation_equals_hf(model, hf_reference, _video_batch(model, padding_side="left"))
