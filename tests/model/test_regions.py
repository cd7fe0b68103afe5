"""Regions -> positions: a bright box drawn into a picture is found by the positions whose
features differ from a blank picture's, on every architecture with spatial image tokens;
the fractions are the shares of the pixels the tower sees; boxes and masks; the threshold;
the errors; the analyses that take the mask as ``positions=``.

"Local" features are read with the vision tower's attention switched off (its output
zeroed in every layer): each patch's features then depend on its own pixels only, so a
position changes exactly when the processor's resampling of the picture changes its pixels,
that is, when its patch overlaps the box or lies within the resampling kernel of its border
(``BLEED`` pixels of the original picture).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from PIL import Image, ImageDraw
from transformers.vision_utils import get_vision_window_index

from mm_lens import HookedMLLM
from mm_lens.analysis.attention import knockout_effect
from mm_lens.analysis.lens import logit_lens
from mm_lens.analysis.patching import patch_sweep
from mm_lens.base.modality import position_mask
from mm_lens.model.inputs import MultimodalBatch
from mm_lens.model.regions import Grid, RegionPositions, cell_fractions, region_positions

SPATIAL = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3")
# pictures of different sizes and aspect ratios: 0 and 1 alone in their prompts, 2 and 3 sharing one
SIZES = ((40, 60), (60, 20), (30, 50), (44, 44))
PROMPTS = ("what is the color", "how many", "describe the picture")
BLEED = 4  # pixels of the original picture the processors' resampling spreads an edge (Idefics3's Lanczos the most)
# LLaVA-OneVision downsizes a large high-resolution grid bilinearly: each of its cells takes a
# small share (here below 1e-3 of the largest change) of the neighbours of the patches it covers
SPILL = 1e-3
GREY, WHITE = (90, 90, 90), (255, 255, 255)
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 20}


@pytest.fixture(scope="module", params=SPATIAL)
def spatial_model(request, tiny_folder) -> HookedMLLM:
    return HookedMLLM.from_pretrained(tiny_folder(request.param))


@pytest.fixture(scope="module")
def llava_next(tiny_folder) -> HookedMLLM:
    return HookedMLLM.from_pretrained(tiny_folder("llava_next"))


@pytest.fixture(scope="module")
def gemma3(tiny_folder) -> HookedMLLM:
    return HookedMLLM.from_pretrained(tiny_folder("gemma3"))


def box_in(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box over about a quarter of a picture, off its centre."""
    height, width = size
    return (round(0.2 * width), round(0.2 * height), round(0.48 * width), round(0.48 * height))


def grown(box: tuple[int, int, int, int], by: int) -> tuple[int, int, int, int]:
    return (box[0] - by, box[1] - by, box[2] + by, box[3] + by)


def painted(size: tuple[int, int], region=None) -> Image.Image:
    """A grey picture with ``region`` (a box or a bool mask) white."""
    height, width = size
    picture = Image.new("RGB", (width, height), GREY)
    if isinstance(region, torch.Tensor):
        picture.paste(WHITE, mask=Image.fromarray(region.numpy().astype("uint8") * 255))
    elif region is not None:
        ImageDraw.Draw(picture).rectangle([region[0], region[1], region[2] - 1, region[3] - 1], fill=WHITE)
    return picture


def batch_of(model: HookedMLLM, pictures: list[Image.Image]) -> MultimodalBatch:
    """Pictures 0 and 1 alone in their prompts, 2 and 3 sharing the third."""
    return model.prepare_inputs(list(PROMPTS), [pictures[0], pictures[1], pictures[2:]])


