"""Circuitsvis views that render offline, and per-patch heatmaps placed on the picture."""

from __future__ import annotations

import json
import shutil
import subprocess

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from mm_lens import HookedMLLM
from mm_lens.model.architectures.geometry import cell_extent
from mm_lens.presentation.report import remote_references
from mm_lens.presentation.visualize import (
    CircuitsView,
    attention_view,
    circuitsvis_bundle,
    heatmap_for,
    patch_heatmap,
    token_labels,
    token_logprobs_view,
    top_k_view,
    values_view,
    view_extent,
)


def dark_picture(height: int, width: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black picture with one white box (left, top, right, bottom)."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), box)
    return image


def distance_from_median(model, batch, view: int) -> torch.Tensor:
    """Per position: distance of image 0's layer-0 residual (the projected feature) from the
    median feature of its view; 0 elsewhere."""
    mm = batch.modality_map
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    resid = cache["blocks.0.hook_resid_pre"].float().cpu()
    row, positions = mm.image_positions(0)
    tiles = mm.tile[row, positions]
    keep = positions[(tiles == 0) if view == 0 else (tiles >= 1)]
    features = resid[row, keep]
    values = torch.zeros(mm.shape)
    values[row, keep] = (features - features.median(0).values).norm(dim=-1)
    return values


@pytest.fixture(scope="module")
def two_rows(models):
    """A llava batch of two prompts of different length (left padding) with one image each."""
    model = models["llava"]
    pictures = [dark_picture(28, 28, (14, 7, 21, 14)), dark_picture(28, 28, (0, 0, 7, 7))]
    return model, model.prepare_inputs(["what is this", "what is the color of this picture"], pictures)


# ---- offline circuitsvis ---------------------------------------------------------------


def all_views(model, batch) -> dict[str, CircuitsView]:
    values = torch.arange(batch["input_ids"].numel(), dtype=torch.float32).reshape(batch["input_ids"].shape)
    return {
        "attention": attention_view(model, batch, layer=1, row=0),
        "logprobs": token_logprobs_view(model, batch, row=1, top_k=5),
        "topk": top_k_view(model, batch, ["blocks.0.mlp.hook_act", "blocks.1.mlp.hook_act"], neurons=range(4), k=3),
        "values": values_view(model, batch, values, row=0),
    }


def test_views_contain_no_remote_script(two_rows):
    model, batch = two_rows
    for name, view in all_views(model, batch).items():
        page = view.to_html()
        assert remote_references(page) == [], name
        assert "unpkg" not in page and "<script src" not in page, name
        assert f"CircuitsVis.{view.component}" in page, name
        assert view._repr_html_() == page


def test_view_props_cannot_break_out_of_the_script():
    view = CircuitsView("ColoredTokens", {"tokens": ["</script><script src='https://evil.js'>"], "values": [1.0]})
    page = view.to_html()
    assert remote_references(page) == []
    assert "</script><script src" not in page


def test_attention_view_drops_padding_and_labels_image_patches(two_rows):
    model, batch = two_rows
    view = attention_view(model, batch, layer=0, row=0, heads=[1, 3])
    n_kept = int(batch["attention_mask"][0].sum())
    attention = torch.tensor(view.props["attention"])
    assert attention.shape == (2, n_kept, n_kept)
    assert torch.allclose(attention.sum(-1), torch.ones(2, n_kept), atol=1e-4)
    assert view.props["attentionHeadNames"] == ["L0H1", "L0H3"]
    tokens = view.props["tokens"]
    assert len(tokens) == n_kept and "<pad>" not in tokens
    assert [t for t in tokens if t.startswith("<img")][:6] == [f"<img 0:r0c{c}>" for c in range(4)] + ["<img 0:r1c0>", "<img 0:r1c1>"]


def test_anyres_labels_name_view_and_newlines(models):
    model = models["llava_next"]
    batch = model.prepare_inputs(["what is this"], [dark_picture(28, 56, (0, 0, 7, 7))])
    tokens = token_labels(model, batch)
    assert "<img 0:r3c3>" in tokens and "<img 0:hi r3c7>" in tokens
    assert tokens.count("<img 0:nl>") == 4  # one newline per high-resolution row


def test_logprob_view_ranks_the_true_next_token(two_rows):
    model, batch = two_rows
    view = token_logprobs_view(model, batch, row=1, top_k=5)
    rank, correct = torch.tensor(view.props["correctTokenRank"]), torch.tensor(view.props["correctTokenLogProb"])
    top = torch.tensor(view.props["topKLogProbs"])
    assert len(view.props["prompt"]) == len(rank) + 1
    assert torch.all((rank == 0) == torch.isclose(correct, top[:, 0]))


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_bundle_defines_the_components_as_a_plain_script(two_rows, tmp_path):
    model, batch = two_rows
    components = sorted({view.component for view in all_views(model, batch).values()})
    script = tmp_path / "check.js"
    script.write_text(
        "const vm = require('vm'); const fs = require('fs');\n"
        "const ctx = {console, setTimeout, clearTimeout, navigator: {userAgent: 'node'}};\n"
        "ctx.window = ctx; ctx.self = ctx;\n"
        f"vm.runInNewContext(fs.readFileSync({json.dumps(str(tmp_path / 'bundle.js'))}, 'utf8'), ctx);\n"
        "console.log(JSON.stringify(Object.keys(ctx.CircuitsVis)));\n"
    )
    (tmp_path / "bundle.js").write_text(circuitsvis_bundle())
    exported = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True, timeout=60).stdout)
    assert set(components) | {"render"} <= set(exported)


