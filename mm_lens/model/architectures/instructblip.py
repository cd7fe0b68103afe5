"""InstructBLIP (``InstructBlipForConditionalGeneration``), as MMNeuron studies it: a BLIP
vision encoder, a Q-Former whose learned queries read the image (cross-attention) and the
instruction (self-attention), a linear ``language_projection`` and a Llama (Vicuna) language
model. TransformerLens has no adapter for it; ``InstructBlipNeuronAdapter`` is one.

Every image becomes ``num_query_tokens`` (32 released) feature tokens, which
``InstructBlipProcessor`` puts before each prompt, ahead of its padding. The queries are no
patches: their ModalityMap rows and columns are -1 and the layouts have no grid
(``grids=()``), ``feature`` is the query index. The Q-Former pairs each prompt's
instruction with that prompt's image, so every row of a batch holds exactly one image:
text-only rows and several images per prompt are impossible (``check_instructblip_inputs``).

Hook names (``{l}`` a layer):

- ``vision_encoder.hook_in`` pixel values; ``vision_encoder.embeddings.hook_out``
  ``[images, 1 + patches, d_vision]`` (CLS first); ``vision_encoder.encoder_layers.{l}``
  with ``ln1``, ``attn`` (``qkv``, ``o``), ``ln2``, ``mlp`` (``in``/``out``;
  ``mlp.hook_post`` = ``act(fc1 x)``, the ``vision_mlp`` neurons);
  ``vision_encoder.hook_out`` the post-layernorm image embeddings the Q-Former reads.
- ``qformer.hook_in`` the learned query tokens ``[images, queries, d_qformer]``;
  ``qformer.layers.{l}.hook_in/hook_out`` ``[images, queries + instruction, d_qformer]``;
  per layer ``attention`` and (every ``cross_attention_frequency``-th layer)
  ``crossattention``, each with ``q``, ``k``, ``v``, ``o``, ``ln``; the queries'
  ``intermediate_query`` / ``output_query`` and the instruction's ``intermediate`` /
  ``output`` (``dense``, ``ln``). ``intermediate_query.hook_act`` ``[images, queries,
  d_qformer_mlp]`` and ``intermediate.hook_act`` ``[images, instruction, d_qformer_mlp]``
  are ``act(dense x)``, the ``qformer_intermediate_query`` / ``qformer_intermediate`` neurons;
  ``qformer.hook_out`` ``[images, queries + instruction, d_qformer]``.
- ``vision_projector.hook_out`` ``[images, queries, d_model]``: ``language_projection`` of
  the queries, the rows ``ModalityMap.feature`` indexes (flattened).
- ``blocks.{l}...`` the language model as for LLaVA (``blocks.{l}.mlp.hook_act`` the
  ``lm_mlp`` neurons).

The Q-Former's instruction rows include the padding of ``qformer_attention_mask``;
statistics leave those rows out (``real_instruction_rows``).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.generalized_components import (
    BlockBridge,
    EmbeddingBridge,
    LinearBridge,
    MLPBridge,
    NormalizationBridge,
    RMSNormalizationBridge,
    RotaryEmbeddingBridge,
    UnembeddingBridge,
)
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
    PositionEmbeddingsAttentionBridge,
)

from mm_lens.model.architectures.spec import ArchitectureSpec
from mm_lens.model.architectures.bridge_components import MediaEmbeddingAdapter, NeuronGatedMLPBridge
from mm_lens.base.modality import ImageLayout

NEURON_HOOKS = {
    "lm_mlp": "blocks.{layer}.mlp.hook_act",
    "vision_mlp": "vision_encoder.encoder_layers.{layer}.mlp.hook_post",
    "qformer_intermediate": "qformer.layers.{layer}.intermediate.hook_act",
    "qformer_intermediate_query": "qformer.layers.{layer}.intermediate_query.hook_act",
}


def neuron_widths(hf_model: Any) -> dict[str, int]:
    """Neurons per layer of each neuron module."""
    config = hf_model.config
    return {
        "lm_mlp": config.text_config.intermediate_size,
        "vision_mlp": config.vision_config.intermediate_size,
        "qformer_intermediate": config.qformer_config.intermediate_size,
        "qformer_intermediate_query": config.qformer_config.intermediate_size,
    }


INERT_HOOKS = (
    "hook_pos_embed",  # TL's bridge declares it; a rotary Llama adds no position embedding
    "attn.hook_hidden_states",  # declared by TL's attention bridge; its Llama (rotary) path never fires it
    "rotary_emb.hook_out",  # TL's rotary bridge sends the (cos, sin) pair through hook_cos / hook_sin only
)


class _VisionModelBridge(GeneralizedComponent):
    """The BLIP vision model: ``hook_in`` pixel values, ``hook_out`` its last hidden state."""

    def forward(self, pixel_values: Tensor, **kwargs: Any) -> Any:
        output = self.original_component(pixel_values=self.hook_in(pixel_values), **kwargs)
        output.last_hidden_state = self.hook_out(output.last_hidden_state)
        return output


class _ListItemBridge(GeneralizedComponent):
    """One layer of a stack (vision encoder or Q-Former): ``hook_in``/``hook_out`` residual."""

    is_list_item = True


class _QFormerBridge(GeneralizedComponent):
    """The Q-Former: ``hook_in`` the learned query tokens, ``hook_out`` its last hidden state."""

    def forward(self, *args: Any, query_embeds: Tensor, **kwargs: Any) -> Any:
        output = self.original_component(*args, query_embeds=self.hook_in(query_embeds), **kwargs)
        output.last_hidden_state = self.hook_out(output.last_hidden_state)
        return output


class _QFormerIntermediateBridge(GeneralizedComponent):
    """``act(dense x)`` of a Q-Former feed-forward: its output is the neuron activation."""

    hook_aliases = {"hook_act": "hook_out"}

    def __init__(self, name: str):
        super().__init__(name, submodules={"dense": LinearBridge(name="dense")})


def _layer_norm(name: str, config: Any) -> NormalizationBridge:
    # HF's own LayerNorm forward (its eps), with hook_scale/hook_normalized still firing.
    return NormalizationBridge(name=name, config=config, use_native_layernorm_autograd=True)


def _qformer_attention(name: str, config: Any, optional: bool = False) -> GeneralizedComponent:
    submodules = {
        "q": LinearBridge(name="attention.query"),
        "k": LinearBridge(name="attention.key"),
        "v": LinearBridge(name="attention.value"),
        "o": LinearBridge(name="output.dense"),
        "ln": _layer_norm("output.LayerNorm", config),
    }
    return GeneralizedComponent(name=name, submodules=submodules, optional=optional)


def _qformer_output(name: str, config: Any) -> GeneralizedComponent:
    return GeneralizedComponent(name=name, submodules={"dense": LinearBridge(name="dense"), "ln": _layer_norm("LayerNorm", config)})


class InstructBlipNeuronAdapter(MediaEmbeddingAdapter, ArchitectureAdapter):
    """TransformerLens adapter for ``InstructBlipForConditionalGeneration`` with a Llama
    language model, with mm_lens' neuron hooks (see the module docstring for the names)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.is_multimodal = True
        self._set_rms_rotary_defaults()
        self.cfg.attn_implementation = "eager"
        self._extract_vision_dims(cfg)
        self.weight_processing_conversions = {
            **self._qkvo_weight_conversions(n_kv_heads=getattr(cfg, "n_key_value_heads", None)),
        }
        cfg = self.cfg
        vision_layer = _ListItemBridge(
            name="encoder.layers",
            submodules={
                "ln1": _layer_norm("layer_norm1", cfg),
                "attn": GeneralizedComponent(
                    name="self_attn", submodules={"qkv": LinearBridge(name="qkv"), "o": LinearBridge(name="projection")}
                ),
                "ln2": _layer_norm("layer_norm2", cfg),
                "mlp": MLPBridge(name="mlp", submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")}),
            },
        )
        qformer_layer = _ListItemBridge(
            name="encoder.layer",
            submodules={
                "attention": _qformer_attention("attention", cfg),
                "crossattention": _qformer_attention("crossattention", cfg, optional=True),
                "intermediate": _QFormerIntermediateBridge("intermediate"),
                "output": _qformer_output("output", cfg),
                "intermediate_query": _QFormerIntermediateBridge("intermediate_query"),
                "output_query": _qformer_output("output_query", cfg),
            },
        )
        self.component_mapping = {
            "vision_encoder": _VisionModelBridge(
                name="vision_model",
                submodules={"embeddings": GeneralizedComponent(name="embeddings"), "encoder_layers": vision_layer},
            ),
            "qformer": _QFormerBridge(name="qformer", submodules={"layers": qformer_layer}),
            "vision_projector": LinearBridge(name="language_projection"),
            "embed": EmbeddingBridge(name="language_model.model.embed_tokens"),
            "rotary_emb": RotaryEmbeddingBridge(name="language_model.model.rotary_emb"),
            "blocks": BlockBridge(
                name="language_model.model.layers",
                submodules={
                    "ln1": RMSNormalizationBridge(name="input_layernorm", config=cfg),
                    "ln2": RMSNormalizationBridge(name="post_attention_layernorm", config=cfg),
                    "attn": PositionEmbeddingsAttentionBridge(
                        name="self_attn",
                        config=cfg,
                        submodules={
                            "q": LinearBridge(name="q_proj"),
                            "k": LinearBridge(name="k_proj"),
                            "v": LinearBridge(name="v_proj"),
                            "o": LinearBridge(name="o_proj"),
                        },
                        requires_attention_mask=True,
                        requires_position_embeddings=True,
                    ),
                    "mlp": NeuronGatedMLPBridge(name="mlp", config=cfg, submodules=dict(self._gated_mlp().submodules)),
                },
            ),
            "ln_final": RMSNormalizationBridge(name="language_model.model.norm", config=cfg),
            "unembed": UnembeddingBridge(name="language_model.lm_head", config=cfg),
        }

    def prepare_loading(self, model_name: str, model_kwargs: dict) -> None:
        """Refuse, before any weight is loaded, a language model this mapping does not describe."""
        super().prepare_loading(model_name, model_kwargs)
        text_type = model_kwargs["config"].text_config.model_type
        if text_type != "llama":
            raise ValueError(
                f"mm_lens supports InstructBLIP with a Llama (Vicuna) language model, as MMNeuron studies it; "
                f"this checkpoint's language model is {text_type!r}"
            )

    def prepare_model(self, hf_model: Any) -> None:
        """TL's HF driver passes ``input_ids`` positionally, but InstructBLIP's forward takes
        ``pixel_values`` first: a leading integer tensor goes to ``input_ids`` (TL's own
        adapters patch forwards likewise, e.g. BD3LM's); float pixel values pass as before."""
        super().prepare_model(hf_model)
        forward = hf_model.forward

        @functools.wraps(forward)
        def forward_taking_token_ids_first(*args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], Tensor) and not args[0].is_floating_point() and "input_ids" not in kwargs:
                kwargs["input_ids"], args = args[0], args[1:]
            return forward(*args, **kwargs)

        hf_model.forward = forward_taking_token_ids_first