def features(model: HookedMLLM, batch: MultimodalBatch, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The language model's input embeddings ``[batch, pos, d]`` and the vision encoder's
    first-layer input ``[unit, row, d]`` (packed towers split into units), with the vision
    attention switched off when ``local``."""
    names = model.hook_dict
    attention = [n for n in names if re.fullmatch(r"vision_encoder\.(encoder_layers|blocks)\.\d+\.attn\.hook_out", n)]
    first = next(n for n in names if re.fullmatch(r"vision_encoder\.(encoder_layers|blocks)\.0\.hook_in", n))
    off = [(n, lambda act, hook: torch.zeros_like(act)) for n in attention] if local else []
    with model.hooks(fwd_hooks=off):
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n in ("hook_embed", first))
    return cache["hook_embed"], cache[first]


def change(model: HookedMLLM, marked: MultimodalBatch, blank: MultimodalBatch, units: int, local: bool = True):
    """Per position and per encoder row: how far the marked picture's features are from the blank one's."""
    (lm_marked, enc_marked), (lm_blank, enc_blank) = features(model, marked, local), features(model, blank, local)
    encoder = (enc_marked - enc_blank).norm(dim=-1)
    return (lm_marked - lm_blank).norm(dim=-1), encoder.reshape(units, -1)[:units]


def assert_found(found: RegionPositions, near: RegionPositions, lm_change: torch.Tensor, encoder_change: torch.Tensor) -> None:
    """The strongest changes lie in the region's positions, every position it covers well
    changed, and nothing beyond the region grown by the resampling's reach changed by more
    than ``SPILL`` of the largest change."""
    cells = found.modality_map.mask("image") & (found.modality_map.row >= 0)
    for fraction, counted, nearby, moved in (
        (found.fraction[cells], found.mask[cells], near.mask[cells], lm_change[cells]),
        (found.encoder_fraction.flatten(), found.encoder_mask.flatten(), near.encoder_mask.flatten(), encoder_change.flatten()),
    ):
        k = max(1, int((fraction >= 0.5).sum()))
        assert counted[moved.topk(k).indices].all()
        assert (moved[fraction >= 0.2] > 0).all()
        assert not (moved > SPILL * moved.max())[~nearby].any()


def disk_in(size: tuple[int, int]) -> torch.Tensor:
    """A bool mask of a disk off a picture's centre."""
    height, width = size
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return (y - 0.6 * height) ** 2 + (x - 0.6 * width) ** 2 <= (0.22 * min(height, width)) ** 2


def encoder_layout(found: RegionPositions) -> tuple[int, int]:
    """(rows before the patches, patches per side) of each encoder unit."""
    rows = found.encoder_fraction.shape[1]
    cls = rows - math.isqrt(rows) ** 2
    return cls, math.isqrt(rows - cls)


def patch_shares(model: HookedMLLM, pictures: list[Image.Image], found: RegionPositions, build=batch_of) -> torch.Tensor:
    """Per encoder row, the share of its patch the vision tower sees white, from the tower's
    input pixels (``vision_encoder.hook_in``): (marked - grey) / (white - grey), patch means;
    0 where the patch shows no picture, NaN at rows without a patch. Resampling keeps a
    patch's mean close to the area share of what it covers. ``build(model, pictures)``
    makes the batch."""
    cls, side = encoder_layout(found)

    def means(batch_pictures: list[Image.Image]) -> torch.Tensor:
        batch = build(model, batch_pictures)
        _, cache = model.run_with_cache(batch, names_filter="vision_encoder.hook_in")
        pixels = cache["vision_encoder.hook_in"]
        if pixels.ndim == 2:  # a packed tower: one row per patch, four per merged token
            return pixels.mean(-1).reshape(-1, side * side)
        units, channels, size, _ = pixels.shape
        blocks = pixels.reshape(units, channels, side, size // side, side, size // side).mean((1, 3, 5)).reshape(units, -1)
        return torch.cat([torch.full((units, cls), float("nan")), blocks], dim=1)

    marked, grey = means(pictures), means([painted((p.size[1], p.size[0])) for p in pictures])
    white = means([Image.new("RGB", p.size, WHITE) for p in pictures])
    span = white - grey
    shares = torch.where(span.abs() > 1e-3 * span.abs().nan_to_num().max(), (marked - grey) / span, 0.0)
    order = window_order(model, found)
    return shares if order is None else shares[order]


def window_order(model: HookedMLLM, found: RegionPositions) -> torch.Tensor | None:
    """Qwen2.5-VL: the merged token each unit of its vision blocks holds (HF's window order)."""
    if model.spec.hf_class != "Qwen2_5_VLForConditionalGeneration":
        return None
    vision = model.hf_model.config.vision_config
    merge = vision.spatial_merge_size
    grids = torch.tensor([[1, *grid[0]] for grid in found.modality_map.grids]) * torch.tensor([1, merge, merge])
    return get_vision_window_index(grids, merge, vision.window_size, vision.patch_size)[0]


def test_bright_box_is_found_by_the_positions_it_covers(spatial_model):
    boxes = [box_in(size) for size in SIZES]
    pictures = [painted(size, box) for size, box in zip(SIZES, boxes)]
    marked, blank = batch_of(spatial_model, pictures), batch_of(spatial_model, [painted(size) for size in SIZES])
    found = region_positions(spatial_model, marked, boxes, images=pictures)
    near = region_positions(spatial_model, marked, [grown(box, BLEED) for box in boxes], images=pictures)
    assert_found(found, near, *change(spatial_model, marked, blank, found.encoder_fraction.shape[0]))
    assert found.mask.any() and (found.mask <= marked.modality_map.mask("image")).all()
    for item, picture in enumerate(found.item_picture.tolist()):  # every picture's box lands in its own item
        assert picture == item
        assert found.encoder_rows(item).numel() and (found.unit_image[found.encoder_rows(item)[:, 0]] == item).all()


def test_bright_box_changes_most_at_its_positions_with_attention_on(spatial_model):
    if spatial_model.spec.hf_class == "Gemma3ForConditionalGeneration":
        # its tiny tower pools 16 patches into 4 tokens after two random SigLIP layers that
        # spread the box over every token almost evenly (each changes 8.7 to 10.0): ranks
        # there say nothing; the local test above places its tokens
        pytest.skip("the tiny Gemma 3 tower mixes its 4 tokens evenly")
    boxes = [box_in(size) for size in SIZES]
    pictures = [painted(size, box) for size, box in zip(SIZES, boxes)]
    marked, blank = batch_of(spatial_model, pictures), batch_of(spatial_model, [painted(size) for size in SIZES])
    found = region_positions(spatial_model, marked, boxes, images=pictures)
    lm_change, _ = change(spatial_model, marked, blank, found.encoder_fraction.shape[0], local=False)
    cells = marked.modality_map.mask("image") & (marked.modality_map.row >= 0)
    k = max(1, int((found.fraction >= 0.5).sum()))
    assert found.mask[cells][lm_change[cells].topk(k).indices].all()


def test_bright_disk_is_found_by_its_mask(spatial_model):
    masks = [disk_in(size) for size in SIZES]
    pictures = [painted(size, mask) for size, mask in zip(SIZES, masks)]
    marked, blank = batch_of(spatial_model, pictures), batch_of(spatial_model, [painted(size) for size in SIZES])
    found = region_positions(spatial_model, marked, masks)  # the masks give the pictures' sizes
    dilated = [torch.nn.functional.max_pool2d(m[None].float(), 2 * BLEED + 1, 1, BLEED)[0].bool() for m in masks]
    near = region_positions(spatial_model, marked, dilated)
    assert_found(found, near, *change(spatial_model, marked, blank, found.encoder_fraction.shape[0]))


@pytest.mark.parametrize("shape", ["box", "disk"])
def test_encoder_fractions_are_the_shares_of_the_pixels_the_tower_sees(spatial_model, shape):
    regions = [box_in(size) if shape == "box" else disk_in(size) for size in SIZES]
    pictures = [painted(size, region) for size, region in zip(SIZES, regions)]
    found = region_positions(spatial_model, batch_of(spatial_model, pictures), regions, images=pictures)
    shares = patch_shares(spatial_model, pictures, found)
    has_patch = ~torch.isnan(shares)
    assert (found.encoder_fraction - shares)[has_patch].abs().max() < 0.05  # resampling blurs edges a little
    assert not found.encoder_fraction[~has_patch].any()


def test_language_model_fractions_are_the_fractions_of_their_patches(spatial_model):
    """Each image token is made of whole patches (one, or a merged/pooled/shuffled square of
    them): its fraction is their mean, though the two are computed from different grids
    (LLaVA-NeXT: the unpadded high-resolution grid versus the tiles). Tokens that interpolate
    patches (LLaVA-OneVision's downsized grid, feature -1) are left out."""
    boxes = [box_in(size) for size in SIZES]
    pictures = [painted(size) for size in SIZES]
    batch = batch_of(spatial_model, pictures)
    found = region_positions(spatial_model, batch, boxes, images=pictures)
    order = window_order(spatial_model, found)
    encoder = found.encoder_fraction if order is None else found.encoder_fraction[torch.argsort(order)]
    unit_image = found.unit_image if order is None else found.unit_image[torch.argsort(order)]
    cls, side = encoder_layout(found)
    mm, checked = found.modality_map, 0
    for b, p in torch.nonzero(mm.mask("image") & (mm.feature >= 0) & (mm.row >= 0)).tolist():
        item = int(mm.image[b, p])
        first = int(mm.feature[(mm.image == item) & (mm.feature >= 0)].min())  # features count over the batch
        tokens_side = 1 if "image_grid_thw" in batch else mm.grids[item][0][0]  # Qwen: one token per unit
        unit, token = divmod(int(mm.feature[b, p]) - first, tokens_side**2)
        (row, col), scale = divmod(token, tokens_side), side // tokens_side
        patches = [cls + (row * scale + dr) * side + col * scale + dc for dr in range(scale) for dc in range(scale)]
        expected = encoder[torch.nonzero(unit_image == item).flatten()[unit], patches].mean()
        assert abs(float(found.fraction[b, p]) - float(expected)) < 1e-5
        checked += 1
    assert checked >= 16


def pan_and_scan_batch(model: HookedMLLM, pictures: list[Image.Image]) -> MultimodalBatch:
    """Gemma 3 with pan-and-scan on: picture 0 alone, pictures 1 and 2 sharing a prompt."""
    processor = model.processor
    texts = [
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": "what"}]}], add_generation_prompt=True)
        for n in (1, len(pictures) - 1)
    ]
    inputs = dict(processor(text=texts, images=[pictures[:1], pictures[1:]], **PAN_AND_SCAN, return_tensors="pt", padding=True))
    return MultimodalBatch(inputs, model.modality_map(inputs))


def test_pan_and_scan_crops_find_the_box(gemma3):
    sizes = ((30, 90), (40, 40), (80, 30))  # 3 crops, none (square), 3 crops
    boxes = [box_in(size) for size in sizes]
    pictures = [painted(size, box) for size, box in zip(sizes, boxes)]
    marked, blank = pan_and_scan_batch(gemma3, pictures), pan_and_scan_batch(gemma3, [painted(size) for size in sizes])
    assert marked.modality_map.n_images == 9
    found = region_positions(gemma3, marked, boxes, images=pictures, processor_kwargs=PAN_AND_SCAN)
    near = region_positions(gemma3, marked, [grown(box, BLEED) for box in boxes], images=pictures, processor_kwargs=PAN_AND_SCAN)
    assert found.item_picture.tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2]
    assert_found(found, near, *change(gemma3, marked, blank, 9))
    # the wide picture's box (x 18..43 of 90) lies in its whole view and its first two crops only
    assert [bool(found.encoder_mask[unit].any()) for unit in range(4)] == [True, True, True, False]
    shares = patch_shares(gemma3, pictures, found, build=pan_and_scan_batch)
    assert (found.encoder_fraction - shares).abs().max() < 0.05


def test_a_mask_of_a_box_gives_the_box_fractions(llava_next):
    pictures = [painted(size) for size in SIZES]
    batch = batch_of(llava_next, pictures)
    boxes = [box_in(size) for size in SIZES]
    masks = []
    for (height, width), (left, top, right, bottom) in zip(SIZES, boxes):
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[top:bottom, left:right] = True
        masks.append(mask)
    by_box, by_mask = region_positions(llava_next, batch, boxes), region_positions(llava_next, batch, masks)
    assert torch.allclose(by_box.fraction, by_mask.fraction, atol=1e-6)
    assert torch.allclose(by_box.encoder_fraction, by_mask.encoder_fraction, atol=1e-6)
    assert torch.equal(by_box.mask, by_mask.mask)


def test_fractions_add_up_over_disjoint_parts_of_a_region(llava_next):
    batch = llava_next.prepare_inputs([PROMPTS[0]], [painted(SIZES[0])])
    upper, lower = torch.zeros(SIZES[0], dtype=torch.bool), torch.zeros(SIZES[0], dtype=torch.bool)
    upper[5:20, 10:50] = True
    lower[20:33, 10:25] = True  # an L-shape in two parts
    whole, *parts = (region_positions(llava_next, batch, region) for region in (upper | lower, upper, lower))
    assert torch.allclose(whole.fraction, parts[0].fraction + parts[1].fraction, atol=1e-6)
    assert torch.allclose(whole.encoder_fraction, parts[0].encoder_fraction + parts[1].encoder_fraction, atol=1e-6)
    assert torch.equal(whole.mask, parts[0].mask | parts[1].mask)


def test_cell_fractions_match_counting_subpixels():
    """Cells and box edges on a 1/8-pixel lattice: counting subpixels is exact."""
    height, width, fine = 13, 17, 8
    mask = torch.rand(height, width, generator=torch.Generator().manual_seed(0)) > 0.6
    grid = Grid((-2.5, 18.0, 13.5, 1.5), (3, 4))  # reaches past the picture on three sides
    box = (3.25, 2.5, 11.75, 9.0)
    y, x = torch.meshgrid((torch.arange(height * fine) + 0.5) / fine, (torch.arange(width * fine) + 0.5) / fine, indexing="ij")
    left, right, bottom, top = grid.extent
    cell_row, cell_col = ((y - top) / ((bottom - top) / 3)).floor(), ((x - left) / ((right - left) / 4)).floor()
    in_box = (x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])
    for region, covered in ((mask, mask[y.long(), x.long()]), (box, in_box)):
        expected = torch.zeros(3, 4, dtype=torch.float64)
        for r in range(3):
            for c in range(4):
                here = (cell_row == r) & (cell_col == c)
                expected[r, c] = (here & covered).sum() / here.sum() if here.any() else 0.0
        assert torch.allclose(cell_fractions(region, (height, width), grid), expected, atol=1e-9)


