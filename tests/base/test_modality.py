"""ModalityMap agrees with where the HF model actually places image features."""

from __future__ import annotations

import pytest
import torch

from mm_lens.base.modality import ImageLayout, build_modality_map, modality_code

CASES = {
    "single_image": (["what is the color"], lambda im: [im[0]]),
    "several_images_per_prompt": (["how many", "what"], lambda im: [[im[0], im[1]], im[2]]),
    "sizes_differ_and_text_only_row": (["what is the color", "describe", "how many"], lambda im: [im[1], None, [im[2], im[0]]]),
}


def _embeddings_and_projection(model, batch):
    _, cache = model.run_with_cache(batch, names_filter=["blocks.0.hook_resid_pre", "vision_projector.hook_out"])
    projection = cache["vision_projector.hook_out"].flatten(0, 1)
    return cache["blocks.0.hook_resid_pre"], projection


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_image_positions_hold_projector_output_row_by_row(model, images, case, padding_side):
    prompts, pick = CASES[case]
    batch = model.prepare_inputs(prompts, pick(images), padding_side=padding_side)
    mm = batch.modality_map
    embeddings, projection = _embeddings_and_projection(model, batch)
    features = mm.feature >= 0
    assert torch.equal(embeddings[features], projection[mm.feature[features]])
    # every projector row lands somewhere exactly once, except unpadded-away anyres rows
    used = mm.feature[features]
    assert used.unique().numel() == used.numel()
    assert (mm.mask("image") == (features | mm.newline)).all()


def test_newline_positions_hold_image_newline(models, images):
    model = models["llava_next"]
    batch = model.prepare_inputs(["what", "how many"], [images[0], images[1]])
    mm = batch.modality_map
    embeddings, _ = _embeddings_and_projection(model, batch)
    newline = model.hf_model.model.image_newline
    assert mm.newline.any()
    assert torch.equal(embeddings[mm.newline], newline.expand(int(mm.newline.sum()), -1))
    for image in range(mm.n_images):
        row, positions = mm.image_positions(image)
        rows_in_hires = mm.grids[image][1][0]
        assert int(mm.newline[row, positions].sum()) == rows_in_hires


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_special_text_and_last_token(model, images, padding_side):
    batch = model.prepare_inputs(["what is the color of the shape", "how many"], [images[0], images[1]], padding_side=padding_side)
    mm, mask = batch.modality_map, batch["attention_mask"]
    assert (mm.mask("padding") == (mask == 0)).all()
    bos = model.processor.tokenizer.bos_token_id
    assert (mm.mask("special") == ((batch["input_ids"] == bos) & (mask == 1))).all()
    for b in range(mask.shape[0]):
        assert int(mm.last[b]) == int(torch.nonzero(mask[b]).max())
    assert mm.last_mask().sum() == mask.shape[0]
    text_ids = batch["input_ids"][mm.mask("text")]
    assert not torch.isin(text_ids, torch.tensor([bos, model.hf_model.config.image_token_id])).any()


def test_image_index_follows_prompt_order(model, images):
    batch = model.prepare_inputs(["how many", "what"], [[images[0], images[1]], images[2]])
    mm = batch.modality_map
    assert mm.image_row.tolist() == [0, 0, 1]
    row0 = mm.image[0][mm.image[0] >= 0]
    assert row0.unique_consecutive().tolist() == [0, 1]


def test_to_grid_places_each_value_on_its_patch(model, images):
    batch = model.prepare_inputs(["what"], [images[0]])
    mm = batch.modality_map
    coded = (mm.row * 100 + mm.col).float()
    grid = mm.to_grid(coded, image=0, view=0)
    rows, cols = mm.grids[0][0]
    expected = (torch.arange(rows)[:, None] * 100 + torch.arange(cols)[None, :]).float()
    assert torch.equal(grid, expected)


def test_to_grid_rejects_wrong_shape_and_missing_view(model, images):
    mm = model.prepare_inputs(["what"], [images[0]]).modality_map
    with pytest.raises(ValueError, match="one value per position"):
        mm.to_grid(torch.zeros(3), image=0)
    with pytest.raises(ValueError, match="view 5 does not exist"):
        mm.to_grid(torch.zeros(mm.shape), image=0, view=5)


def test_mask_rejects_unknown_modality(model, images):
    mm = model.prepare_inputs(["what"], [images[0]]).modality_map
    with pytest.raises(ValueError, match="unknown modality 'pixels'"):
        mm.mask("pixels")


