"""Bridge components that expose the neurons both papers study as TransformerLens hooks.

TransformerLens' bridge has no hook on ``act_fn(gate_proj(x))`` in a gated MLP (its
``mlp.hook_post`` is ``act_fn(gate) * up``) nor on the projector's hidden activation. These
subclasses wrap the HF activation modules as bridge components, which gives:

- ``blocks.{l}.mlp.hook_act``: ``act_fn(gate_proj(x))``, ``[batch, pos, d_mlp]``;
- ``vision_projector.hook_hidden``: ``act(linear_1(x))``, ``[images, tokens, d_proj]``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.model_bridge.generalized_components import AttentionBridge, GatedMLPBridge, VisionProjectionBridge
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