# ---- patch geometry --------------------------------------------------------------------


def test_llava_grid_covers_the_center_crop(models):
    # 56x112 -> shortest edge 28 gives 28x56 -> centre crop 28x28 keeps resized x 14..42,
    # i.e. original x 28..84 over the full height.
    assert view_extent(models["llava"], (56, 112)) == pytest.approx((28, 84, 56, 0))


def test_llava_next_views_cover_the_squashed_and_unpadded_picture(models):
    model = models["llava_next"]
    # Base view: the picture squashed to 28x28, all of it.
    assert view_extent(model, (34, 60), view=0) == pytest.approx((0, 60, 34, 0))
    # High-res: best pinpoint 56x56; picture resized to 32x56, pasted at y=12; feature rows
    # 7 px; unpadding keeps rows 2..5 of 8, i.e. canvas y 14..42 -> original (y-12)*34/32.
    assert view_extent(model, (34, 60), view=1) == pytest.approx((0, 60, 31.875, 2.125))


@pytest.fixture(scope="module")
def any_model(models, tiny_folder):
    """``any_model(arch)``: the session's LLaVA models, or another tiny architecture loaded once."""
    loaded = dict(models)

    def get(arch: str):
        if arch not in loaded:
            loaded[arch] = HookedMLLM.from_pretrained(tiny_folder(arch))
        return loaded[arch]

    return get


@pytest.mark.parametrize(
    "arch, size, box, view, cell",
    [
        ("llava", (28, 28), (14, 7, 21, 14), 0, (1, 2)),
        ("llava", (56, 112), (30, 16, 40, 26), 0, (1, 0)),  # inside the centre crop
        ("llava_next", (28, 56), (28, 7, 42, 14), 0, (1, 2)),  # base view squashes 2:1
        ("llava_next", (28, 56), (14, 7, 21, 14), 1, (1, 2)),
        ("llava_next", (34, 60), (16, 11, 22, 16), 1, (1, 2)),  # padded and unpadded
        ("llava_onevision", (34, 60), (16, 11, 22, 16), 1, (1, 2)),
        ("qwen2_vl", (32, 48), (8, 16, 16, 24), 0, (2, 1)),  # 8-pixel merged cells, whole picture
        ("idefics3", (40, 40), (10, 20, 20, 30), 0, (1, 0)),  # global view: the squashed picture, 2x2 cells
        ("idefics3", (40, 40), (10, 20, 20, 30), 1, (2, 1)),  # 2x2 crops of 2x2 cells: 4x4 over the picture
    ],
)
def test_heatmap_cell_of_a_distinct_patch_lies_on_that_patch(any_model, arch, size, box, view, cell):
    model = any_model(arch)
    picture = dark_picture(*size, box)
    batch = model.prepare_inputs(["what is this"], [picture])
    values = distance_from_median(model, batch, view)
    grid = batch.modality_map.to_grid(values, 0, view)
    argmax = divmod(int(torch.nan_to_num(grid, nan=-1.0).argmax()), grid.shape[1])
    assert argmax == cell
    extent = view_extent(model, size, view)
    left, right, bottom, top = cell_extent(extent, tuple(grid.shape), *argmax)
    center_x, center_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert left <= center_x < right and top <= center_y < bottom

    fig = heatmap_for(model, batch, values, 0, view, image=picture)
    assert fig.axes[0].images[-1].get_extent() == pytest.approx(list(extent))
    plt.close(fig)