def test_the_whole_picture_covers_every_cell_that_shows_it(spatial_model):
    pictures = [painted(size) for size in SIZES]
    batch = batch_of(spatial_model, pictures)
    found = region_positions(spatial_model, batch, [(0, 0, w, h) for h, w in SIZES], images=pictures)
    cells = batch.modality_map.mask("image") & (batch.modality_map.row >= 0)
    assert torch.equal(found.fraction[found.mask], torch.ones(int(found.mask.sum())))
    assert (found.mask <= cells).all() and not found.fraction[~cells].any()
    left, top, right, bottom = found.cells.unbind(-1)
    heights, widths = (torch.tensor([SIZES[p][i] for p in found.item_picture.tolist()]) for i in (0, 1))
    at = torch.where(cells, batch.modality_map.image, 0)
    shows = (right > 0) & (bottom > 0) & (left < widths[at]) & (top < heights[at]) & cells
    assert torch.equal(found.mask, shows)  # padding-only cells (LLaVA-OneVision's square) do not count


def test_min_overlap_keeps_the_patches_covered_enough(llava_next):
    pictures = [painted(size) for size in SIZES]
    batch = batch_of(llava_next, pictures)
    boxes = [box_in(size) for size in SIZES]
    any_overlap = region_positions(llava_next, batch, boxes)
    half, whole = any_overlap.with_min_overlap(0.5), region_positions(llava_next, batch, boxes, min_overlap=1.0)
    assert whole.mask.any() and (whole.mask <= half.mask).all() and (half.mask <= any_overlap.mask).all()
    assert torch.equal(half.mask, any_overlap.fraction >= 0.5)
    assert torch.equal(whole.fraction[whole.mask], torch.ones(int(whole.mask.sum())))
    for row in range(batch.modality_map.shape[0]):
        assert torch.equal(half.positions(row), torch.nonzero(half.mask[row]).flatten())
    assert len(half.table().splitlines()) == 1 + int(half.mask.sum())


