"""``HookedMLLM``: a multimodal HF model on TransformerLens' ``TransformerBridge``.

Calls take the HF model's own keyword inputs (``input_ids``, ``attention_mask``,
``pixel_values``, ``image_sizes``, ...) or a ``MultimodalBatch``; every TL tool
(``run_with_hooks``, ``run_with_cache``, ``hooks()``, hook names, ``ActivationCache`` and its
residual decompositions) works on image tokens as on text: ``hook_embed`` holds the
embeddings the language model receives, media features included (see
``architectures.bridge_components.MediaEmbeddingBridge``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from unittest import mock

import torch
import transformers
from transformer_lens import ActivationCache
from transformer_lens.factories import architecture_adapter_factory as tl_adapter_factory
from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources.transformers import helpers as tl_loader_helpers
from transformers import AutoConfig, AutoProcessor, Cache

from mm_lens.model.architectures import ArchitectureSpec, spec_for
from mm_lens.model.architectures.bridge_components import attend_through_sdpa, read_cache_keyword, sdpa_attention, skip_unwatched_norm_hooks
from mm_lens.model.generation import Generation, StepRecorder, ended_rows, sequence_batch
from mm_lens.model.inputs import ImagesPerPrompt, MediaPerPrompt, MultimodalBatch, encode
from mm_lens.base.modality import MODALITIES, ModalityMap, build_modality_map

ASSETS = Path(__file__).parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "default_model"


@contextlib.contextmanager
def _booting_with(spec: ArchitectureSpec) -> Iterator[None]:
    """Select mm_lens' adapter for this boot only (through TL's ``register_adapter``
    extension point; TL's own adapter, if any, is put back after), let TL's HF loader
    recognise an architecture it has no adapter of its own for (it looks names up in
    ``SUPPORTED_ARCHITECTURES``, which ``register_adapter`` does not extend) and never let
    TL install packages."""
    previous = ArchitectureAdapterFactory._adapters.get(spec.hf_class)
    ArchitectureAdapterFactory.register_adapter(spec.hf_class, spec.adapter)
    try:
        with (
            mock.patch.object(tl_loader_helpers, "_ensure_torchvision", lambda: False),
            mock.patch.dict(tl_adapter_factory.SUPPORTED_ARCHITECTURES, {spec.hf_class: spec.adapter}),
        ):
            yield
    finally:
        if previous is None:
            ArchitectureAdapterFactory._adapters.pop(spec.hf_class, None)
        else:
            ArchitectureAdapterFactory.register_adapter(spec.hf_class, previous)


def resolve_model(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """``"default"`` -> the shipped model organism's folder; a local folder -> itself, checked
    at once (it must exist and hold ``config.json``); a hub name is left to HF, and refused
    at once when the hub is off (``HF_HUB_OFFLINE``) and no such folder exists."""
    if str(name_or_path) != "default":
        path, text = Path(name_or_path).expanduser(), str(name_or_path)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        looks_local = isinstance(name_or_path, Path) or text.startswith(("/", ".", "~")) or os.sep + os.sep in text
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} holds no config.json; pass a model folder saved with save_pretrained")
        elif looks_local or offline:
            raise FileNotFoundError(
                f"{text} is not a local model folder" + (" (the hub is off: HF_HUB_OFFLINE is set)" if offline and not looks_local else "")
                + "; pass a folder saved with save_pretrained (config, weights, processor), or 'default'"
            )
        return name_or_path
    if not (DEFAULT_MODEL / "config.json").exists():
        raise FileNotFoundError(
            f"the default model is missing from {DEFAULT_MODEL}; run scripts/train_default_model.py to build it"
        )
    return DEFAULT_MODEL


def _load_processor(name_or_path: str | os.PathLike) -> Any:
    advice = "save the processor (tokenizer and image processor or feature extractor) into the model folder or pass processor="
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except Exception as error:  # the HF error names the missing piece; we say what to do
        raise ValueError(
            f"could not load a processor from {name_or_path!s} ({type(error).__name__}: {error}); {advice}"
        ) from error
    if not (hasattr(processor, "image_processor") or hasattr(processor, "feature_extractor")):
        raise ValueError(f"could not load a processor from {name_or_path!s}: found only a {type(processor).__name__}; {advice}")
    if getattr(processor, "chat_template", None) is None:  # InstructBLIP's drops the folder's; its tokenizer keeps it
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
    return processor


class HookedMLLM(torch.nn.Module):
    """A multimodal LLM whose image tokens flow through TransformerLens hook points.

    Attributes: ``bridge`` (the ``TransformerBridge``), ``processor`` (the HF processor),
    ``spec`` (what mm_lens knows of the architecture). Other attributes (``cfg``,
    ``blocks``, ``W_U``, ``to_str_tokens``, ...) are the bridge's.
    """

    def __init__(self, bridge: TransformerBridge, processor: Any, spec: ArchitectureSpec):
        super().__init__()
        self.bridge = bridge
        self.processor = processor
        self.spec = spec
        self._cached_maps: dict[int, ModalityMap] = {}  # id of a run_with_cache activation -> its batch's map
        self.use_sdpa = True  # bulk jobs that need no attention pattern run it through SDPA (fast_attention)
        bridge.original_model.register_forward_pre_hook(self._refuse_runs_without_media, with_kwargs=True)
        self.eval()  # analyses run in evaluation mode, as HF's from_pretrained leaves models

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        hf_model: torch.nn.Module | None = None,
        processor: Any | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        compatibility_mode: bool = False,
    ) -> "HookedMLLM":
        """Load from a local folder (or a hub name when online), or wrap ``hf_model``.
        ``"default"`` is the small model organism shipped with mm_lens (trained by
        ``scripts/train_default_model.py`` on ``mm_lens.base.synthetic``).

        The architecture is checked before anything heavy is loaded. ``hf_model`` is used
        as is (TransformerLens rewires its modules in place); its folder still provides the
        tokenizer and processor unless ``processor`` is given. ``compatibility_mode`` turns
        on TL's weight processing (HookedTransformer numerics; see docs/hooks.md).
        """
        name_or_path = resolve_model(name_or_path)
        config = hf_model.config if hf_model is not None else AutoConfig.from_pretrained(name_or_path)
        spec = spec_for(config)
        processor = processor if processor is not None else _load_processor(name_or_path)
        if dtype is None:
            dtype = next(hf_model.parameters()).dtype if hf_model is not None else torch.float32
        if hf_model is not None and device is not None:
            hf_model = hf_model.to(device)
        with _booting_with(spec):
            bridge = TransformerBridge.boot_transformers(
                str(name_or_path),
                hf_model=hf_model,
                device=device if hf_model is None else None,
                dtype=dtype,
                tokenizer=processor.tokenizer,
                # the class the checkpoint names (TL guesses an Auto class from its own lists)
                model_class=getattr(transformers, spec.hf_class, None),
            )
        bridge.processor = processor
        read_cache_keyword(bridge)
        attend_through_sdpa(bridge, enabled=False)  # eager by default; bulk jobs turn SDPA on (fast_attention)
        skip_unwatched_norm_hooks(bridge)
        if compatibility_mode:
            bridge.enable_compatibility_mode(disable_warnings=True)
        return cls(bridge, processor, spec)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["bridge"], name)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped HF model (its modules replaced by bridge components)."""
        return self.bridge.original_model

    @property
    def neuron_hooks(self) -> dict[str, list[str]]:
        """Neuron module name -> its hook names, one per layer (``lm_mlp``, ``vision_mlp``, ``projector``)."""
        names = self.bridge.hook_dict
        modules = {}
        for module, template in self.spec.neuron_hooks.items():
            if "{layer}" not in template:
                modules[module] = [template]
                continue
            hooks, layer = [], 0
            while template.format(layer=layer) in names:
                hooks.append(template.format(layer=layer))
                layer += 1
            modules[module] = hooks
        return modules

    @property
    def neuron_widths(self) -> dict[str, int]:
        """Neuron module name -> neurons per layer."""
        return dict(self.spec.neuron_widths(self.hf_model))

    # ---- inputs --------------------------------------------------------------------
    def prepare_inputs(
        self,
        prompts: Sequence[str],
        images: Sequence[ImagesPerPrompt] | None = None,
        *,
        videos: Sequence[MediaPerPrompt] | None = None,
        audios: Sequence[MediaPerPrompt] | None = None,
        chat: bool = True,
        padding_side: str = "left",
    ) -> MultimodalBatch:
        """Build a batch with the model's processor: ``images[i]`` (an image, a list, or
        None) goes with ``prompts[i]``; likewise ``videos`` (frame lists) and ``audios``
        (1-d waveforms) for models that take them. With ``chat=True`` the chat template
        places the media; with ``chat=False`` each prompt carries its own placeholder tokens (none
        where the processor inserts them itself, ``spec.prompt_placeholders=False``)."""
        inputs = encode(
            self.processor,
            prompts,
            images,
            videos=videos,
            audios=audios,
            chat=chat,
            padding_side=padding_side,
            nested_images=self.spec.nested_images,
            prompt_placeholders=self.spec.prompt_placeholders,
        )
        inputs = {k: v.to(self.cfg.device) for k, v in inputs.items()}
        if self.spec.derived_inputs is not None:
            inputs.update(self.spec.derived_inputs(self.hf_model.config, inputs))
        return MultimodalBatch(inputs, self.modality_map(inputs))

    def modality_map(self, inputs: Mapping[str, Any]) -> ModalityMap:
        """The ``ModalityMap`` of a batch of HF inputs (checks them on the way)."""
        inputs = self._check_inputs(inputs)
        config = self.hf_model.config
        token_ids = self.spec.token_ids(config)
        special = [i for i in self.processor.tokenizer.all_special_ids if i not in token_ids.values()]
        layouts = self.spec.layouts(config, inputs)
        return build_modality_map(inputs["input_ids"], inputs.get("attention_mask"), token_ids, special, layouts)

    def _check_media(self, input_ids: torch.Tensor, inputs: Mapping[str, Any], features_need_tokens: bool = True) -> None:
        """Refuse media placeholder tokens without their features (a run without the media)
        and (``features_need_tokens``) features without placeholder tokens."""
        token_ids = self.spec.token_ids(self.hf_model.config)
        for modality, name in self.spec.feature_inputs.items():
            n_tokens = int((input_ids == token_ids[modality]).sum())
            features = inputs.get(name)
            if n_tokens and features is None:
                raise ValueError(
                    f"input_ids hold {n_tokens} {modality} tokens but no {name} were given; "
                    f"pass the {modality} features as {name} (model.prepare_inputs does both; for generation use "
                    "model.generate, for TransformerLens' patching functions mm_lens.analysis.patching.with_inputs)"
                )
            if features is not None:
                self._check_features(modality, name, features)
            if features_need_tokens and features is not None and not n_tokens:
                raise ValueError(
                    f"{name} were given but input_ids hold no {modality} token; put the {modality} token in the "
                    "prompt (model.prepare_inputs does it through the chat template)"
                )

    def _check_features(self, modality: str, name: str, features: Any) -> None:
        """Media features must be a non-empty floating-point tensor; image and video pixels
        shaped ``[..., channels, height, width]`` must have the vision tower's channels."""
        if not isinstance(features, torch.Tensor):
            raise ValueError(f"{name} is a {type(features).__name__}; pass the processor's {modality} features as a tensor")
        if not features.is_floating_point():
            raise ValueError(f"{name} has dtype {features.dtype}; pass floating-point {modality} features (the processor's output)")
        if features.numel() == 0 or features.ndim < 2:
            raise ValueError(f"{name} has shape {tuple(features.shape)}; pass at least one {modality} item's features")
        channels = getattr(getattr(self.hf_model.config, "vision_config", None), "num_channels", None)
        if modality in ("image", "video") and features.ndim >= 4 and channels and features.shape[-3] != channels:
            raise ValueError(
                f"{name} has shape {tuple(features.shape)}: {features.shape[-3]} channels where the vision tower takes "
                f"{channels}; pass pixel values shaped [..., {channels}, height, width] (the processor's output)"
            )

    def _refuse_runs_without_media(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the HF model: whatever calls it (TransformerLens' ``generate``,
        its patching functions, ``bridge(tokens)``), media tokens without media features are an
        error, not a silent text-only run. Decoding steps over a filled KV cache are exempt."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("mm_encoder_outputs"):  # transformers >= 5.25's generate encodes the media before the prefill
            return
        if not isinstance(input_ids, torch.Tensor) or any(
            isinstance(value, Cache) and value.get_seq_length() > 0 for value in kwargs.values()
        ):
            return
        self._check_media(input_ids, kwargs, features_need_tokens=False)

    def _check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(inputs, MultimodalBatch):
            inputs = inputs.inputs
        inputs = dict(inputs)
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError("input_ids must be a [batch, pos] tensor; build inputs with model.prepare_inputs")
        self._check_media(input_ids, inputs)
        mask = inputs.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(input_ids.shape)}; "
                "they must match (same batch size and length)"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids have no positions (an empty prompt); pass at least one token per row")
        if input_ids.shape[0] == 0:
            raise ValueError("the batch is empty")
        if self.spec.check_inputs is not None:
            self.spec.check_inputs(self.hf_model.config, inputs)
        return inputs

    def _split(
        self, batch: Mapping[str, Any] | torch.Tensor | None, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any], ModalityMap]:
        """Validated (input_ids, other HF kwargs, their ModalityMap) from a batch and/or
        keyword inputs."""
        if batch is not None:
            if isinstance(batch, torch.Tensor):
                inputs = {"input_ids": batch, **inputs}
            else:
                inputs = {**dict(batch.items()), **inputs}
        names = ("input_ids", "attention_mask", *self.spec.input_names)
        # a MultimodalBatch was checked when its map was built; anything else is checked here
        already_checked = isinstance(batch, MultimodalBatch) and not any(k in names for k in inputs)
        mm = batch.modality_map if already_checked else self.modality_map({k: v for k, v in inputs.items() if k in names})
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        return inputs["input_ids"], rest, mm

    # ---- running -------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any] | torch.Tensor | None = None, /, return_type: str | None = "logits", **inputs: Any) -> Any:
        """Logits ``[batch, pos, d_vocab]`` (or ``return_type`` as in TL) for HF inputs."""
        input_ids, rest, _ = self._split(batch, inputs)
        return self.bridge(input_ids, return_type=return_type, **rest)

    def run_with_hooks(
        self,
        batch: Mapping[str, Any] | torch.Tensor | None = None,
        /,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
        bwd_hooks: Sequence[tuple[str | Callable[[str], bool], Callable]] = (),
        return_type: str | None = "logits",
        reset_hooks_end: bool = True,
        **inputs: Any,
    ) -> Any:
        """``TransformerBridge.run_with_hooks`` on multimodal inputs."""
        input_ids, rest, _ = self._split(batch, inputs)
        return self.bridge.run_with_hooks(
            input_ids,
            fwd_hooks=list(fwd_hooks),
            bwd_hooks=list(bwd_hooks),
            return_type=return_type,
            reset_hooks_end=reset_hooks_end,
            **rest,
        )

    def run_with_cache(
        self,
        batch: Mapping[str, Any] | torch.Tensor | None = None,
        /,
        names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
        return_type: str | None = "logits",
        **inputs: Any,
    ) -> tuple[Any, ActivationCache]:
        """``TransformerBridge.run_with_cache`` on multimodal inputs (``names_filter`` as in TL).
        Every cached activation remembers its batch's ModalityMap (``modality_map_of``), so
        that pairing it with other inputs (``patching.with_inputs``) is checked."""
        input_ids, rest, mm = self._split(batch, inputs)
        # TL asks HF for its attention weights, unused here (``hook_pattern`` fires inside
        # the bridge), which would keep every attention off the SDPA path
        rest.setdefault("output_attentions", False)
        output, cache = self.bridge.run_with_cache(input_ids, names_filter=names_filter, return_type=return_type, **rest)
        for activation in cache.cache_dict.values():
            if id(activation) not in self._cached_maps:
                weakref.finalize(activation, self._cached_maps.pop, id(activation), None)
            self._cached_maps[id(activation)] = mm
        return output, cache

    def modality_map_of(self, activation: torch.Tensor) -> ModalityMap | None:
        """The ModalityMap of the batch whose ``run_with_cache`` cached ``activation`` (an
        entry of that cache, as ``cache[name]`` returns it); None for any other tensor."""
        return self._cached_maps.get(id(activation))

    def check_aligned(self, activation: torch.Tensor, inputs_map: ModalityMap, name: str, shape: tuple[int, ...] | None = None) -> None:
        """Refuse (``ValueError`` naming what differs) to pair a cached ``activation`` (hook
        ``name``) with inputs of map ``inputs_map`` unless their batches place media and
        padding alike (``map_difference``) and, given the inputs' own ``shape`` of that
        activation, the shapes agree."""
        cached_map = self.modality_map_of(activation)
        difference = None if cached_map is None else map_difference(cached_map, inputs_map)
        if difference is None and shape is not None and tuple(activation.shape) != tuple(shape):
            difference = f"the cached activation has shape {tuple(activation.shape)} and these inputs' {tuple(shape)}"
        if difference is not None:
            raise ValueError(
                f"the cached {name} does not line up with the inputs it is paired with: {difference}; "
                "use a cache of a batch with the same prompt layout (media at the same positions, same image sizes)"
            )

    def generate(
        self,
        batch: Mapping[str, Any] | None = None,
        /,
        *,
        prompts: Sequence[str] | None = None,
        images: Sequence[ImagesPerPrompt] | None = None,
        videos: Sequence[MediaPerPrompt] | None = None,
        audios: Sequence[MediaPerPrompt] | None = None,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_at_eos: bool = True,
        return_cache: bool = False,
        names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
        **generate_kwargs: Any,
    ) -> Generation:
        """Continue a batch (a ``MultimodalBatch``, or ``prompts`` with their media as in
        ``prepare_inputs``) with the media, the KV cache and every active hook: greedy by
        default (equal to HF's ``generate`` on the untouched model), or sampling
        (``do_sample``, ``temperature``, ``top_k``, ``top_p``; ``None`` keeps the model's
        generation config, as HF does; seed with ``torch.manual_seed``).
        Stops at the end-of-sequence token unless ``stop_at_eos=False``. Media placeholder
        tokens are never generated (they would have no features behind them). Other keywords
        go to HF's ``generate`` (e.g. ``suppress_tokens``, added to the media tokens).

        Attention runs through SDPA wherever no hook needs its pattern (``fast_attention``;
        ``model.use_sdpa = False`` keeps it eager), so the tokens equal HF's ``generate`` up
        to float rounding ties.

        ``return_cache``: also an ``ActivationCache`` of the hooks ``names_filter`` selects
        (as in ``run_with_cache``) over the prompt and the fed answer tokens; memory is what
        the filter keeps. See ``mm_lens.model.generation``.
        """
        if (batch is None) == (prompts is None):
            raise ValueError("pass either a batch (model.prepare_inputs(...)) or prompts=[...] with their media, not both")
        if batch is None:
            batch = self.prepare_inputs(prompts, images, videos=videos, audios=audios)
        elif not isinstance(batch, MultimodalBatch):
            batch = MultimodalBatch(dict(batch), self.modality_map(batch))
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].all()):
            raise ValueError(
                "the batch is right-padded: generated tokens would follow the padding; build it with "
                "model.prepare_inputs(..., padding_side='left') (the default)"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        tokenizer = self.processor.tokenizer
        config = copy.deepcopy(self.hf_model.generation_config)
        settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        config.update(**{name: value for name, value in settings.items() if value is not None})  # None: the model's own
        # a generated media placeholder would have no features behind it: never produce one
        media_ids = list(self.spec.token_ids(self.hf_model.config).values())
        config.suppress_tokens = sorted(set(media_ids) | set(generate_kwargs.pop("suppress_tokens", None) or []))
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not stop_at_eos:
            config.eos_token_id = []  # None would mean "the model's default"
        prompt_length = batch["input_ids"].shape[1]
        recorder = StepRecorder(self._cached_names(names_filter), prompt_length) if return_cache else None
        # attention through SDPA wherever no hook needs its pattern (self.use_sdpa = False: eager)
        with torch.no_grad(), self.fast_attention(), self.bridge.hooks(fwd_hooks=recorder.hooks() if recorder else []):
            output = self.hf_model.generate(**batch.inputs, generation_config=config, **generate_kwargs)
        if not torch.equal(output[:, :prompt_length], batch["input_ids"]):
            raise RuntimeError("HF's generate returned ids that do not start with the prompt; this architecture's generate is not supported")
        new_tokens = output[:, prompt_length:]
        ended = ended_rows(new_tokens, eos_ids if stop_at_eos else [])
        derive = None if self.spec.derived_inputs is None else (lambda inputs: self.spec.derived_inputs(self.hf_model.config, inputs))
        return Generation(
            tokens=output,
            new_tokens=new_tokens,
            text=[t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)],
            batch=sequence_batch(batch, new_tokens, ended, derive),
            cache=ActivationCache(recorder.cache_dict(), self.bridge) if recorder else None,
        )

    def _cached_names(self, names_filter: str | Sequence[str] | Callable[[str], bool] | None) -> list[str]:
        """Hook names a ``names_filter`` selects, as ``run_with_cache`` reads it."""
        names = list(self.bridge.hook_dict)
        if names_filter is None:
            return names
        if callable(names_filter):
            return [n for n in names if names_filter(n)]
        wanted = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        unknown = [n for n in wanted if n not in self.bridge.hook_dict]
        if unknown:
            raise KeyError(f"names_filter names hooks this model does not have: {unknown}; see model.hook_dict")
        return wanted

    def fast_attention(self, enabled: bool | None = None) -> contextlib.AbstractContextManager:
        """Context manager: runs inside it compute attention through SDPA wherever no hook
        needs the ``[batch, head, query, key]`` pattern (``hook_pattern``, ``hook_attn_scores``,
        rotated/normed q and k), with ``hook_q/k/v/z`` still firing; a self-checking fast path,
        compared with the eager path on its first call per attention class. Outside it
        attention is TransformerLens' eager path, so hooked and plain runs stay bit-identical.
        Bulk jobs that read no pattern (neuron statistics) run inside it; ``enabled`` defaults
        to ``self.use_sdpa`` (set it to False to keep them eager)."""
        return sdpa_attention(self.bridge, self.use_sdpa if enabled is None else enabled)

    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """Context manager adding hooks for the calls made inside it (TL's ``hooks()``)."""
        return self.bridge.hooks(
            fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts
        )

    def __repr__(self) -> str:
        return f"HookedMLLM({self.spec.hf_class}, layers={self.cfg.n_layers}, d_model={self.cfg.d_model})"