def instructblip_layouts(config: Any, inputs: Mapping[str, Any]) -> list[ImageLayout]:
    """Every image is ``num_query_tokens`` query features."""
    pixel_values = inputs.get("pixel_values")
    n_images = 0 if pixel_values is None else pixel_values.shape[0]
    return [ImageLayout.sequence(config.num_query_tokens) for _ in range(n_images)]


_ONE_IMAGE = (
    "InstructBLIP takes exactly one image per prompt (its Q-Former reads each prompt's instruction "
    "with that prompt's image), so text-only rows and several images per prompt are not possible"
)


def check_instructblip_inputs(config: Any, inputs: Mapping[str, Any]) -> None:
    """One image, one Q-Former instruction row and ``num_query_tokens`` image tokens per row."""
    input_ids: Int[Tensor, "batch pos"] = inputs["input_ids"]
    rows, pixel_values = input_ids.shape[0], inputs.get("pixel_values")
    if pixel_values is None or pixel_values.shape[0] != rows:
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        raise ValueError(f"the batch has {rows} prompt(s) but {n_images} image(s); {_ONE_IMAGE}")
    qformer_ids, qformer_mask = inputs.get("qformer_input_ids"), inputs.get("qformer_attention_mask")
    if qformer_ids is None or qformer_ids.ndim != 2 or qformer_ids.shape[0] != rows:
        found = "none" if qformer_ids is None else f"shape {tuple(qformer_ids.shape)}"
        raise ValueError(
            f"qformer_input_ids must hold the instruction of each of the {rows} prompts ([{rows}, length]), "
            f"got {found}; build inputs with the model's processor"
        )
    if qformer_mask is not None and tuple(qformer_mask.shape) != tuple(qformer_ids.shape):
        raise ValueError(
            f"qformer_attention_mask has shape {tuple(qformer_mask.shape)} but qformer_input_ids has "
            f"{tuple(qformer_ids.shape)}; they must match"
        )
    per_row = (input_ids == config.image_token_id).sum(dim=1)
    wrong = torch.nonzero(per_row != config.num_query_tokens).flatten()
    if len(wrong):
        row = int(wrong[0])
        raise ValueError(
            f"row {row} holds {int(per_row[row])} image tokens but InstructBLIP puts num_query_tokens "
            f"({config.num_query_tokens}) before every prompt; let the processor add them (write no image "
            f"token in the prompt); {_ONE_IMAGE}"
        )