def _layout(n: int, modality: str = "image", units: int = 1) -> ImageLayout:
    return ImageLayout(
        tile=torch.zeros(n, dtype=torch.long),
        row=torch.arange(n),
        col=torch.zeros(n, dtype=torch.long),
        feature=torch.arange(n),
        newline=torch.zeros(n, dtype=torch.bool),
        grids=((n, 1),),
        n_features=n,
        n_tiles=units,
        modality=modality,
    )


def test_build_rejects_token_count_that_does_not_match_images():
    ids = torch.tensor([[1, 9, 9, 9, 5]])
    with pytest.raises(ValueError, match="hold 3 image tokens but the 1 image"):
        build_modality_map(ids, None, token_ids={"image": 9}, special_token_ids=[1], layouts=[_layout(2)])


def test_build_rejects_image_spanning_rows():
    ids = torch.tensor([[1, 9, 9], [1, 9, 9]])
    with pytest.raises(ValueError, match="span several batch rows"):
        build_modality_map(ids, None, token_ids={"image": 9}, special_token_ids=[1], layouts=[_layout(3), _layout(1)])


def test_build_assigns_codes_and_offsets_features():
    ids = torch.tensor([[0, 1, 9, 9, 5], [1, 9, 9, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    mm = build_modality_map(ids, mask, token_ids={"image": 9}, special_token_ids=[0, 1], layouts=[_layout(2), _layout(2)])
    assert mm.modality[0].tolist() == [modality_code(m) for m in ("padding", "special", "image", "image", "text")]
    assert mm.feature[1].tolist() == [-1, 2, 3, -1, -1]
    assert mm.last.tolist() == [4, 4]


def test_build_places_each_modality_in_its_own_order_with_its_own_feature_offsets():
    # images are scattered first, then audio: item indices follow the layouts' order, not the prompt's
    ids = torch.tensor([[1, 8, 8, 9, 9, 9], [1, 9, 9, 8, 5, 5]])
    layouts = [_layout(3, units=3), _layout(2, units=2), _layout(2, "audio"), _layout(1, "audio")]
    mm = build_modality_map(ids, None, token_ids={"image": 9, "audio": 8}, special_token_ids=[1], layouts=layouts)
    assert mm.image.tolist() == [[-1, 2, 2, 0, 0, 0], [-1, 1, 1, 3, -1, -1]]
    assert mm.feature.tolist() == [[-1, 0, 1, 0, 1, 2], [-1, 3, 4, 2, -1, -1]]
    assert mm.item_modality == ("image", "image", "audio", "audio")
    assert mm.mask("audio").tolist() == [[False, True, True, False, False, False], [False, False, False, True, False, False]]
    assert mm.items("audio").tolist() == [2, 3]
    assert mm.tile_rows("image").tolist() == [0, 0, 0, 1, 1]
    assert mm.tile_rows("audio").tolist() == [0, 1]


def test_build_rejects_layouts_of_a_modality_without_token():
    with pytest.raises(ValueError, match="no placeholder token"):
        build_modality_map(torch.tensor([[1, 9]]), None, token_ids={"image": 9}, special_token_ids=[1], layouts=[_layout(1, "audio")])


def test_tile_rows_follow_vision_hook_leading_axis(model, images):
    batch = model.prepare_inputs(["how many", "what"], [[images[0], images[1]], images[2]])
    mm = batch.modality_map
    _, cache = model.run_with_cache(batch, names_filter="vision_projector.hook_out")
    tiles = cache["vision_projector.hook_out"].shape[0]
    assert mm.tile_rows().shape[0] == tiles
    expected_first = torch.repeat_interleave(torch.tensor([0, 0, 1]), mm.image_tiles)
    assert torch.equal(mm.tile_rows(), expected_first)
    features_per_tile = cache["vision_projector.hook_out"].shape[1]
    assert int(mm.feature.max()) < tiles * features_per_tile


def test_all_padding_row_has_no_last_position():
    ids = torch.tensor([[1, 5, 6], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    mm = build_modality_map(ids, mask, token_ids={"image": 9}, special_token_ids=[0, 1], layouts=[])
    assert mm.last.tolist() == [2, -1]
    assert mm.last_mask().tolist() == [[False, False, True], [False, False, False]]
