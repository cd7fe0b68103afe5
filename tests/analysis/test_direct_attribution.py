"""Direct logit attribution at image patches: the pure core on hand-made tensors, then the
model edge (shares sum to the model's own logit difference at every image position, also
with a final norm whose gain is not 1, where TransformerLens' ``logit_attrs`` is off), the
embedding's share equal to the projector output's, the heatmap over the picture, and the
result's table, plot, save and load."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from mm_lens import HookedMLLM, direct_logit_attribution
from mm_lens.analysis import direct_attribution
from mm_lens.analysis.direct_attribution import DirectAttribution
from mm_lens.analysis.direct_attribution_core import (
    component_attribution,
    head_attribution,
    logit_direction,
    mean_over,
)
from mm_lens.base.fast_path import FastPathWarning
from mm_lens.presentation.visualize import attribution_heatmaps

ATOL = 1e-5


# ---- pure core ---------------------------------------------------------------------------


def test_head_shares_are_each_heads_result_read_along_the_direction():
    g = torch.Generator().manual_seed(0)
    z, W_O = torch.randn(2, 5, 3, 4, generator=g), torch.randn(3, 4, 8, generator=g)
    direction, scale = torch.randn(2, 8, generator=g), torch.rand(2, 5, 1, generator=g) + 0.5
    shares = head_attribution(z, W_O, direction, scale)
    for h in range(3):
        result = z[:, :, h] @ W_O[h]  # [batch, pos, d_model]
        torch.testing.assert_close(shares[h], ((result / scale) * direction[:, None]).sum(-1))
    # heads add up to the attention output's share
    torch.testing.assert_close(shares.sum(0), component_attribution(torch.einsum("bphd,hdm->bpm", z, W_O), direction, scale))


def test_shares_are_linear_so_parts_add_up_to_the_whole():
    g = torch.Generator().manual_seed(1)
    parts, direction, scale = torch.randn(4, 2, 6, 8, generator=g), torch.randn(2, 8, generator=g), torch.rand(2, 6, 1, generator=g) + 0.5
    whole = component_attribution(parts.sum(0), direction, scale)
    torch.testing.assert_close(torch.stack([component_attribution(p, direction, scale) for p in parts]).sum(0), whole)


def test_the_direction_is_the_gain_times_the_difference_of_unembedding_columns():
    W_U, gain = torch.arange(12.0).reshape(3, 4), torch.tensor([1.0, 2.0, 3.0])
    direction = logit_direction(W_U, gain, torch.tensor([3, 0]), torch.tensor([1, 2]))
    assert torch.equal(direction, torch.tensor([[2.0, 4.0, 6.0], [-2.0, -4.0, -6.0]]))


def test_mean_over_positions_and_nan_for_none():
    values = torch.arange(8.0).reshape(2, 1, 4)
    mask = torch.tensor([[True, False, True, False]])
    assert torch.equal(mean_over(values, mask), torch.tensor([1.0, 5.0]))
    assert mean_over(values, torch.zeros(1, 4, dtype=torch.bool)).isnan().all()


# ---- the model edge ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def batches(models, images):
    return {arch: model.prepare_inputs(["what is the color", "how many are there"], [images[0], None]) for arch, model in models.items()}


@pytest.fixture(scope="module")
def results(models, batches):
    return {arch: direct_logit_attribution(model, batches[arch]) for arch, model in models.items()}


def test_shares_sum_to_the_logit_difference_at_every_image_position(results, batches, arch):
    result, image = results[arch], batches[arch].modality_map.mask("image")
    assert image.any()
    total = result.attribution.sum(0) + result.bias[:, None]
    assert (total - result.logit_diff)[image].abs().max() <= ATOL
    assert result.sum_error() <= ATOL
    assert result.logit_diff[image].abs().max() > 1e-3  # the identity holds on something that is not zero


def test_default_tokens_are_the_top_two_at_the_last_position(model, results, batches, arch):
    logits = model(batches[arch])
    top = logits[:, -1].topk(2).indices
    assert torch.equal(results[arch].answer_tokens, top[:, 0]) and torch.equal(results[arch].wrong_tokens, top[:, 1])
    assert torch.allclose(results[arch].logit_diff[:, -1], logits[:, -1].topk(2).values.diff(dim=-1).neg()[:, 0], atol=1e-6)


def test_one_share_per_head_and_mlp_and_heads_add_up_to_their_layer(model, results, batches, arch):
    result = results[arch]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert result.labels[0] == "embed" and len(result.labels) == 1 + n_layers * (n_heads + 1)
    assert result.labels[1 : n_heads + 2] == [*(f"L0H{h}" for h in range(n_heads)), "0_mlp_out"]
    by_layer = direct_logit_attribution(model, batches[arch], heads=False)
    for layer in range(n_layers):
        heads = sum(result[f"L{layer}H{h}"] for h in range(n_heads))
        torch.testing.assert_close(heads, by_layer[f"{layer}_attn_out"], atol=ATOL, rtol=0)
        assert torch.equal(result[f"{layer}_mlp_out"], by_layer[f"{layer}_mlp_out"])
    assert result.by_layer().shape == (n_layers, n_heads + 1)


def test_the_embedding_share_at_an_image_patch_is_the_projected_features(model, results, batches, arch):
    """At image positions the embedding is the projector's output (not the ``<image>`` token's)."""
    batch, result = batches[arch], results[arch]
    _, cache = model.run_with_cache(batch, names_filter=["vision_projector.hook_out", "ln_final.hook_scale"])
    mm = batch.modality_map
    image = mm.mask("image") & (mm.feature >= 0)
    features = cache["vision_projector.hook_out"].flatten(0, -2)[mm.feature[image]]
    W_U = model.bridge.unembed.W_U
    direction = W_U[:, result.answer_tokens] - W_U[:, result.wrong_tokens]  # the tiny model's final norm has gain 1
    rows = torch.nonzero(image, as_tuple=True)[0]
    expected = (features / cache["ln_final.hook_scale"][image] * direction.T[rows]).sum(-1)
    torch.testing.assert_close(result["embed"][image], expected, atol=1e-6, rtol=0)


def test_a_final_norm_gain_is_accounted_for_where_transformer_lens_logit_attrs_is_not(model_folders, batches, arch):
    model = HookedMLLM.from_pretrained(model_folders[arch])
    weight = model.bridge.ln_final.original_component.weight
    weight.copy_(torch.linspace(0.5, 2.0, weight.numel()))
    batch = batches[arch]
    result = direct_logit_attribution(model, batch)
    assert result.sum_error() <= ATOL
    _, cache = model.run_with_cache(batch)
    rows, pos = batch["input_ids"].shape
    tl = cache.logit_attrs(
        cache.decompose_resid(), tokens=result.answer_tokens[:, None].expand(rows, pos),
        incorrect_tokens=result.wrong_tokens[:, None].expand(rows, pos),
    )
    image = batch.modality_map.mask("image")
    assert (tl.sum(0) - result.logit_diff)[image].abs().max() > 1e-3  # TL assumes the gain folded (compatibility mode)


def test_tokens_by_string_id_or_per_row(model, batches, arch):
    batch = batches[arch]
    by_string = direct_logit_attribution(model, batch, "red", "blue")
    ids = model.processor.tokenizer.convert_tokens_to_ids(["red", "blue"])
    assert by_string.answer_tokens.tolist() == [ids[0]] * 2 and by_string.wrong_tokens.tolist() == [ids[1]] * 2
    assert by_string.answer_text == ("red", "red")
    per_row = direct_logit_attribution(model, batch, [ids[0], "blue"], torch.tensor(ids[1]))
    assert per_row.answer_tokens.tolist() == [ids[0], ids[1]]
    assert per_row.sum_error() <= ATOL


@pytest.mark.parametrize(
    ("answer", "message"),
    [("red green", "is 2 tokens"), ([5, 6, 7], "3 entries for a batch of 2"), (10**6, r"must lie in \[0, ")],
)
def test_bad_tokens_are_refused(model, batches, arch, answer, message):
    with pytest.raises(ValueError, match=message):
        direct_logit_attribution(model, batches[arch], answer)


def test_shares_that_do_not_add_up_are_reported(model, batches, arch, monkeypatch):
    monkeypatch.setattr(direct_attribution, "head_attribution", lambda z, W_O, direction, scale: torch.zeros(W_O.shape[0], *z.shape[:2]))
    monkeypatch.setattr("mm_lens.base.fast_path._warned", set())
    with pytest.warns(FastPathWarning, match="do not add up"):
        direct_logit_attribution(model, batches[arch])


def test_grid_means_table_plot_save_and_load(results, batches, arch, tmp_path):
    result, mm = results[arch], batches[arch].modality_map
    grid = result.to_grid("embed", image=0)
    assert grid.shape == mm.grids[0][0]
    assert torch.equal(grid, mm.to_grid(result["embed"], 0))
    top = result.top("image", k=3)
    assert len(top) == 3 and abs(result.mean()[result.labels.index(top[0])]) >= abs(result.mean()[result.labels.index(top[2])])
    table = result.table(k=3)
    assert all(label in table for label in top) and repr(result.answer_text[0]) in table
    figure = result.plot()
    assert isinstance(figure, Figure) and "embed" in figure.axes[0].get_title()
    result.save(tmp_path)
    loaded = DirectAttribution.load(tmp_path)
    assert torch.equal(loaded.attribution, result.attribution) and loaded.labels == result.labels
    assert torch.equal(loaded.modality_map.feature, mm.feature) and loaded.modality_map.grids == mm.grids
    assert torch.allclose(loaded.to_grid("L0H0"), result.to_grid("L0H0"), equal_nan=True)
    with pytest.raises(FileExistsError):
        result.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="DirectAttribution.save"):
        DirectAttribution.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no position"):
        result.mean("video")
    with pytest.raises(KeyError, match="no component"):
        result["L99H0"]


def test_heatmaps_over_the_picture_one_panel_per_component(model, results, batches, images, arch):
    result = results[arch]
    figure = attribution_heatmaps(model, batches[arch], result, images[0], k=3)
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == result.top(batches[arch].modality_map.image == 0, 3)
    # one colour scale, centred on 0, for every panel
    limits = {ax.images[-1].get_clim() for ax in panels}
    assert len(limits) == 1 and limits.pop()[0] < 0
    plt.close(figure)
    chosen = attribution_heatmaps(model, batches[arch], result, images[0], components=["embed"])
    assert [ax.get_title() for ax in chosen.axes if ax.get_title()] == ["embed"]
    plt.close(chosen)
    with pytest.raises(ValueError, match="image 3 is not in the batch"):
        attribution_heatmaps(model, batches[arch], result, images[0], image_index=3)