def test_one_box_serves_every_picture(llava_next):
    pictures = [painted(size) for size in SIZES]
    batch = batch_of(llava_next, pictures)
    one = region_positions(llava_next, batch, (5, 5, 15, 15))
    each = region_positions(llava_next, batch, [(5, 5, 15, 15)] * len(SIZES))
    assert torch.equal(one.fraction, each.fraction)


def test_region_masks_select_positions_in_the_analyses(llava_next):
    pictures = [painted(size, box_in(size)) for size in SIZES]
    batch = batch_of(llava_next, pictures)
    found = region_positions(llava_next, batch, [box_in(size) for size in SIZES], min_overlap=0.5)
    assert torch.equal(position_mask(batch.modality_map, found.mask), found.mask)
    lens = logit_lens(llava_next, batch, positions=found.mask, layers=[0], k=2)
    assert torch.equal(torch.stack([lens.rows, lens.positions], dim=-1), torch.nonzero(found.mask))

    one = llava_next.prepare_inputs([PROMPTS[0]], [pictures[0]])
    other = llava_next.prepare_inputs([PROMPTS[0]], [painted(SIZES[0])])
    region = region_positions(llava_next, one, box_in(SIZES[0]), images=[pictures[0]], min_overlap=0.5)
    result = patch_sweep(llava_next, one, other, positions=region.mask, layers=[0], progress=False)
    assert [unit.positions.tolist() for unit in result.units] == [[p] for p in region.positions(0).tolist()]

    cut = knockout_effect(llava_next, one, metric=lambda logits: logits[:, -1].logsumexp(-1), keys=region.mask, per_layer=False)
    assert not torch.isclose(cut.knocked, cut.clean)  # the last position no longer reads the box