def _describe(mm: ModalityMap, row: int, pos: int) -> str:
    """What one position is: ``text``, ``padding``, or ``image 0 tile 1 (r2, c3)``."""
    kind = MODALITIES[int(mm.modality[row, pos])]
    item = int(mm.image[row, pos])
    if item < 0:
        return kind
    if bool(mm.newline[row, pos]):
        return f"{kind} {item} newline"
    return f"{kind} {item} tile {int(mm.tile[row, pos])} (r{int(mm.row[row, pos])}, c{int(mm.col[row, pos])}, feature {int(mm.feature[row, pos])})"


def map_difference(first: ModalityMap, second: ModalityMap, names: tuple[str, str] = ("the cache's batch", "these inputs")) -> str | None:
    """None when two batches have the same shape and place media and padding alike (each
    media position the same item, tile, cell and feature; text and special tokens may
    differ), else where they first differ, in words (the batches called ``names``)."""
    if first.shape != second.shape:
        return f"{names[0]} is {first.shape} (rows, positions), {names[1]} {second.shape}"

    def placement(mm: ModalityMap) -> torch.Tensor:
        kind = torch.where(mm.mask("special"), MODALITIES.index("text"), mm.modality.long())
        return torch.stack([kind, mm.image, mm.tile, mm.row, mm.col, mm.feature, mm.newline.long()])

    differs = (placement(first) != placement(second)).any(0)
    if differs.any():
        row, pos = (int(i) for i in torch.nonzero(differs)[0])
        return f"row {row}, position {pos} is {_describe(first, row, pos)} in {names[0]} but {_describe(second, row, pos)} in {names[1]}"
    if first.grids != second.grids:
        return f"the media's patch grids differ: {first.grids} in {names[0]}, {second.grids} in {names[1]}"
    return None
