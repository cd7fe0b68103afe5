"""Attribution patching: exact where the metric is linear in the patched activation, the
patching identities, and the same result type and heatmaps as the real sweep."""

from __future__ import annotations

import pytest
import torch

from mm_lens.analysis.patching import PatchingResult, attribution_patch, layer_agreement, patch_sweep


def test_source_into_itself_changes_nothing(model, pairs, arch):
    clean, corrupted = pairs[arch]
    ones = attribution_patch(model, clean, corrupted, source="clean", target="clean", positions="all")
    zeros = attribution_patch(model, clean, corrupted, source="corrupted", target="corrupted", positions="all")
    assert torch.allclose(ones.effect, torch.ones_like(ones.effect), atol=1e-5)
    assert torch.allclose(zeros.effect, torch.zeros_like(zeros.effect), atol=1e-5)


def _frozen_final_norm(model, batch):
    """Hooks holding the final norm's scale at ``batch``'s values: the logits become linear
    in the last block's output, so first-order attribution must be exact there."""
    _, cache = model.run_with_cache(batch, names_filter="ln_final.hook_scale")
    scale = cache["ln_final.hook_scale"]
    return [("ln_final.hook_scale", lambda act, hook: scale.repeat(act.shape[0] // scale.shape[0], *[1] * (scale.ndim - 1)))]


@pytest.mark.parametrize("hook", ["resid_post", "mlp_out"])  # the last layer adds both straight to the logits
@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")
def test_equal_to_real_patching_where_the_metric_is_linear_in_the_activation(model, pairs, arch, hook):
    clean, corrupted = pairs[arch]
    last = [model.cfg.n_layers - 1]
    with model.hooks(fwd_hooks=_frozen_final_norm(model, corrupted)):
        estimate = attribution_patch(model, clean, corrupted, hook=hook, layers=last, positions="all")
        exact = patch_sweep(model, clean, corrupted, hook=hook, layers=last, positions="all", fast=False, progress=False)
    assert estimate.effect.abs().max() > 1e-2  # the last positions carry the change
    assert torch.allclose(estimate.effect, exact.effect, atol=1e-4), (estimate.effect - exact.effect).abs().max()


def test_cells_and_layers_match_the_sweep_in_shape_and_correlate_with_it(model, pairs, arch, tmp_path):
    clean, corrupted = pairs[arch]
    estimate = attribution_patch(model, clean, corrupted, positions="image", per="cell", cell_size=2)
    exact = patch_sweep(model, clean, corrupted, positions="image", per="cell", cell_size=2, progress=False)
    assert estimate.effect.shape == exact.effect.shape and estimate.metadata["method"] == "attribution"
    assert [u.label for u in estimate.units] == [u.label for u in exact.units]
    agreement = layer_agreement(estimate, exact)
    assert agreement.shape == (model.cfg.n_layers,) and bool(agreement.isfinite().all())
    estimate.save(tmp_path)
    assert torch.equal(PatchingResult.load(tmp_path).effect, estimate.effect)
    estimate.plot()
    assert estimate.to_grid(0).isfinite().any()
    with pytest.raises(ValueError, match="different layers or units"):
        layer_agreement(estimate, patch_sweep(model, clean, corrupted, layers=[0], positions="image", per="cell", progress=False))