def test_plot_draws_one_panel_per_view(llava_next):
    pictures = [painted(size, box_in(size)) for size in SIZES]
    batch = batch_of(llava_next, pictures)
    found = region_positions(llava_next, batch, [box_in(size) for size in SIZES])
    figure = found.plot(0, pictures[0])
    assert len([ax for ax in figure.axes if ax.get_visible()]) == 2  # base view and high-resolution grid
    with pytest.raises(ValueError, match="the image given is"):
        found.plot(0, pictures[1])


# ---- clear errors ------------------------------------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("instructblip", "no spatial positions: they are learned queries"),
    ("qwen2_audio", "audio clips, not pictures"),
])
def test_models_without_spatial_image_tokens_are_refused(tiny_folder, name, message):
    model = HookedMLLM.from_pretrained(tiny_folder(name))
    with pytest.raises(ValueError, match=message):
        region_positions(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, (0, 0, 5, 5))


def test_boxes_need_the_pictures_sizes_unless_the_batch_records_them(spatial_model):
    pictures = [painted(size) for size in SIZES]
    batch = batch_of(spatial_model, pictures)
    if "image_sizes" in batch:  # LLaVA-NeXT, LLaVA-OneVision
        by_record = region_positions(spatial_model, batch, (0, 0, 5, 5))
        assert torch.equal(by_record.fraction, region_positions(spatial_model, batch, (0, 0, 5, 5), images=pictures).fraction)
        return
    with pytest.raises(ValueError, match="pass the pictures .* as images="):
        region_positions(spatial_model, batch, (0, 0, 5, 5))


