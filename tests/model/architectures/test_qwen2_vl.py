"""Qwen2-VL and Qwen2.5-VL: logits equal HF's (several images of different sizes per
prompt, text-only rows, both paddings, a video), every hook fires with its documented
shape, image and video features sit where the ModalityMap says and its rows/columns are
HF's own M-RoPE grid, encoder statistics split per image, bad inputs fail clearly, and
every analysis runs."""

from __future__ import annotations

import pytest
import torch
from checks import (
    assert_analyses_run,
    assert_every_hook_fires,
    assert_features_at_positions,
    assert_logits_equal_hf,
    assert_neuron_hooks,
    assert_zeroing_matches_hf_hook,
    hf_module_outputs,
)
from helpers import VARIED_SIZES, make_samples, random_image

from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.model.samples import prompt_batch
from mm_lens.model.inputs import MultimodalBatch
from mm_lens.analysis.patching import patch_sweep

PROMPTS = ["what is the color", "how many are there", "describe the picture"]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(tiny_folder, arch) -> str:
    return tiny_folder(arch)




def mixed_batch(model, padding_side: str = "left") -> MultimodalBatch:
    """One image; two images of other sizes; a text-only row."""
    images = [random_image(30, 50, 0), [random_image(60, 20, 1), random_image(40, 40, 2)], None]
    return model.prepare_inputs(PROMPTS, images, padding_side=padding_side)


