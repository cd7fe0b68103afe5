"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): a Whisper-style audio encoder, a
single linear projector (no hidden neurons) and a Qwen2 language model.

Each clip is padded to the encoder's fixed input length; HF keeps the first ``N`` projected
features of a clip of ``L`` unpadded mel frames (``N`` after the stride-2 convolution and the
stride-2 average pool) and scatters them, clip after clip, over the audio tokens.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    LinearBridge,
    MLPBridge,
    NormalizationBridge,
)
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.opaque_block import OpaqueBlockBridge
from transformer_lens.model_bridge.supported_architectures.qwen2_audio import Qwen2AudioArchitectureAdapter

from mm_lens.model.architectures.spec import ArchitectureSpec
from mm_lens.model.architectures.bridge_components import MediaEmbeddingAdapter, NeuronGatedMLPBridge
from mm_lens.base.modality import ImageLayout

NEURON_HOOKS = {
    "lm_mlp": "blocks.{layer}.mlp.hook_act",
    "audio_mlp": "audio_encoder.encoder_layers.{layer}.mlp.hook_post",
}


def neuron_widths(hf_model: Any) -> dict[str, int]:
    config = hf_model.config
    return {"lm_mlp": config.text_config.intermediate_size, "audio_mlp": config.audio_config.encoder_ffn_dim}


# Declared by TransformerLens' bridges but never fired by HF's forward here (as for LLaVA):
# attention bridges' hook_hidden_states, the rotary module's output, and the top-level
# hook_pos_embed alias (rotary positions, no position embedding).
INERT_HOOKS = ("attn.hook_hidden_states", "rotary_emb.hook_out", "hook_pos_embed")