@pytest.mark.parametrize("regions, kwargs, message", [
    ([(0, 0, 5, 5)] * 3, {}, "3 regions for 4 pictures"),
    ((30, 0, 20, 5), {}, "is empty"),
    ((100, 100, 120, 120), {}, "lies outside picture 0"),
    (torch.zeros(40, 60, dtype=torch.bool), {"images": list(SIZES)}, "selects no pixel"),
    (torch.ones(40, 61, dtype=torch.bool), {"images": list(SIZES)}, r"is \(40, 61\) but the picture is \(40, 60\)"),
    (torch.ones(40, 60), {"images": list(SIZES)}, "pass a 2-d bool tensor"),
    ((0, 0, 5, 5), {"images": list(reversed(SIZES))}, "pass the pictures the batch was built from"),
    ((0, 0, 5, 5), {"images": list(SIZES[:3])}, "holds 4 pictures but 3 were described"),
    ((0, 0, 5, 5), {"min_overlap": 1.5}, r"min_overlap must be in \[0, 1\]"),
    ([(0, 0, 5)] * 4, {}, "give a box"),
    ([], {}, "no region given"),
])
def test_bad_regions_are_refused_with_what_to_do(llava_next, regions, kwargs, message):
    batch = batch_of(llava_next, [painted(size) for size in SIZES])
    with pytest.raises(ValueError, match=message):
        region_positions(llava_next, batch, regions, **kwargs)


def test_qwen_pictures_of_other_sizes_are_refused(tiny_folder):
    model = HookedMLLM.from_pretrained(tiny_folder("qwen2_vl"))
    batch = batch_of(model, [painted(size) for size in SIZES])
    with pytest.raises(ValueError, match="pass the pictures the batch was built from"):
        region_positions(model, batch, (0, 0, 5, 5), images=[(60, 40), (60, 20), (30, 50), (44, 44)])


def test_pan_and_scan_needs_the_settings_the_batch_was_built_with(gemma3):
    batch = pan_and_scan_batch(gemma3, [painted((30, 90)), painted((40, 40))])
    with pytest.raises(ValueError, match="5 images for 2 pictures, but pan-and-scan off gives 2; pass .* processor_kwargs="):
        region_positions(gemma3, batch, (0, 0, 5, 5), images=[(30, 90), (40, 40)])
