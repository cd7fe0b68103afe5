"""``ArchitectureSpec``: what mm_lens knows of one HF multimodal architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

from mm_lens.base.modality import ImageLayout


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no mm_lens adapter."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """What mm_lens needs to know about one HF multimodal architecture.

    ``neuron_hooks``: neuron-module name -> hook name, with ``{layer}`` for per-layer modules.
    ``neuron_widths(hf_model)``: neuron-module name -> neurons per layer.
    ``layouts(config, inputs)``: one ``ImageLayout`` per media item of a batch, images first,
    then videos, then audio clips (each kind in prompt order).
    ``input_names``: the HF keyword inputs that carry the media (features and their sizes).
    ``feature_inputs``: modality -> the HF input holding its features (checked against the
    placeholder tokens). ``token_attributes``: modality -> the config attribute holding its
    placeholder token id.
    ``inert_hooks``: hook-name suffixes TransformerLens declares but never fires for this
    architecture outside compatibility mode (listed in docs/hooks.md).
    ``check_inputs(config, inputs)``: architecture-specific input checks (raise ValueError).
    ``encoder_modality``: the modality whose items feed the non-language-model neuron hooks.
    ``encoder_modalities``: where the encoder also takes other items, all the modalities it
    takes, in the order HF runs it on them within one forward (Qwen2-VL: images, then
    videos); default ``(encoder_modality,)``.
    ``nested_images``: the processor takes one list of images per prompt (Gemma 3), not one
    flat list.
    ``image_geometry``: where a view's patch grid lies on the original picture, for heatmaps:
    ``"llava"`` (computed from the LLaVA/LLaVA-NeXT image processor, see mm_lens.presentation.visualize),
    ``"whole"`` (every view's grid spans the whole picture, resized without crop or pad), or
    ``None`` (the items have no patch grid, e.g. Q-Former queries or audio).
    ``derived_inputs(config, inputs)``: HF inputs ``prepare_inputs`` adds to the processor's
    (InstructBLIP: ``position_ids``, as its processor puts the image tokens before the padding).
    ``encoder_rows(config, inputs)``: encoder neuron module -> ``[units, rows]`` bool mask of
    the rows of its hooks that are real (the rest is padding the encoder runs on: Qwen2-Audio's
    padded frames, the Q-Former's padded instruction); statistics count real rows only.
    ``prompt_only_inputs``: HF inputs the processor derives from the prompt text that must
    not see an answer appended for teacher forcing (InstructBLIP's Q-Former instruction).
    ``prompt_placeholders``: the prompt text holds one placeholder token per media item; False
    where the processor inserts the feature tokens itself (InstructBLIP).
    """

    hf_class: str
    adapter: type[ArchitectureAdapter]
    neuron_hooks: Mapping[str, str]
    neuron_widths: Callable[[Any], Mapping[str, int]]
    layouts: Callable[[Any, Mapping[str, Any]], Sequence[ImageLayout]]
    input_names: tuple[str, ...]
    feature_inputs: Mapping[str, str] = field(default_factory=lambda: {"image": "pixel_values"})
    token_attributes: Mapping[str, str] = field(default_factory=lambda: {"image": "image_token_id"})
    inert_hooks: tuple[str, ...] = ()
    check_inputs: Callable[[Any, Mapping[str, Any]], None] | None = None
    encoder_modality: str = "image"
    encoder_modalities: tuple[str, ...] = ()
    nested_images: bool = False
    image_geometry: str | None = "llava"
    derived_inputs: Callable[[Any, Mapping[str, Any]], Mapping[str, Any]] | None = None
    prompt_placeholders: bool = True
    encoder_rows: Callable[[Any, Mapping[str, Any]], Mapping[str, Any]] | None = None
    prompt_only_inputs: tuple[str, ...] = ()

    def encoder_calls(self) -> tuple[str, ...]:
        """The modalities the encoder takes, in the order of its calls within one forward."""
        return self.encoder_modalities or (self.encoder_modality,)

    def token_ids(self, config: Any) -> dict[str, int]:
        """Modality -> placeholder token id of this model's config."""
        return {modality: int(getattr(config, attribute)) for modality, attribute in self.token_attributes.items()}