def video_batch(model, padding_side: str = "right") -> MultimodalBatch:
    """An image and a 4-frame video (two temporal patches) in one prompt, a text-only row.

    HF's Qwen-VL video processor needs torchvision, so the batch is built from the
    processor's parts: the image processor makes each frame's rows (one patch as (channel,
    temporal_patch_size, patch, patch), the frame repeated over the temporal axis; a video
    row holds consecutive frames on that axis, rows ordered frame group first, then as an
    image's rows), the tokenizer the prompts with each placeholder expanded to its merged
    tokens, and the processor the ``mm_token_type_ids``.
    """
    processor = model.processor
    image = processor.image_processor([random_image(30, 50, 0)], return_tensors="pt")
    frames = processor.image_processor([random_image(24, 40, 10 + k) for k in range(4)], return_tensors="pt")
    _, grid_h, grid_w = frames["image_grid_thw"][0].tolist()
    patches = frames["pixel_values"].view(4, grid_h * grid_w, 3, 2, -1)[:, :, :, 0]
    pixel_values_videos = patches.view(2, 2, grid_h * grid_w, 3, -1).permute(0, 2, 3, 1, 4).reshape(2 * grid_h * grid_w, -1)

    def placeholder(token: str, n_tokens: int) -> str:
        return "<|vision_start|>" + token * n_tokens + "<|vision_end|>"

    image_tokens = placeholder("<|image_pad|>", int(image["image_grid_thw"].prod()) // 4)
    video_tokens = placeholder("<|video_pad|>", 2 * grid_h * grid_w // 4)
    texts = [f"USER : {image_tokens} {video_tokens} what is this ASSISTANT :", "USER : how many are there ASSISTANT :"]
    inputs = dict(processor.tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side))
    inputs.update(
        mm_token_type_ids=torch.tensor(processor.create_mm_token_type_ids(inputs["input_ids"])),
        pixel_values=image["pixel_values"],
        image_grid_thw=image["image_grid_thw"],
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=torch.tensor([[2, grid_h, grid_w]]),
    )
    return MultimodalBatch(inputs, model.modality_map(inputs))


def merged_tokens(visual_output) -> torch.Tensor:
    """The vision tower's merged tokens ``[n, d_model]`` in item order (Qwen2.5-VL undoes its
    window order inside the tower); HF's ``get_*_features`` split them per item in place."""
    pooled = visual_output.pooler_output
    return torch.cat(pooled) if isinstance(pooled, (tuple, list)) else pooled


@pytest.mark.parametrize("height,width", [(16, 16), (30, 50), (60, 20), (13, 90), (200, 120)])
def test_layout_matches_processor_grid(model, height, width):
    batch = model.prepare_inputs(["what"], [random_image(height, width, seed=height * width)])
    (layout,) = model.spec.layouts(model.hf_model.config, batch.inputs)
    _, grid_h, grid_w = batch["image_grid_thw"][0].tolist()
    assert len(layout) == int((batch["input_ids"] == model.hf_model.config.image_token_id).sum())
    assert layout.grids == ((grid_h // 2, grid_w // 2),) and len(layout) == layout.n_features == layout.n_tiles
    assert batch["pixel_values"].shape[0] == 4 * layout.n_tiles  # 2x2 patches per unit of the vision tower


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_equal_hf(model, hf_reference, padding_side):
    assert_logits_equal_hf(model, hf_reference, mixed_batch(model, padding_side))


def test_logits_equal_hf_with_a_video(model, hf_reference):
    batch = video_batch(model)
    assert batch.modality_map.item_modality == ("image", "video")
    assert_logits_equal_hf(model, hf_reference, batch)


def test_hooks_fire_with_documented_shapes(model):
    batch = mixed_batch(model)
    _, cache = model.run_with_cache(batch)
    assert_every_hook_fires(model, cache)
    assert_neuron_hooks(model, cache, {"lm_mlp": 2, "vision_mlp": 2, "projector": 1})
    config = model.hf_model.config
    n_patches = int(batch["image_grid_thw"].prod(-1).sum())
    n_tokens, widths = n_patches // 4, model.neuron_widths
    vision_width = widths["projector"] // 4
    shapes = {
        "blocks.0.hook_resid_pre": (*batch["input_ids"].shape, config.text_config.hidden_size),
        "blocks.1.mlp.hook_act": (*batch["input_ids"].shape, widths["lm_mlp"]),
        "vision_encoder.hook_vision_embed": (n_patches, vision_width),
        "vision_encoder.blocks.1.hook_resid_post": (n_patches, vision_width),
        model.neuron_hooks["vision_mlp"][1]: (n_patches, widths["vision_mlp"]),
        "vision_projector.hook_hidden": (n_tokens, widths["projector"]),
        "vision_projector.hook_out": (n_tokens, config.text_config.hidden_size),
    }
    assert {name: tuple(cache[name].shape) for name in shapes} == shapes


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_image_features_sit_where_the_map_says(model, hf_reference, padding_side):
    batch = mixed_batch(model, padding_side)
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    (visual,) = hf_module_outputs(hf_reference, hf_reference.model.visual, batch)
    assert_features_at_positions(batch, cache["blocks.0.hook_resid_pre"], {"image": merged_tokens(visual)})


def test_video_features_sit_where_the_map_says(model, hf_reference):
    batch = video_batch(model)
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    image, video = hf_module_outputs(hf_reference, hf_reference.model.visual, batch)  # images first, as HF runs them
    features = {"image": merged_tokens(image), "video": merged_tokens(video)}
    assert_features_at_positions(batch, cache["blocks.0.hook_resid_pre"], features)


def test_rows_cols_and_frames_are_hf_mrope_grid(model, hf_reference):
    """Each item's (frame, row, col) is HF's own 3-D rotary position, less the item's start."""
    for batch in (mixed_batch(model, "left"), video_batch(model)):
        positions, _ = hf_reference.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"),
            attention_mask=batch["attention_mask"],
        )
        mm = batch.modality_map
        for item in range(mm.n_images):
            row, at = mm.image_positions(item)
            frame, height, width = positions[:, row, at]
            assert torch.equal(mm.row[row, at], height - height.min())
            assert torch.equal(mm.col[row, at], width - width.min())
            assert torch.equal(mm.tile[row, at], torch.unique(frame, return_inverse=True)[1])
            grid = mm.to_grid(torch.ones(mm.shape), item)
            assert grid.shape == mm.grids[item][0] and not grid.isnan().any()


def test_encoder_rows_split_per_image(model, hf_reference):
    """The packed tower keeps each image's rows together (Qwen2.5-VL reorders them into
    attention windows inside an image only): the merger's rows of each image are HF's merged
    tokens of that image, permuted; and encoder statistics of two images of different
    domains and sizes equal counts over each image's own rows."""
    samples = [
        {"question": "what is the color", "image": random_image(30, 50, 3), "domain": "a"},
        {"question": "how many", "image": random_image(60, 20, 4), "domain": "b"},
    ]
    batch = prompt_batch(model, samples)
    tokens = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    names = {module: hooks[-1] for module, hooks in model.neuron_hooks.items() if module != "lm_mlp"}
    _, cache = model.run_with_cache(batch, names_filter=[*names.values(), "vision_projector.hook_out"])
    (visual,) = hf_module_outputs(hf_reference, hf_reference.model.visual, batch)
    for ours, hf in zip(cache["vision_projector.hook_out"].split(tokens), merged_tokens(visual).split(tokens)):
        distance = (ours[:, None] - hf[None]).abs().amax(-1)
        assert (distance.min(-1).values <= 1e-6).all() and distance.argmin(-1).unique().numel() == len(hf)

    stats = collect_neuron_stats(model, samples, batch_size=2, classes=("image", "all"), progress=False)
    for module, name in names.items():
        act = cache[name]
        per_token = act.shape[0] // sum(tokens)
        for domain, rows in enumerate(act.split([n * per_token for n in tokens])):
            assert int(stats.n_tokens(module, "image")[domain]) == rows.shape[0]
            assert torch.equal(stats.over_zero(module, "image")[-1, :, domain], (rows > 0).sum(0))


def test_encoder_neuron_zeroing_matches_hf_hook(model, hf_reference):
    """Zeroing channels of the vision MLP and projector hooks equals HF with those modules'
    outputs zeroed by a plain PyTorch hook."""
    batch, channels = mixed_batch(model), [0, 3, 5]
    visual = hf_reference.model.visual
    hf_modules = {
        "vision_mlp": getattr(visual.blocks[1].mlp, "act_fn", None) or visual.blocks[1].mlp.act,
        "projector": visual.merger.mlp[1],
    }
    for module, hf_module in hf_modules.items():
        handle = hf_module.register_forward_hook(lambda _m, _a, out: out.index_fill(-1, torch.tensor(channels), 0.0))
        try:
            reference = hf_reference(**batch).logits
        finally:
            handle.remove()

        def zero(act, hook):
            act[..., channels] = 0.0
            return act

        ours = model.run_with_hooks(batch, fwd_hooks=[(model.neuron_hooks[module][-1], zero)])
        mask = batch["attention_mask"].bool()
        assert (ours - reference)[mask].abs().max() <= 1e-5, module
        assert (ours - model(batch))[mask].abs().max() > 1e-6, module


def _with(batch: MultimodalBatch, **changes) -> dict:
    inputs = dict(batch.inputs)
    inputs.update(changes)
    return {k: v for k, v in inputs.items() if v is not None}


def test_bad_inputs_fail_clearly(model):
    batch = mixed_batch(model)
    config = model.hf_model.config
    ids, types = batch["input_ids"], batch["mm_token_type_ids"]
    text_only = model.prepare_inputs(["what is the color"], [None])
    with pytest.raises(ValueError, match="no image token"):
        model(_with(text_only, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]))
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model(_with(batch, pixel_values=None, image_grid_thw=None))
    with pytest.raises(ValueError, match="image_grid_thw were given without pixel_values"):
        model(_with(text_only, image_grid_thw=batch["image_grid_thw"]))
    with pytest.raises(ValueError, match=r"image_grid_thw has shape \(2, 3\) but input_ids hold 3 image"):
        model(_with(batch, image_grid_thw=batch["image_grid_thw"][:2]))
    with pytest.raises(ValueError, match="pixel_values has shape .* describe .* patches"):
        model(_with(batch, pixel_values=batch["pixel_values"][:-4]))
    with pytest.raises(ValueError, match="need mm_token_type_ids"):
        model(_with(batch, mm_token_type_ids=None))
    with pytest.raises(ValueError, match="mm_token_type_ids disagree"):
        model(_with(batch, mm_token_type_ids=torch.zeros_like(types)))
    first = int((ids[0] == config.image_token_id).nonzero()[0, 0])
    one_less = ids.clone()
    one_less[0, first] = model.processor.tokenizer.convert_tokens_to_ids("what")
    with pytest.raises(ValueError, match="input_ids hold 64 image tokens but the 3 image"):
        model(_with(batch, input_ids=one_less, mm_token_type_ids=(one_less == config.image_token_id).long()))
    with pytest.raises(ValueError, match="takes no videos"):
        model.prepare_inputs(["what"], [None], videos=[[random_image(24, 40, 0)] * 2])


def test_shared_checks_and_analyses(model, hf_reference):
    batch = mixed_batch(model)
    assert_zeroing_matches_hf_hook(model, hf_reference, batch)
    image = random_image(40, 60, 7)
    clean = model.prepare_inputs(PROMPTS[:2], [image, image])
    corrupted = model.prepare_inputs(PROMPTS[:2], [random_image(40, 60, 8)] * 2)
    assert_analyses_run(model, make_samples(6, VARIED_SIZES), clean, corrupted)
    # resuming at a layer reuses the recorded M-RoPE embeddings: same effects as full forwards
    fast = patch_sweep(model, clean, corrupted, positions="image", per="cell", cell_size=2, progress=False)
    full = patch_sweep(model, clean, corrupted, positions="image", per="cell", cell_size=2, fast=False, progress=False)
    torch.testing.assert_close(fast.effect, full.effect, atol=1e-4, rtol=0)
    assert fast.effect.abs().max() > 1e-3


def test_statistics_of_a_batch_with_an_image_and_a_video_count_each_call(model, hf_reference):
    """The tower runs twice (images, then videos): each call's rows go to their own class,
    and the counts over both equal HF's vision-MLP activations caught by a PyTorch hook."""
    from mm_lens.neurons.statistics import NeuronStatsCollector

    batch = video_batch(model)
    collector = NeuronStatsCollector(model, ["d"], modules=["vision_mlp", "projector"], classes=("image", "video", "all"))
    collector.update(batch, ["d", "d"])
    stats = collector.stats
    visual = hf_reference.model.visual
    activation = getattr(visual.blocks[0].mlp, "act_fn", None) or visual.blocks[0].mlp.act
    image_rows, video_rows = (act.reshape(-1, act.shape[-1]) for act in hf_module_outputs(hf_reference, activation, batch))
    assert int(stats.n_tokens("vision_mlp", "image")) == image_rows.shape[0] == int(batch["image_grid_thw"].prod())
    assert int(stats.n_tokens("vision_mlp", "video")) == video_rows.shape[0] == int(batch["video_grid_thw"].prod())
    assert torch.equal(stats.over_zero("vision_mlp", "video")[0, :, 0], (video_rows > 0).sum(0))
    assert torch.equal(stats.over_zero("vision_mlp", "all")[0, :, 0], (image_rows > 0).sum(0) + (video_rows > 0).sum(0))
    assert int(stats.n_tokens("projector", "all")) == (image_rows.shape[0] + video_rows.shape[0]) // 4
    _, cache = model.run_with_cache(batch, names_filter=model.neuron_hooks["vision_mlp"])
    with pytest.raises(ValueError, match="a cache keeps the last call only"):
        collector.add_cache(cache, batch, ["d", "d"])


def test_generation_equals_hf(model, hf_reference):
    from checks import assert_generation_equals_hf

    assert_generation_equals_hf(model, hf_reference, mixed_batch(model, "left"))
    assert_generation_equals_hf(model, hf_reference, video_batch(model, "left"))