def _audio_encoder(audio: Any, cfg: Any) -> GeneralizedComponent:
    """The audio tower (HF ``audio_config`` ``audio``) with one hooked component per
    Whisper layer: norms, attention (with the audio heads), and the MLP whose ``hook_post``
    is ``act(fc1(x))``."""
    heads = SimpleNamespace(n_heads=audio.encoder_attention_heads, d_model=audio.d_model, d_head=audio.d_model // audio.encoder_attention_heads)
    norm = {"config": cfg, "use_native_layernorm_autograd": True}
    attention = {name: LinearBridge(name=f"{name}_proj") for name in ("q", "k", "v")} | {"o": LinearBridge(name="out_proj")}
    layer = OpaqueBlockBridge(
        name="layers",
        submodules={
            "ln1": NormalizationBridge(name="self_attn_layer_norm", **norm),
            "attn": AttentionBridge(name="self_attn", config=heads, submodules=attention),
            "ln2": NormalizationBridge(name="final_layer_norm", **norm),
            # fc1/fc2 sit on the layer itself: a containerless MLP (its forward never runs)
            "mlp": MLPBridge(name=None, config=cfg, submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")}),
        },
    )
    return GeneralizedComponent(name="model.audio_tower", submodules={"encoder_layers": layer})


class Qwen2AudioNeuronAdapter(MediaEmbeddingAdapter, Qwen2AudioArchitectureAdapter):
    """TransformerLens' Qwen2-Audio adapter plus ``mlp.hook_act`` and per-layer hooks in
    the audio encoder (``audio_encoder.encoder_layers.{l}``)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        blocks = self.components["blocks"]
        blocks.submodules["mlp"] = NeuronGatedMLPBridge(name="mlp", config=self.cfg, submodules=dict(blocks.submodules["mlp"].submodules))

    def prepare_model(self, hf_model: Any) -> None:
        """The audio tower's layer count and heads come from the loaded model's config
        (TransformerLens' config keeps the language model's only)."""
        super().prepare_model(hf_model)
        self.components["audio_encoder"] = _audio_encoder(hf_model.config.audio_config, self.cfg)

    def setup_hook_compatibility(self, bridge: Any) -> None:
        """Per-head shapes for the audio attention hooks (``hook_q`` ``[clips, frames, heads,
        d_head]``): TransformerLens sets them up for its own block lists and vision tower only."""
        for layer in bridge.audio_encoder.encoder_layers:
            layer.attn.setup_hook_compatibility()


def _mel_frames(inputs: Mapping[str, Any]) -> Int[Tensor, "clip"]:
    """Unpadded mel frames of each clip, from ``feature_attention_mask``."""
    return torch.as_tensor(inputs["feature_attention_mask"]).sum(-1).cpu()


def _encoder_frames(frames: Int[Tensor, "clip"]) -> Int[Tensor, "clip"]:
    """Encoder positions of clips of ``frames`` mel frames: the stride-2 convolution."""
    return (frames - 1) // 2 + 1


def audio_token_counts(frames: Int[Tensor, "clip"]) -> Int[Tensor, "clip"]:
    """Audio tokens of clips of ``frames`` unpadded mel frames: the stride-2 convolution,
    then the stride-2 average pool (HF's ``_get_feat_extract_output_lengths``)."""
    return (_encoder_frames(frames) - 2) // 2 + 1


def qwen2_audio_layouts(config: Any, inputs: Mapping[str, Any]) -> list[ImageLayout]:
    """One layout per clip (row of ``input_features``), its length from ``feature_attention_mask``."""
    if inputs.get("input_features") is None:
        return []
    return [ImageLayout.sequence(int(n), "audio") for n in audio_token_counts(_mel_frames(inputs))]


def real_encoder_frames(config: Any, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
    """``audio_mlp``: ``[clips, max_source_positions]``, True on the encoder frames of each
    clip's unpadded audio; the encoder also runs on the padding up to its fixed length."""
    if inputs.get("input_features") is None:
        return {}
    frames = _encoder_frames(_mel_frames(inputs))
    positions = torch.arange(config.audio_config.max_source_positions)
    return {"audio_mlp": positions[None, :] < frames[:, None]}


def check_audio_inputs(config: Any, inputs: Mapping[str, Any]) -> None:
    """``input_features`` ``[clips, mel, frames]`` come with a ``feature_attention_mask``
    ``[clips, frames]``, have the encoder's mel bins and input length, and every clip gives
    at least one audio token."""
    features, mask = inputs.get("input_features"), inputs.get("feature_attention_mask")
    if features is None:
        return
    if mask is None:
        raise ValueError("input_features need their feature_attention_mask (one row per clip); build inputs with the model's processor")
    audio = config.audio_config
    expected = (audio.num_mel_bins, 2 * audio.max_source_positions)
    if features.ndim != 3 or tuple(features.shape[1:]) != expected:
        raise ValueError(
            f"input_features have shape {tuple(features.shape)} but the audio encoder takes [clips, {expected[0]}, {expected[1]}] "
            "(mel bins, frames padded to the encoder's length); build them with the model's feature extractor"
        )
    if tuple(mask.shape) != (features.shape[0], features.shape[2]):
        raise ValueError(
            f"feature_attention_mask has shape {tuple(mask.shape)} but input_features describe {features.shape[0]} clips "
            f"of {features.shape[2]} frames; pass one mask row per clip"
        )
    counts = audio_token_counts(_mel_frames(inputs))
    if (counts < 1).any():
        clips = torch.nonzero(counts < 1).flatten().tolist()
        raise ValueError(f"audio clips {clips} are too short to give an audio token; pass clips of at least 3 mel frames")


QWEN2_AUDIO = ArchitectureSpec(
    hf_class="Qwen2AudioForConditionalGeneration",
    adapter=Qwen2AudioNeuronAdapter,
    neuron_hooks=NEURON_HOOKS,
    neuron_widths=neuron_widths,
    layouts=qwen2_audio_layouts,
    input_names=("input_features", "feature_attention_mask"),
    feature_inputs={"audio": "input_features"},
    token_attributes={"audio": "audio_token_id"},
    inert_hooks=INERT_HOOKS,
    check_inputs=check_audio_inputs,
    encoder_modality="audio",
    image_geometry=None,
    encoder_rows=real_encoder_frames,
)
SPECS = (QWEN2_AUDIO,)
