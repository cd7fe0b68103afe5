"""Hook names of the language model and the one ``layers=`` policy.

Names follow TransformerLens: ``blocks.{layer}.{point}`` with ``point`` such as
``hook_resid_pre``, ``hook_resid_mid``, ``hook_resid_post``, ``hook_attn_out``,
``hook_mlp_out``, ``attn.hook_pattern``, ``attn.hook_attn_scores``, ``attn.hook_rot_q`` or
mm_lens' ``mlp.hook_act`` (the neurons). ``LM_POINTS`` names the short kinds analyses take.
"""

from __future__ import annotations

import operator
import re
from typing import Callable, Sequence

LM_POINTS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_act": "mlp.hook_act",
    "pattern": "attn.hook_pattern",
    "attn_scores": "attn.hook_attn_scores",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def block_hook(layer: int, point: str) -> str:
    """``blocks.{layer}.{point}``; ``point`` is a full point (``"mlp.hook_act"``) or a kind of
    ``LM_POINTS`` (``"resid_post"``)."""
    return f"blocks.{layer}.{LM_POINTS.get(point, point)}"


def parse_block_hook(name: str) -> tuple[int, str]:
    """``(layer, point)`` of a language-model block hook name; ``ValueError`` otherwise."""
    match = _BLOCK.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a language-model block hook (blocks.<layer>.<point>)")
    return int(match.group(1)), match.group(2)


def is_language_model_hook(name: str) -> bool:
    """True for the language model's block hooks (``blocks.*``), False for encoder,
    projector and embedding hooks."""
    return _BLOCK.match(name) is not None


def language_model_filter(point: str | None = None) -> Callable[[str], bool]:
    """A ``names_filter`` selecting the language model's block hooks only (``blocks.*``), and
    among them those ending in ``point`` (a full point or an ``LM_POINTS`` kind): a plain
    ``lambda n: n.endswith("mlp.hook_post")`` also catches the vision tower's MLPs."""
    suffix = None if point is None else LM_POINTS.get(point, point)
    return lambda name: is_language_model_hook(name) and (suffix is None or name.endswith("." + suffix))


def encoder_filter(point: str | None = None) -> Callable[[str], bool]:
    """A ``names_filter`` selecting every hook outside the language model's blocks (vision or
    audio tower, projector, embeddings), optionally only those ending in ``point``."""
    return lambda name: not is_language_model_hook(name) and (point is None or name.endswith(point))


def resolve_layers(layers: object, n_layers: int) -> list[int]:
    """The layers a ``layers=`` argument (``int | Sequence[int] | None``) names, in the given
    order: ``None`` -> every layer, an int -> that layer, a sequence -> its layers. Each must
    be an integer in ``[0, n_layers)`` and appear once; anything else is a ``ValueError``
    saying so (so ``layers`` is annotated ``object``: this is where it is checked)."""
    if layers is None:
        return list(range(n_layers))
    chosen = [layers] if not isinstance(layers, Sequence) else list(layers)
    if not chosen:
        raise ValueError("layers is empty; pass None for every layer, or layer indices")
    checked = []
    for layer in chosen:
        try:
            if isinstance(layer, bool):
                raise TypeError
            layer = operator.index(layer)
        except TypeError:
            raise ValueError(f"layers holds {layer!r}; pass integer layer indices") from None
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range: the language model has {n_layers} layers (valid 0..{n_layers - 1})")
        if layer in checked:
            raise ValueError(f"layer {layer} is named twice in layers={chosen}; name each layer once")
        checked.append(layer)
    return checked
