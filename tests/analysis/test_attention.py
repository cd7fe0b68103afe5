"""Attention shares per modality and attention knockout: against direct computations, HF's own
eager attention, causality, renormalisation, layer choice and bad input."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure
from transformers.models.llama import modeling_llama

from mm_lens.analysis.attention import (
    AttentionShare,
    attention_to_modalities,
    knocked_out,
    knockout_effect,
    knockout_hooks,
)
from mm_lens.base.modality import MODALITIES

PATTERN = "blocks.{layer}.attn.hook_pattern"


@pytest.fixture(scope="module")
def batch(model, images):
    """A row with an image and a text-only row, left-padded."""
    return model.prepare_inputs(["what is the color", "how many are there"], [images[0], None])


@pytest.fixture(scope="module")
def clean_logits(model, batch):
    return model(batch)


def patterns(model, batch, fwd_hooks=()):
    """Every layer's ``hook_pattern`` as later hooks see it, with ``fwd_hooks`` active."""
    names = [PATTERN.format(layer=layer) for layer in range(model.cfg.n_layers)]
    with model.hooks(fwd_hooks=fwd_hooks):
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in names)
    return [cache[name] for name in names]


def last_to_image_edges(modality_map) -> torch.Tensor:
    """[batch, q, k]: last position of each row -> that row's image positions."""
    image = modality_map.mask("image")
    edges = torch.zeros(*modality_map.shape, modality_map.shape[1], dtype=torch.bool)
    for row in range(modality_map.shape[0]):
        edges[row, modality_map.last[row]] = image[row]
    return edges


# ---- shares ----------------------------------------------------------------------------
def test_shares_over_all_modalities_sum_to_one_per_query(model, batch):
    for query in ("last", "text"):
        result = attention_to_modalities(model, batch, query=query, modalities=MODALITIES)
        assert torch.allclose(result.per_row.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.allclose(result.shares.sum(-1), torch.ones(()), atol=1e-5)


def test_shares_equal_a_direct_computation_from_cached_patterns(model, batch):
    modality_map = batch.modality_map
    result = attention_to_modalities(model, batch, query="text", modalities=("image", "text", "special"))
    queries = modality_map.mask("text")
    for layer, pattern in enumerate(patterns(model, batch)):
        for row in range(modality_map.shape[0]):
            q_positions = torch.nonzero(queries[row]).flatten()
            for m, name in enumerate(result.modalities):
                k_positions = torch.nonzero(modality_map.mask(name)[row]).flatten()
                expected = pattern[row][:, q_positions][:, :, k_positions].sum(-1).mean(-1)  # [head]
                assert torch.allclose(result.per_row[row, layer, :, m], expected, atol=1e-6)
        assert torch.allclose(result.shares[layer], result.per_row[:, layer].mean(0), atol=1e-7)
    assert result.per_row.shape == (2, model.cfg.n_layers, model.cfg.n_heads, 3)
    assert result.n_queries.tolist() == queries.sum(1).tolist()


def test_a_query_mask_selects_the_same_positions_as_its_name(model, batch):
    by_name = attention_to_modalities(model, batch, query="last")
    by_mask = attention_to_modalities(model, batch, query=batch.modality_map.last_mask())
    assert torch.equal(by_mask.per_row, by_name.per_row) and by_mask.query == "mask"


def test_rows_without_a_query_position_are_nan_and_left_out_of_the_mean(model, batch):
    result = attention_to_modalities(model, batch, query="image", layers=[1])
    assert result.per_row[1].isnan().all() and not result.per_row[0].isnan().any()
    assert torch.equal(result.shares, result.per_row[0])
    assert result.layers == [1]


def test_attention_share_saves_loads_tables_and_plots(model, batch, tmp_path):
    result = attention_to_modalities(model, batch)
    loaded = AttentionShare.load(result.save(tmp_path / "share"))
    assert torch.equal(loaded.shares, result.shares) and torch.equal(loaded.per_row, result.per_row)
    assert (loaded.layers, loaded.modalities, loaded.query) == (result.layers, result.modalities, "last")
    assert len(result.table().splitlines()) == 2 + model.cfg.n_layers
    assert isinstance(result.plot(), Figure)


# ---- knockout --------------------------------------------------------------------------
@pytest.mark.parametrize("renormalize", [False, True])
def test_knocking_out_no_edge_leaves_logits_exactly_unchanged(model, batch, clean_logits, renormalize):
    nothing = torch.zeros(batch.modality_map.shape, dtype=torch.bool)
    with knocked_out(model, batch, keys=nothing, renormalize=renormalize):
        assert torch.equal(model(batch), clean_logits)


def test_knocking_out_last_to_image_equals_a_hand_written_pattern_hook(model, batch, clean_logits):
    modality_map = batch.modality_map
    image = modality_map.mask("image")

    def zero_last_to_image(pattern, hook):
        pattern = pattern.clone()
        for row in range(pattern.shape[0]):
            for head in range(pattern.shape[1]):
                pattern[row, head, modality_map.last[row], image[row]] = 0.0
        return pattern

    by_hand = [(PATTERN.format(layer=layer), zero_last_to_image) for layer in range(model.cfg.n_layers)]
    expected = model.run_with_hooks(batch, fwd_hooks=by_hand)
    knocked = model.run_with_hooks(batch, fwd_hooks=knockout_hooks(model, batch, query="last", keys="image"))
    assert torch.allclose(knocked, expected, atol=1e-6)
    assert not torch.allclose(knocked, clean_logits, atol=1e-3)


def test_knocking_out_last_to_image_equals_hf_eager_attention_with_those_weights_zeroed(
    model, batch, hf_reference, monkeypatch
):
    edges = last_to_image_edges(batch.modality_map).unsqueeze(1)

    def eager_with_edges_zeroed(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype).masked_fill(edges, 0.0)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager_with_edges_zeroed)
    expected = hf_reference(**batch.inputs).logits
    monkeypatch.undo()
    knocked = model.run_with_hooks(batch, fwd_hooks=knockout_hooks(model, batch, query="last", keys="image"))
    assert torch.allclose(knocked, expected, atol=1e-5)


