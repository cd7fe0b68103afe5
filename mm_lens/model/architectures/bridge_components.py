"""Bridge components mm_lens adds to TransformerLens' bridges.

TransformerLens' bridge has no hook on ``act_fn(gate_proj(x))`` in a gated MLP (its
``mlp.hook_post`` is ``act_fn(gate) * up``) nor on the projector's hidden activation. These
subclasses wrap the HF activation modules as bridge components, which gives:

- ``blocks.{l}.mlp.hook_act``: ``act_fn(gate_proj(x))``, ``[batch, pos, d_mlp]``;
- ``vision_projector.hook_hidden``: ``act(linear_1(x))``, ``[images, tokens, d_proj]``.

And ``hook_embed`` holds what the language model receives, media features included
(``MediaEmbeddingBridge``, installed by ``MediaEmbeddingAdapter``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    EmbeddingBridge,
    GatedMLPBridge,
    VisionProjectionBridge,
)
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent


class NeuronGatedMLPBridge(GatedMLPBridge):
    """Gated MLP whose activation function is a hooked component (``hook_act``)."""

    hook_aliases = {**GatedMLPBridge.hook_aliases, "hook_act": "act_fn.hook_out"}

    def __init__(self, name: str, config: Any, submodules: dict[str, GeneralizedComponent]):
        super().__init__(name, config, submodules={**submodules, "act_fn": GeneralizedComponent(name="act_fn")})

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """HF path as in TransformerLens; the compatibility-mode path (processed weights) is
        recomputed here so that the activation still runs through ``hook_act``."""
        if not getattr(self, "_use_processed_weights", False):
            return super().forward(*args, **kwargs)
        hidden = self.hook_in(args[0])
        up_proj = getattr(self, "in")
        gate = self.gate.hook_out(torch.nn.functional.linear(self.gate.hook_in(hidden), self.gate.weight, self.gate.bias))
        up = up_proj.hook_out(torch.nn.functional.linear(up_proj.hook_in(hidden), up_proj.weight, up_proj.bias))
        inner = self.out.hook_in(self.act_fn(gate) * up)
        out = self.out.hook_out(torch.nn.functional.linear(inner, self.out.weight, self.out.bias))
        return self.hook_out(out)


class NeuronProjectorBridge(VisionProjectionBridge):
    """Two-layer projector whose hidden activation is a hooked component (``hook_hidden``)."""

    hook_aliases = {**VisionProjectionBridge.hook_aliases, "hook_hidden": "act.hook_out"}

    def __init__(self, name: str, activation: str = "act"):
        super().__init__(name, submodules={"act": GeneralizedComponent(name=activation)})


class MediaEmbeddingBridge(EmbeddingBridge):
    """The language model's token embedding, whose ``hook_out`` (TransformerLens'
    ``hook_embed``) fires on the embeddings the language model receives.

    A multimodal HF model embeds the token ids (media placeholders included), scatters the
    media features (projector, merger, Q-Former or audio output) over the placeholder rows,
    and hands the result to its decoder as ``inputs_embeds``. TransformerLens fires
    ``hook_embed`` on the first step, so at media positions it would hold the placeholder's
    embedding and TL's residual decompositions would not sum to the residual. Here
    ``hook_in`` takes the token ids, the embedding runs unhooked, and ``hook_out`` fires once
    per forward on the decoder's ``inputs_embeds`` (``feed``): what a hook returns there is
    what the decoder gets.
    """

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        """The token embedding of ``input_ids`` ``[batch, pos]`` -> ``[batch, pos, d_model]``."""
        return self.original_component(self.hook_in(input_ids), **kwargs)

    def feed(self, decoder: torch.nn.Module) -> None:
        """Route ``decoder``'s ``inputs_embeds`` through ``hook_out``; a decoder called with
        token ids instead embeds them here first (so the hook fires all the same)."""

        def route(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                if args:
                    input_ids, args = args[0], (None, *args[1:])
                else:
                    input_ids = kwargs.pop("input_ids")
                embeds = self(input_ids)
            kwargs["inputs_embeds"] = self.hook_out(embeds)
            return args, kwargs

        decoder.register_forward_pre_hook(route, with_kwargs=True)


class MediaEmbeddingAdapter:
    """Adapter mixin (first base, before the TransformerLens adapter): the ``embed``
    component becomes a ``MediaEmbeddingBridge`` fed by the decoder that runs ``blocks``,
    so ``hook_embed`` holds the embeddings the language model receives."""

    def prepare_model(self, hf_model: Any) -> None:
        super().prepare_model(hf_model)  # type: ignore[misc]
        mapping = self.components  # type: ignore[attr-defined]
        embed = MediaEmbeddingBridge(name=mapping["embed"].name)
        mapping["embed"] = embed
        embed.feed(hf_model.get_submodule(mapping["blocks"].name.rpartition(".")[0]))


class _CacheKeywordAttention:
    """Mixin: find the KV cache under either keyword. transformers 5.24+ hands it to attention
    modules as ``cache``; TransformerLens 4.3's attention bridges, which rebuild attention
    themselves, read only ``past_key_values`` (or ``layer_past``), so without this every
    cached decoding step would attend to itself alone."""

    def _update_kv_cache(self, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return super()._update_kv_cache(k, v, **kwargs)  # type: ignore[misc]


_CACHE_KEYWORD_CLASSES: dict[type, type] = {}


def read_cache_keyword(bridge: torch.nn.Module) -> int:
    """Make every attention bridge of ``bridge`` that updates a KV cache itself read the cache
    under both keywords (each instance moves to a subclass with ``_CacheKeywordAttention``).
    Returns how many modules were changed."""
    changed = 0
    for module in bridge.modules():
        cls = type(module)
        if not isinstance(module, AttentionBridge) or issubclass(cls, _CacheKeywordAttention):
            continue
        if cls not in _CACHE_KEYWORD_CLASSES:
            _CACHE_KEYWORD_CLASSES[cls] = type(cls.__name__, (_CacheKeywordAttention, cls), {"__module__": cls.__module__})
        module.__class__ = _CACHE_KEYWORD_CLASSES[cls]
        changed += 1
    return changed
