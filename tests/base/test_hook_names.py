"""One builder and parser of language-model hook names, and one ``layers=`` policy."""

from __future__ import annotations

import pytest
from transformer_lens.utilities import get_act_name

from mm_lens.base.hooks import block_hook, is_language_model_hook, parse_block_hook, resolve_layers


@pytest.mark.parametrize("kind", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "pattern", "attn_scores"])
def test_block_hook_names_are_transformer_lens_names(kind):
    assert block_hook(3, kind) == get_act_name(kind, 3)


def test_block_hook_takes_full_points_and_parses_back():
    assert block_hook(2, "mlp_act") == block_hook(2, "mlp.hook_act") == "blocks.2.mlp.hook_act"
    assert parse_block_hook("blocks.11.attn.hook_rot_q") == (11, "attn.hook_rot_q")
    with pytest.raises(ValueError, match="not a language-model block hook"):
        parse_block_hook("vision_encoder.encoder_layers.1.mlp.hook_post")


def test_language_model_hooks_exclude_the_encoders():
    assert is_language_model_hook("blocks.0.hook_resid_pre")
    assert not is_language_model_hook("vision_encoder.encoder_layers.0.mlp.hook_post")
    assert not is_language_model_hook("vision_projector.hook_hidden")


def test_layers_keep_their_order_and_refuse_repeats_and_strangers():
    assert resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers(2, 4) == [2]
    assert resolve_layers([3, 0], 4) == [3, 0]
    for bad, phrase in [([], "empty"), ([4], "out of range"), ([-1], "out of range"), ([1, 1], "named twice"),
                        ([True], "integer"), (["1"], "integer")]:
        with pytest.raises(ValueError, match=phrase):
            resolve_layers(bad, 4)


def test_filters_tell_the_language_model_from_the_encoders():
    from mm_lens.base.hooks import encoder_filter, language_model_filter

    names = ["blocks.1.mlp.hook_post", "blocks.1.mlp.hook_act", "vision_encoder.encoder_layers.0.mlp.hook_post",
             "vision_projector.hook_hidden", "hook_embed"]
    assert [n for n in names if language_model_filter("mlp.hook_post")(n)] == ["blocks.1.mlp.hook_post"]
    assert [n for n in names if language_model_filter("mlp_act")(n)] == ["blocks.1.mlp.hook_act"]
    assert [n for n in names if language_model_filter()(n)] == names[:2]
    assert [n for n in names if encoder_filter("mlp.hook_post")(n)] == ["vision_encoder.encoder_layers.0.mlp.hook_post"]
    assert [n for n in names if encoder_filter()(n)] == names[2:]