def test_renormalized_knockout_equals_hf_with_those_edges_masked(model, batch, hf_reference):
    modality_map = batch.modality_map
    pos = modality_map.shape[1]
    allowed = torch.ones(pos, pos, dtype=torch.bool).tril() & batch["attention_mask"].bool().unsqueeze(1)
    keep = allowed & ~last_to_image_edges(modality_map)
    mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min).unsqueeze(1)  # HF's 4D additive mask
    expected = hf_reference(**{**batch.inputs, "attention_mask": mask}).logits
    knocked = model.run_with_hooks(batch, fwd_hooks=knockout_hooks(model, batch, renormalize=True))
    assert torch.allclose(knocked, expected, atol=1e-5)


@pytest.mark.parametrize("renormalize", [False, True])
def test_knocking_out_last_to_image_changes_only_the_last_position(model, batch, clean_logits, renormalize):
    with knocked_out(model, batch, renormalize=renormalize):
        knocked = model(batch)
    assert torch.equal(knocked[:, :-1], clean_logits[:, :-1])  # left padding: last is pos - 1 in every row
    assert not torch.allclose(knocked[0, -1], clean_logits[0, -1], atol=1e-3)  # the row with an image
    assert torch.equal(knocked[1], clean_logits[1])  # a text-only row has no image key


def test_renormalized_rows_sum_to_one_and_knocked_entries_are_zero(model, batch):
    edges = last_to_image_edges(batch.modality_map).unsqueeze(1)
    clean = patterns(model, batch)
    for knocked, before in zip(patterns(model, batch, knockout_hooks(model, batch, renormalize=True)), clean):
        assert torch.allclose(knocked[:, :, :-1], before[:, :, :-1])
        assert (knocked.masked_select(edges) == 0).all() and (before.masked_select(edges) > 0).all()
        assert torch.allclose(knocked.sum(-1), torch.ones(()), atol=1e-5)


