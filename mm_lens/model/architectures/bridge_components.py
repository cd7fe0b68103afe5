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

import contextlib
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    EmbeddingBridge,
    GatedMLPBridge,
    VisionProjectionBridge,
)
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

from mm_lens.base.fast_path import agreeing


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


# --- attention through SDPA when no hook needs the pattern -------------------------------

CACHE_KEYWORDS = ("past_key_values", "past_key_value", "cache", "layer_past")  # the KV cache, by its names across versions
_QKV_FLAGS = ("use_split_qkv_input", "use_attn_in", "use_attn_result", "gated_q_proj")
SDPA_CHECKED: dict[type, bool] = {}  # the self-check's verdict per attention class; clear it to check again


class _SdpaAttention:
    """Mixin: attention through ``torch.nn.functional.scaled_dot_product_attention`` when
    nothing needs the ``[batch, head, query, key]`` pattern.

    TransformerLens rebuilds attention eagerly so that ``hook_attn_scores`` and
    ``hook_pattern`` fire: O(T^2) memory per head and layer. A run that hooks neither (nor
    ``hook_rot_q/k``, ``hook_q/k_normed``, ``hook_cos/sin``: every hook point of the bridge
    itself but ``hook_in``/``hook_out``) gets the HF attention module itself, run with HF's
    SDPA function and the mask the decoder built (sliding windows, bidirectional image
    spans, padding included); its ``q/k/v/o`` projections are the bridge's linear
    components, so ``hook_q/k/v/z`` fire as before. A self-checking fast path: the first call
    per attention class and process is compared with the eager path (hooks muted).
    """

    sdpa = True

    def _eager_only_hooked(self) -> bool:
        for name, child in self._modules.items():  # type: ignore[attr-defined]
            if isinstance(child, HookPoint) and name not in ("hook_in", "hook_out"):
                if child._forward_hooks or child._forward_pre_hooks or child._backward_hooks or child._backward_pre_hooks:
                    return True
        return False

    def _sdpa_allowed(self, kwargs: dict) -> bool:
        hf = self.original_component  # type: ignore[attr-defined]
        config = getattr(self, "config", None)
        return (
            self.sdpa
            and hf is not None
            and hasattr(getattr(hf, "config", None), "_attn_implementation_internal")
            and not kwargs.get("output_attentions")
            and not (self.training and getattr(hf, "attention_dropout", 0.0))  # type: ignore[attr-defined]
            and getattr(hf, "attn_logit_softcapping", None) is None
            and getattr(hf, "sinks", None) is None
            and not getattr(self, "requires_relative_position_bias", False)
            and not getattr(hf, "accepts_pattern_fn", False)
            and not any(getattr(config, flag, False) for flag in _QKV_FLAGS)
            and not self._eager_only_hooked()
        )

    def _sdpa_forward(self, *args: Any, **kwargs: Any) -> Any:
        config = self.original_component.config  # type: ignore[attr-defined]
        if getattr(self.original_component, "is_causal", False) and _plainly_causal(kwargs.get("attention_mask")):  # type: ignore[attr-defined]
            kwargs["attention_mask"] = None  # SDPA's is_causal skips the masked half of the blocks
        before = config._attn_implementation_internal
        config._attn_implementation_internal = "sdpa"
        try:
            return AttentionBridge.forward(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            config._attn_implementation_internal = before

    def _sdpa_agrees(self, args: tuple, kwargs: dict) -> bool:
        """Both paths once, hooks muted and without the KV cache; ``True`` when they agree."""
        kwargs = {k: (None if k in CACHE_KEYWORDS else v) for k, v in kwargs.items()}
        points = [m for m in self.modules() if isinstance(m, HookPoint)]  # type: ignore[attr-defined]
        saved = [(m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks) for m in points]
        try:
            for m in points:
                m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks = {}, {}, {}, {}
            with torch.no_grad():
                plain = super().forward(*args, **kwargs)  # type: ignore[misc]
                agreed = agreeing(
                    "SDPA attention", lambda: self._sdpa_forward(*args, **kwargs), _first(plain), view=_first, rtol=1e-4
                )
        finally:
            for m, hooks in zip(points, saved):
                m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks = hooks
        return agreed is not None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._sdpa_allowed(kwargs):
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        cls = type(self)
        if cls not in SDPA_CHECKED:
            if any(_filled(kwargs.get(k)) for k in CACHE_KEYWORDS):
                return super().forward(*args, **kwargs)  # type: ignore[misc]
            SDPA_CHECKED[cls] = self._sdpa_agrees(args, kwargs)
        if not SDPA_CHECKED[cls]:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        return self._sdpa_forward(*args, **kwargs)


_CAUSAL_SEEN: list = [None, False]  # (weak reference to the last mask checked, its verdict)


def _plainly_causal(mask: Any) -> bool:
    """Whether ``mask`` ``[batch, 1, pos, pos]`` (additive or boolean) is the plain causal
    mask: no padding, window or bidirectional span. Checked once per mask tensor (every
    layer of a forward gets the same one)."""
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[-1] != mask.shape[-2] or mask.shape[1] != 1:
        return False
    seen, verdict = _CAUSAL_SEEN
    if seen is None or seen() is not mask:
        allowed = mask if mask.dtype == torch.bool else mask == 0
        causal = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
        verdict = bool(torch.equal(allowed, causal.expand_as(allowed)))
        _CAUSAL_SEEN[:] = [weakref.ref(mask), verdict]
    return verdict


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _filled(cache: Any) -> bool:
    """Whether a KV cache already holds positions (a check then cannot rerun the step)."""
    if cache is None:
        return False
    length = getattr(cache, "get_seq_length", None)
    return True if length is None else bool(length())


@contextlib.contextmanager
def sdpa_attention(bridge: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within: every attention bridge of ``bridge`` (installed by ``attend_through_sdpa``)
    runs through SDPA when no hook needs its pattern (``enabled=False``: eager); on exit
    each goes back to what it was."""
    before = [(m, m.sdpa) for m in bridge.modules() if isinstance(m, _SdpaAttention)]
    for module, _ in before:
        module.sdpa = enabled
    try:
        yield
    finally:
        for module, state in before:
            module.sdpa = state


def attend_through_sdpa(bridge: torch.nn.Module, enabled: bool = True) -> int:
    """Let every attention bridge of ``bridge`` run through SDPA when no hook needs its
    pattern (``enabled=False``: the eager TransformerLens path until ``sdpa_attention``
    turns it on). Returns how many attention modules there are."""
    modules = _mix_into(bridge, AttentionBridge, _SdpaAttention)
    for module in modules:
        module.sdpa = enabled
    return len(modules)


_MIXED_CLASSES: dict[tuple[type, type], type] = {}


def _mix_into(bridge: torch.nn.Module, base: type, mixin: type) -> list[torch.nn.Module]:
    """Every ``base`` module of ``bridge``, its class swapped (once) for a subclass that puts
    ``mixin`` first, one such class per original class; returns the modules."""
    modules = [m for m in bridge.modules() if isinstance(m, base)]
    for module in modules:
        cls = type(module)
        if not issubclass(cls, mixin):
            if (mixin, cls) not in _MIXED_CLASSES:
                _MIXED_CLASSES[mixin, cls] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
            module.__class__ = _MIXED_CLASSES[mixin, cls]
    return modules


class _UnwatchedNormSkipsItsHookValues:
    """TransformerLens' native normalisation path computes ``hook_scale`` and
    ``hook_normalized`` (centring, variance, square roots: several passes over the
    activations) and then, unless a hook edited them, returns the HF module's own output.
    With no hook on either point nobody can see or edit them: this returns the HF module's
    output at once (the same tensor the full path returns; ~3% of a forward at 2,968
    positions, in CLIP's 14 layer norms)."""

    def _hf_autograd_forward_with_hooks(self, x: Tensor) -> Tensor:
        points = (self.hook_scale, self.hook_normalized)  # type: ignore[attr-defined]
        watched = any(p._forward_hooks or p._forward_pre_hooks or p._backward_hooks or p.bwd_hooks or p.fwd_hooks for p in points)
        component = self.original_component  # type: ignore[attr-defined]
        if watched or component is None or isinstance(component, torch.nn.Identity):
            return super()._hf_autograd_forward_with_hooks(x)  # type: ignore[misc]
        result = component(x)
        return result if result.dtype == x.dtype else result.to(x.dtype)


def skip_unwatched_norm_hooks(bridge: torch.nn.Module) -> int:
    """Give every normalisation bridge of ``bridge`` the shortcut of
    ``_UnwatchedNormSkipsItsHookValues``; returns how many there are."""
    return len(_mix_into(bridge, NormalizationBridge, _UnwatchedNormSkipsItsHookValues))
