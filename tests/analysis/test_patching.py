"""Activation patching across images: identities, exact restoration, grid cells, TL parity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import random_image
from matplotlib.figure import Figure
from PIL import Image
from transformer_lens import patching as tl_patching

from mm_lens import HookedMLLM
from mm_lens.analysis.patching import PatchingResult, patch_sweep, with_inputs
from mm_lens.presentation.visualize import attention_view, top_k_view


def test_clean_into_clean_is_one_and_corrupted_into_corrupted_is_zero(model, pairs, arch):
    clean, corrupted = pairs[arch]
    ones = patch_sweep(model, clean, corrupted, source="clean", target="clean", positions="text", progress=False)
    zeros = patch_sweep(model, clean, corrupted, source="corrupted", target="corrupted", positions="text", progress=False)
    assert torch.allclose(ones.effect, torch.ones_like(ones.effect), atol=1e-4)
    assert torch.allclose(zeros.effect, torch.zeros_like(zeros.effect), atol=1e-4)


def test_patching_every_position_at_layer_zero_restores_clean_logits(model, pairs, arch):
    clean, corrupted = pairs[arch]
    _, cache = model.run_with_cache(clean, names_filter="blocks.0.hook_resid_pre")
    patched = model.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", lambda act, hook: cache["blocks.0.hook_resid_pre"])])
    assert torch.equal(patched, model(clean))
    naive = patch_sweep(model, clean, corrupted, layers=[0], positions="all", per="all", metric="kl", fast=False, progress=False)
    assert naive.effect.shape == (1, 1)
    assert abs(float(naive.effect[0, 0]) - 1.0) < 1e-5
    # the fast path unembeds the last positions alone: the same up to matmul rounding
    fast = patch_sweep(model, clean, corrupted, layers=[0], positions="all", per="all", metric="kl", progress=False)
    assert abs(float(fast.effect[0, 0]) - 1.0) < 1e-3


@pytest.mark.parametrize("metric", ["logit_diff", "prob", "kl"])
def test_metrics_are_normalised_between_corrupted_and_clean(model, pairs, arch, metric):
    clean, corrupted = pairs[arch]
    result = patch_sweep(model, clean, corrupted, layers=[0, 1], positions="last", metric=metric, progress=False)
    assert result.effect.shape == (2, 1)
    assert result.clean_metric != result.corrupted_metric
    expected = (result.metric - result.corrupted_metric) / (result.clean_metric - result.corrupted_metric)
    assert torch.allclose(result.effect, expected)


def _one_distinct_patch(row: int, col: int, patch: int = 7, size: int = 28):
    base = np.full((size, size, 3), 120, dtype=np.uint8)
    clean = base.copy()
    clean[row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = (255, 20, 20)
    return Image.fromarray(clean), Image.fromarray(base)


def test_grid_cell_of_largest_effect_is_the_distinct_patch(models):
    model = models["llava"]
    distinct, uniform = _one_distinct_patch(1, 2)
    clean = model.prepare_inputs(["what is the color"], [distinct])
    corrupted = model.prepare_inputs(["what is the color"], [uniform])
    result = patch_sweep(model, clean, corrupted, layers=[0], per="cell", metric="kl", progress=False)
    grid = result.to_grid(0, image=0, view=0)
    assert grid.shape == (4, 4)
    assert divmod(int(grid.abs().argmax()), 4) == (1, 2)
    on_map = clean.modality_map.to_grid(result.position_values(0, clean.modality_map.shape), image=0)
    assert torch.equal(on_map, grid)


def test_cells_group_patches_by_cell_size(models, pairs):
    model = models["llava"]
    clean, corrupted = pairs["llava"]
    result = patch_sweep(model, clean, corrupted, layers=[1], per="cell", cell_size=2, progress=False)
    assert len(result.units) == 4 and all(len(u.positions) == 4 for u in result.units)
    assert result.to_grid(1).shape == (2, 2)


def test_transformer_lens_patching_through_with_inputs_equals_our_sweep(model, pairs, arch):
    clean, corrupted = pairs[arch]
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    ours = patch_sweep(model, clean, corrupted, positions="all", metric="logit_diff", progress=False)
    clean_logits, corrupted_logits = model(clean), model(corrupted)
    rows, last = torch.arange(2), clean.modality_map.last
    answer = clean_logits[rows, last].argmax(-1)
    ranked = corrupted_logits[rows, last].topk(2, -1).indices
    wrong = torch.where(ranked[:, 0] == answer, ranked[:, 1], ranked[:, 0])

    def metric(logits):
        return (logits[rows, last, answer] - logits[rows, last, wrong]).mean()

    theirs = tl_patching.get_act_patch_resid_pre(with_inputs(model, corrupted), corrupted["input_ids"], clean_cache, metric)
    positions = ours.units
    assert theirs.shape == (model.cfg.n_layers, clean["input_ids"].shape[1])
    columns = torch.tensor([int(u.positions[0]) for u in positions])
    assert torch.allclose(theirs[:, columns], ours.metric, atol=1e-4)


def test_passing_the_model_itself_to_transformer_lens_is_a_clear_error(model, pairs, arch):
    clean, corrupted = pairs[arch]
    _, clean_cache = model.run_with_cache(clean, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        tl_patching.get_act_patch_resid_pre(model, corrupted["input_ids"], clean_cache, lambda logits: logits.sum())


def test_batches_that_differ_in_text_or_length_are_refused(model, images):
    a = model.prepare_inputs(["what is the color"], [images[0]])
    with pytest.raises(ValueError, match="token ids differ"):
        patch_sweep(model, a, model.prepare_inputs(["how many are there"], [images[0]]), progress=False)
    with pytest.raises(ValueError, match="have shape"):
        patch_sweep(model, a, model.prepare_inputs(["what is the color of the shape"], [images[0]]), progress=False)
    with pytest.raises(ValueError, match="unknown hook"):
        patch_sweep(model, a, a, hook="embed", progress=False)
    with pytest.raises(ValueError, match="same on the clean and corrupted"):
        patch_sweep(model, a, a, progress=False)


def test_pictures_laid_out_differently_are_refused_though_their_token_ids_agree(tiny_folder):
    model = HookedMLLM.from_pretrained(tiny_folder("qwen2_vl"))
    wide = model.prepare_inputs(["what is the color"], [random_image(30, 50, 0)])
    tall = model.prepare_inputs(["what is the color"], [random_image(50, 30, 1)])
    assert torch.equal(wide["input_ids"], tall["input_ids"])  # 4x6 and 6x4 merged cells: the same tokens
    with pytest.raises(ValueError, match=r"laid out differently \(row 0, position \d+ is image 0 tile \d+ \(r0, c4"):
        patch_sweep(model, wide, tall, progress=False)


def test_with_inputs_refuses_a_cache_whose_image_sits_elsewhere(model, images):
    first = model.prepare_inputs(["<image> what is the color"], [images[0]], chat=False)
    last = model.prepare_inputs(["what is the color <image>"], [images[0]], chat=False)
    assert first["input_ids"].shape == last["input_ids"].shape
    _, first_cache = model.run_with_cache(first, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match=r"resid_pre does not line up .*row 0, position 1 is image 0 .* in the cache's batch but text in these inputs"):
        tl_patching.get_act_patch_resid_pre(with_inputs(model, last), last["input_ids"], first_cache, lambda logits: logits.sum())
    # a cache of the batch itself lines up, and a plain mapping of inputs serves as the batch
    _, own = model.run_with_cache(last, names_filter="blocks.0.hook_resid_pre")
    index = pd.DataFrame([(0, 1)], columns=["layer", "pos"])
    patched = tl_patching.generic_activation_patch(
        with_inputs(model, dict(last.inputs)), last["input_ids"], own, lambda logits: logits[0, -1, 0],
        tl_patching.layer_pos_patch_setter, "resid_pre", index_df=index,
    )
    torch.testing.assert_close(patched[0], model(last)[0, -1, 0])


def test_a_cache_moved_off_the_run_is_still_checked_by_shape(model, images):
    batch = model.prepare_inputs(["what is the color"], [images[0]])
    longer = model.prepare_inputs(["what is the color of the shape"], [images[0]])
    _, cache = model.run_with_cache(longer, names_filter="blocks.0.hook_resid_pre")
    moved = cache.to("cpu")  # new tensors: their batch is unknown, their shape still tells
    moved.cache_dict = {name: tensor.clone() for name, tensor in moved.cache_dict.items()}
    assert model.modality_map_of(moved["blocks.0.hook_resid_pre"]) is None
    with pytest.raises(ValueError, match=r"the cached activation has shape \(1, \d+, \d+\) and these inputs' \(1, \d+, \d+\)"):
        tl_patching.get_act_patch_resid_pre(with_inputs(model, batch), batch["input_ids"], moved, lambda logits: logits.sum())


def test_views_refuse_a_cache_of_another_batch(model, images):
    first = model.prepare_inputs(["<image> what is the color"], [images[0]], chat=False)
    last = model.prepare_inputs(["what is the color <image>"], [images[0]], chat=False)
    _, cache = model.run_with_cache(first, names_filter=["blocks.0.mlp.hook_act", "blocks.0.attn.hook_pattern"])
    with pytest.raises(ValueError, match="blocks.0.mlp.hook_act does not line up .*position 1 is image 0"):
        top_k_view(model, last, "blocks.0.mlp.hook_act", cache=cache)
    with pytest.raises(ValueError, match="blocks.0.attn.hook_pattern does not line up"):
        attention_view(model, last, 0, pattern=cache["blocks.0.attn.hook_pattern"])
    assert top_k_view(model, first, "blocks.0.mlp.hook_act", cache=cache).component == "TopkTokens"


def test_result_saves_loads_and_plots(model, pairs, arch, tmp_path):
    clean, corrupted = pairs[arch]
    result = patch_sweep(model, clean, corrupted, layers=[0], positions="text", progress=False)
    result.save(tmp_path)
    loaded = PatchingResult.load(tmp_path)
    assert torch.equal(loaded.effect, result.effect) and [u.label for u in loaded.units] == [u.label for u in result.units]
    assert isinstance(result.plot(), Figure)


@pytest.mark.parametrize("hook", ["resid_pre", "resid_post", "attn_out", "mlp_act"])
def test_fast_path_equals_full_forward_per_patch(model, pairs, arch, hook):
    clean, corrupted = pairs[arch]
    fast = patch_sweep(model, clean, corrupted, hook=hook, positions="all", patches_per_forward=5, progress=False)
    naive = patch_sweep(model, clean, corrupted, hook=hook, positions="all", patches_per_forward=1, fast=False, progress=False)
    assert torch.allclose(fast.metric, naive.metric, atol=1e-4)
    assert torch.allclose(fast.effect, naive.effect, atol=1e-4)


def test_resumed_run_reproduces_the_model_logits(model, pairs, arch):
    from mm_lens.analysis.patching import _ResumableRun

    clean, _ = pairs[arch]
    run = _ResumableRun(model, clean)
    for layer in range(model.cfg.n_layers):
        assert torch.allclose(run.logits_from(layer, 1), run.logits, atol=1e-5)
        assert torch.allclose(run.logits_from(layer, 2)[2:], run.logits, atol=1e-5)


def test_a_resumed_suffix_reproduces_the_model_logits(model, pairs, arch):
    """Rerunning positions ``start..`` on the recorded KV cache of the earlier ones gives the
    model's logits at every position, also for stacked copies and at the last positions."""
    from mm_lens.analysis.patching import _ResumableRun

    clean, _ = pairs[arch]
    with model.fast_attention():
        run = _ResumableRun(model, clean)
        assert run.prefix is not None, "LLaVA's recorded run keeps a full-length KV cache"
        last = clean.modality_map.last
        for layer in range(model.cfg.n_layers):
            for start in (1, run.length // 2, int(last.min())):
                assert torch.allclose(run.logits_from(layer, 1, start=start), run.logits, atol=1e-5)
                assert torch.allclose(run.logits_from(layer, 2, start=start)[2:], run.logits, atol=1e-5)
                at_last = run.logits_from(layer, 2, at=last, start=start)[:, 0]
                assert torch.allclose(at_last, run.logits[torch.arange(len(last)), last].repeat(2, 1), atol=1e-5)


def test_a_resumed_suffix_of_a_padded_batch_reproduces_the_model_logits(model, images):
    """Rows of different lengths (padding, a recorded 4-D mask): the suffix keeps every
    row's own mask rows and positions."""
    from mm_lens.analysis.patching import _ResumableRun

    batch = model.prepare_inputs(["what is the color", "how many cars are there on the road today"], [images[0], images[0]])
    real = batch["attention_mask"].bool()
    assert not bool(real.all()), "the rows must differ in length for this test"
    with model.fast_attention():
        run = _ResumableRun(model, batch)
        assert run.prefix is not None
        for start in (run.length // 3, int(batch.modality_map.last.min())):
            for layer in (0, model.cfg.n_layers - 1):
                resumed = run.logits_from(layer, 2, start=start)
                for copy in range(2):
                    rows = resumed[copy * 2 : copy * 2 + 2]
                    assert torch.allclose(rows[real], run.logits[real], atol=1e-5), (start, layer, copy)


def test_a_patch_rerun_from_its_position_equals_the_full_forward(model, pairs, arch):
    """A patch at one position, rerun from that position on, changes the logits exactly as
    the full patched forward does (and leaves the earlier positions as they were)."""
    from mm_lens.analysis.patching import _ResumableRun

    clean, corrupted = pairs[arch]
    layer, position = 1, int(clean.modality_map.mask("image")[0].nonzero()[3])
    name = f"blocks.{layer}.hook_resid_pre"
    source = model.run_with_cache(clean, names_filter=[name])[1][name]

    def patch(act, hook, offset=0):
        act = act.clone()
        act[:, position - offset] = source[:, position]
        return act

    with torch.no_grad(), model.fast_attention():
        full = model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])
        run = _ResumableRun(model, corrupted)
        start = run.suffix_start([torch.tensor([position, position + 2])])
        assert start == position
        with model.hooks(fwd_hooks=[(name, lambda act, hook: patch(act, hook, offset=start))]):
            resumed = run.logits_from(layer, 1, start=start)
    assert not torch.allclose(full, run.logits, atol=1e-3), "the patch must change the logits for the test to mean anything"
    assert torch.allclose(resumed, full, atol=1e-5)