def test_zeroing_knockout_leaves_the_other_weights_of_the_query_as_they_were(model, batch):
    edges = last_to_image_edges(batch.modality_map).unsqueeze(1).expand(-1, model.cfg.n_heads, -1, -1)
    knocked, clean = patterns(model, batch, knockout_hooks(model, batch, layers=[0]))[0], patterns(model, batch)[0]
    assert (knocked[edges] == 0).all()
    assert torch.equal(knocked[~edges], clean[~edges])


def test_renormalize_leaves_queries_with_every_key_knocked_out_unchanged(model, batch):
    everything = ("text", "image", "special")
    clean = patterns(model, batch)
    knocked = patterns(model, batch, knockout_hooks(model, batch, query="text", keys=everything, renormalize=True))
    for after, before in zip(knocked, clean):
        assert not after.isnan().any()
        assert torch.equal(after, before)


def test_knockout_at_a_subset_of_layers_hooks_only_those_layers(model, batch):
    assert [name for name, _ in knockout_hooks(model, batch, layers=[1])] == ["blocks.1.attn.hook_pattern"]
    renormalized = knockout_hooks(model, batch, layers=(0,), renormalize=True)
    assert [name for name, _ in renormalized] == ["blocks.0.attn.hook_attn_scores"]
    every = knockout_hooks(model, batch)
    assert [name for name, _ in every] == [PATTERN.format(layer=layer) for layer in range(model.cfg.n_layers)]


def test_knockout_effect_per_layer_and_all_layers(model, batch, clean_logits):
    def metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 7]

    per_layer = knockout_effect(model, batch, metric=metric)
    assert per_layer.knocked.shape == (model.cfg.n_layers,)
    assert torch.allclose(per_layer.clean, metric(clean_logits))
    every = knockout_effect(model, batch, metric=metric, per_layer=False)
    assert every.knocked.shape == () and not torch.allclose(every.knocked, every.clean)
    alone = model.run_with_hooks(batch, fwd_hooks=knockout_hooks(model, batch, layers=[1]))
    assert torch.allclose(per_layer.knocked[1], metric(alone))
    assert isinstance(per_layer.plot(), Figure) and isinstance(every.plot(), Figure)
    assert "layer 1" in per_layer.table()


# ---- bad input -------------------------------------------------------------------------
def test_unknown_modality_names_list_the_valid_ones(model, batch):
    with pytest.raises(ValueError, match=r"unknown keys position\(s\) \['images'\].*image"):
        knockout_hooks(model, batch, keys="images")
    with pytest.raises(ValueError, match=r"unknown modality.*\['pictures'\].*image"):
        attention_to_modalities(model, batch, modalities=("pictures",))


def test_masks_of_the_wrong_shape_or_dtype_are_refused(model, batch):
    with pytest.raises(ValueError, match=r"query position\(s\) mask must be a bool tensor of the batch's shape.*\(2, 3\)"):
        knockout_hooks(model, batch, query=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        attention_to_modalities(model, batch, query=torch.zeros(batch.modality_map.shape))


def test_layers_out_of_range_are_refused(model, batch):
    n_layers = model.cfg.n_layers
    with pytest.raises(ValueError, match=f"layer {n_layers} out of range.*valid 0..{n_layers - 1}"):
        knockout_hooks(model, batch, layers=[n_layers])
    with pytest.raises(ValueError, match="out of range"):
        knockout_effect(model, batch, metric=lambda logits: logits.sum(), layers=[-1])


def test_knockout_refuses_a_run_of_another_length(model, batch):
    shorter = {k: v[:, :-1] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}
    with knocked_out(model, batch), pytest.raises(ValueError, match="prefill"):
        model(shorter)


def test_metric_must_return_a_scalar(model, batch):
    with pytest.raises(ValueError, match="scalar"):
        knockout_effect(model, batch, metric=lambda logits: logits[0, -1], layers=[0])
