"""Per-architecture knowledge, one small module each: which TL adapter (with mm_lens' extra
neuron hooks) boots the model, which hooks are its neuron modules, and how each image's
features are laid out in the token sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

from mm_lens.modality import ImageLayout


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no mm_lens adapter."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """What mm_lens needs to know about one HF multimodal architecture.

    ``neuron_hooks``: neuron-module name -> hook name, with ``{layer}`` for per-layer modules.
    ``neuron_widths(hf_model)``: neuron-module name -> neurons per layer.
    ``image_layouts(config, inputs)``: one ``ImageLayout`` per image of a batch.
    ``image_input_names``: the HF keyword inputs that carry the images.
    ``inert_hooks``: hook-name suffixes TransformerLens declares but never fires for this
    architecture outside compatibility mode (listed in docs/hooks.md).
    """

    hf_class: str
    adapter: type[ArchitectureAdapter]
    neuron_hooks: Mapping[str, str]
    neuron_widths: Callable[[Any], Mapping[str, int]]
    image_layouts: Callable[[Any, Mapping[str, Any]], Sequence[ImageLayout]]
    image_input_names: tuple[str, ...]
    inert_hooks: tuple[str, ...] = ()


def _registry() -> dict[str, ArchitectureSpec]:
    from mm_lens.architectures import llava

    return {spec.hf_class: spec for spec in (llava.LLAVA, llava.LLAVA_NEXT)}


ARCHITECTURES: dict[str, ArchitectureSpec] = _registry()


def spec_for(config: Any) -> ArchitectureSpec:
    """The spec of a HF config's architecture, or an error listing the supported ones."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(names) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise UnsupportedArchitectureError(
        f"mm_lens has no adapter for {found}; supported architectures: {', '.join(sorted(ARCHITECTURES))}"
    )