def test_suffix_inputs_are_cut_or_refused():
    from mm_lens.analysis.patching import _suffix_kwargs

    mask, cos = torch.zeros(1, 1, 6, 6), torch.randn(1, 6, 4)
    cut = _suffix_kwargs({"attention_mask": mask, "position_embeddings": (cos, cos), "position_ids": torch.arange(6)[None], "flag": True}, 2, 6)
    assert cut["attention_mask"].shape == (1, 1, 4, 6) and cut["position_embeddings"][0].shape == (1, 4, 4)
    assert torch.equal(cut["position_ids"], torch.arange(2, 6)[None]) and cut["flag"] is True
    assert "attention_mask" not in _suffix_kwargs({"attention_mask": None}, 2, 6)  # the caller adds a causal one
    assert _suffix_kwargs({"attention_mask": torch.zeros(1, 1, 6, 8)}, 2, 6) is None  # keys beyond the run: unknown
    assert _suffix_kwargs({"per_position_extra": torch.zeros(1, 6)}, 2, 6) is None  # an input it does not know
    assert _suffix_kwargs({"position_embeddings": {"global": (cos, cos)}}, 2, 6) is None


def test_sweep_runs_group_patches_that_start_close_together():
    from mm_lens.analysis.patching import Unit, _chunks

    units = [Unit(label=str(p), positions=torch.tensor([p, p + 1])) for p in (10, 11, 12, 60, 61, 95)]
    first_position = lambda positions: min(int(p.min()) for p in positions)
    runs = _chunks(units, 4, first_position, length=110)  # 5% of the 100 positions from 10 on: 5
    assert [(i, [int(u.positions[0]) for u in run]) for i, run in runs] == [(0, [10, 11, 12]), (3, [60, 61]), (5, [95])]
    assert [len(run) for _, run in _chunks(units, 4, None, length=110)] == [4, 2]  # no suffix path: fixed runs