def real_instruction_rows(config: Any, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
    """``qformer_intermediate``: ``[images, instruction]``, the non-padding instruction tokens
    of each image's Q-Former input (one image per row)."""
    mask = inputs.get("qformer_attention_mask")
    return {} if mask is None else {"qformer_intermediate": torch.as_tensor(mask).bool().cpu()}


def mask_positions(config: Any, inputs: Mapping[str, Any]) -> dict[str, Int[Tensor, "batch pos"]]:
    """``position_ids`` counting each row's attended tokens, as HF's ``generate`` (and LAVIS)
    number them: the processor puts the query tokens before the padding, so under left
    padding HF's forward alone would leave a gap between a row's queries and its text. The
    bridge numbers positions this way by itself; the batch carries them so that the same
    batch given to the HF model (references, ``generate``) means the same thing."""
    mask = inputs["attention_mask"].long()
    return {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)}


INSTRUCTBLIP = ArchitectureSpec(
    hf_class="InstructBlipForConditionalGeneration",
    adapter=InstructBlipNeuronAdapter,
    neuron_hooks=NEURON_HOOKS,
    neuron_widths=neuron_widths,
    layouts=instructblip_layouts,
    input_names=("pixel_values", "qformer_input_ids", "qformer_attention_mask"),
    inert_hooks=INERT_HOOKS,
    check_inputs=check_instructblip_inputs,
    image_geometry=None,
    encoder_rows=real_instruction_rows,
    prompt_only_inputs=("qformer_input_ids", "qformer_attention_mask"),
    derived_inputs=mask_positions,
    prompt_placeholders=False,
)
SPECS = (INSTRUCTBLIP,)