def test_downsized_onevision_grid_covers_the_same_box_as_the_unpadded_grid(any_model):
    model = any_model("llava_onevision")
    batch = model.prepare_inputs(["what"], [dark_picture(40, 40, (0, 0, 7, 7))])
    rows, cols = batch.modality_map.grids[0][1]
    assert (rows, cols) == (5, 5)  # the 8x8 grid of 2x2 tiles, downsized (anyres_max_2)
    assert view_extent(model, (40, 40), view=1) == pytest.approx((0, 40, 40, 0))


def test_onevision_image_sharing_its_prompt_is_padded_to_a_square(any_model):
    model = any_model("llava_onevision")
    tall, square = dark_picture(60, 20, (0, 0, 5, 5)), dark_picture(28, 28, (0, 0, 5, 5))
    batch = model.prepare_inputs(["how many"], [[tall, square]])
    assert batch.modality_map.grids[0] == ((4, 4),)  # the base view alone
    fig = heatmap_for(model, batch, torch.zeros(batch["input_ids"].shape), 0, image=tall)
    # 60x20 padded to 60x60 with 20 columns each side: the grid spans x -20..40
    assert fig.axes[0].images[-1].get_extent() == pytest.approx([-20, 40, 60, 0])
    plt.close(fig)


def test_items_without_a_patch_grid_have_no_heatmap(any_model):
    model = any_model("instructblip")
    with pytest.raises(ValueError, match="no patch grid"):
        view_extent(model, (28, 28))


def test_heatmap_for_rejects_a_different_picture(models):
    model = models["llava_next"]
    batch = model.prepare_inputs(["what is this"], [dark_picture(28, 56, (0, 0, 7, 7))])
    values = torch.zeros(batch["input_ids"].shape)
    with pytest.raises(ValueError, match="pass the picture the batch was built from"):
        heatmap_for(model, batch, values, 0, 1, image=dark_picture(40, 40, (0, 0, 7, 7)))


def test_patch_heatmap_leaves_missing_cells_transparent():
    grid = torch.tensor([[1.0, float("nan")], [0.0, 2.0]])
    fig = patch_heatmap(dark_picture(20, 20, (0, 0, 5, 5)), grid, title="t")
    overlay = fig.axes[0].images[-1].get_array()
    assert overlay.mask.tolist() == [[False, True], [False, False]]
    assert fig.axes[0].images[-1].get_extent() == [0, 20, 20, 0]
    plt.close(fig)


def test_patching_pictures_show_both_pictures_and_the_effect_beside_them(models, images):
    from mm_lens.analysis.patching import patch_sweep
    from mm_lens.presentation.visualize import patching_pictures

    model = models["llava"]
    corrupted_picture = images[2].resize(images[0].size)
    clean = model.prepare_inputs(["what is the color"], [images[0]])
    corrupted = model.prepare_inputs(["what is the color"], [corrupted_picture])
    result = patch_sweep(model, clean, corrupted, layers=[0], per="cell", metric="kl", progress=False)
    values = result.position_values(0, clean.modality_map.shape)
    figure = patching_pictures(model, clean, values, images[0], corrupted_picture)
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels[:2]] == ["clean picture", "corrupted picture"]
    shown = [np.asarray(ax.images[0].get_array()) for ax in panels[:2]]
    assert np.array_equal(shown[0], np.asarray(images[0].convert("RGB")))
    assert np.array_equal(shown[1], np.asarray(corrupted_picture.convert("RGB")))
    effect = panels[2]
    assert len(effect.images) == 1  # the grid alone: no picture under it
    grid = np.ma.filled(effect.images[0].get_array(), np.nan)
    expected = clean.modality_map.to_grid(values, 0, 0).numpy()
    assert np.allclose(grid, expected, equal_nan=True)
    low, high = effect.images[0].get_clim()
    assert low == -high and high >= np.nanmax(np.abs(expected)) > 0