def test_a_metric_returning_one_number_is_measured_per_patch(model, pairs, arch):
    clean, corrupted = pairs[arch]
    last = clean.modality_map.last

    def scalar(logits):
        return logits[torch.arange(len(last)), last].float().logsumexp(-1).mean()

    together = patch_sweep(model, clean, corrupted, positions="text", metric=scalar, patches_per_forward=4, progress=False)
    alone = patch_sweep(model, clean, corrupted, positions="text", metric=scalar, patches_per_forward=1, fast=False, progress=False)
    assert torch.allclose(together.metric, alone.metric, atol=1e-4)


def test_resumed_blocks_get_no_kv_cache_under_any_name():
    from transformers import DynamicCache

    from mm_lens.analysis.patching import block_kwargs

    mask, cache = torch.ones(1, 3), DynamicCache()
    kept = block_kwargs({"attention_mask": mask, "cache": cache, "past_key_values": cache, "use_cache": True,
                         "cache_position": torch.arange(3), "renamed_cache": cache})
    assert list(kept) == ["attention_mask"]


@pytest.mark.parametrize("drift", ["unexpected_keyword", "kv_cache_re_fed"])
def test_a_drifted_block_signature_falls_back_to_full_forwards_with_a_warning(model, pairs, arch, monkeypatch, drift):
    """Simulates a transformers release that changes what blocks receive: the fast path's
    first forward disagrees with the plain one, so the sweep warns and gives the plain numbers."""
    from mm_lens.analysis import patching
    from mm_lens.base import fast_path

    clean, corrupted = pairs[arch]
    expected = patch_sweep(model, clean, corrupted, layers=[0, 1], positions="text", fast=False, progress=False)
    handles = []
    if drift == "unexpected_keyword":  # blocks now refuse a keyword they are handed
        monkeypatch.setattr(patching, "block_kwargs", lambda kwargs: {**kwargs, "not_a_block_argument": 1.0})
        handles = [block.register_forward_pre_hook(_refuse_unknown_keyword, with_kwargs=True) for block in model.bridge.blocks]
    else:  # the cache arrives under a name the filter does not know: re-fed, it doubles the keys
        monkeypatch.setattr(patching, "block_kwargs", lambda kwargs: dict(kwargs))
    monkeypatch.setattr(fast_path, "_warned", set())
    try:
        with pytest.warns(fast_path.FastPathWarning, match="patching resume fast path disagrees"):
            result = patch_sweep(model, clean, corrupted, layers=[0, 1], positions="text", progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(result.metric, expected.metric, atol=1e-5)


def _refuse_unknown_keyword(module, args, kwargs):
    if "not_a_block_argument" in kwargs:
        raise TypeError("forward() got an unexpected keyword argument 'not_a_block_argument'")


def test_position_units_name_their_token_and_modality(model, pairs, arch):
    clean, corrupted = pairs[arch]
    result = patch_sweep(model, clean, corrupted, layers=[0], positions="all", metric="kl", progress=False)
    mm, ids = clean.modality_map, clean.inputs["input_ids"][0]
    tokens = model.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    kinds = {"text": 0, "media": 0}
    for unit in result.units:
        pos = int(unit.positions[0])
        assert unit.label.split(" ")[0] == str(pos)
        if int(mm.image[0, pos]) >= 0:
            assert unit.label == f"{pos} {mm.media_label(0, pos)}" and unit.label.split(" ", 1)[1].startswith("<")
            kinds["media"] += 1
        else:
            modality = mm.modality[0, pos]
            assert unit.label == f"{pos} {tokens[pos]!r} {['text', 'image', 'special', 'padding', 'video', 'audio', 'generated'][modality]}"
            kinds["text"] += bool(modality == 0)
    assert kinds["text"] >= 4 and kinds["media"] >= 1
    assert "'color' text" in " ".join(u.label for u in result.units) or "color" in "".join(tokens)
