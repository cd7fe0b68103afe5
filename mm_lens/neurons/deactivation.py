"""Turn neurons off: hooks that overwrite chosen channels of the neuron hook points.

Both papers deactivate the neurons they find and measure what breaks (MMNeuron and MINER).
Neurons come as ``{module: [index tensor per layer]}`` with the module names of
``model.neuron_hooks`` (``lm_mlp``, ``vision_mlp``, ``projector``); a ``NeuronSet`` (any
object with ``.union(groups)`` returning that dict) is accepted too.

``deactivation_hooks`` returns ``(hook_name, hook_fn)`` pairs for ``run_with_hooks`` and
``hooks()``; ``deactivated`` is a context manager that applies them to every call inside it,
HF's ``generate`` included.

Decisions:

- Values (``mode``): ``"zero"`` (MMNeuron, MINER), ``"mean"`` (each neuron's mean, from
  ``means[module][layer, neuron]``), ``"constant"`` (``value``), ``"min"``: the minimum of the
  whole hooked tensor at that call, before it is changed (every position and channel, padding
  included, of that layer's tensor for that forward: the prefill and each decode step get
  their own). MINER's code takes ``output.min()`` of the first tensor it hooks and reuses that
  one number for every later layer and call; ours is per tensor, as its paper describes.
- Positions (``positions``): ``"all"``, or any of the modalities of ``ModalityMap``
  (``"text"``, ``"image"``, ``"special"``, ``"padding"``, ...) and ``"last"`` (the last
  non-padding position of each row). Only language-model hooks (``[batch, pos, ...]``) are
  restricted by position, with ``modality_map`` describing the prompt. Encoder tensors
  (vision tower, Q-Former, projector; an audio encoder) hold media items only: their hooks
  are added when ``positions`` is ``"all"`` or includes a modality the encoder takes
  (``model.spec.feature_inputs``: ``"image"``, and ``"video"`` where the vision tower also
  encodes videos, as in Qwen2-VL and LLaVA-OneVision; ``"audio"``), and then touch every row
  of every item it encodes (CLS included; images and videos alike, as the tower is shared);
  otherwise they are not added at all.
- Generation: a language-model tensor whose length differs from the map's is read as the
  prompt followed by generated tokens. Shorter (a decode step with KV cache, ``[batch, 1,
  d]``): every position is a generated token. Longer (decoding without cache): the first
  positions follow the map, the rest are generated. Generated tokens count as ``"text"``,
  and ``"last"`` is the final position of the tensor. A decode step is told apart from the
  prompt by its length only: keep the map of the prompt being run (a one-token prompt is
  ambiguous). The batch size must match the map's (no beam search with restricted positions).
- ``complementary=True`` turns off every neuron of each listed module's layers except the
  given ones: a layer with no given neuron is turned off whole; modules absent from
  ``neurons`` are left alone. Layers whose final set is empty add no hook.
- Hooks return a new tensor (one copy, channels written with ``index_fill`` /
  ``index_copy_``), never change the hooked tensor in place, so a cache taken by an earlier
  hook keeps the clean values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mm_lens.base.modality import ModalityMap, position_mask, position_names
from mm_lens.model.hooked import HookedMLLM

__all__ = ["MODES", "Deactivation", "check_neurons_fit", "deactivated", "deactivation_hooks", "neuron_dict"]

MODES: tuple[str, ...] = ("zero", "mean", "min", "constant")

# {module: [indices per layer]}; a NeuronSet (anything with .union(groups)) is accepted too.
# (A leading _ leaves a dimension unbound: each layer has its own count, each module its own
# layers and width.)
Neurons = Mapping[str, Sequence[Int[Tensor, "_index"]]]
# {module: mean activation [layer, neuron]}
Means = Mapping[str, Float[Tensor, "_layer _neuron"]]
HookFn = Callable[[Tensor, Any], Tensor]


def neuron_dict(neurons: Neurons | Any, groups: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``{module: [indices per layer]}`` form of ``neurons``: the dict itself, or
    ``neurons.union(groups)`` for a ``NeuronSet`` (all its groups when ``groups`` is None).
    A dict's values come back as given: ``deactivation_hooks`` checks them, with messages."""
    if isinstance(neurons, Mapping):
        if groups is not None:
            raise ValueError(
                "groups= selects groups of a NeuronSet; neurons is already a {module: [indices per layer]} dict"
            )
        return dict(neurons)
    if hasattr(neurons, "union"):
        return dict(neurons.union(groups) if groups is not None else neurons.union())
    raise ValueError(
        f"neurons is a {type(neurons).__name__}; pass {{module: [LongTensor of neuron indices per layer]}} "
        "or a NeuronSet"
    )


def _is_lm_hook(hook_name: str) -> bool:
    return hook_name.startswith("blocks.")


def _checked_indices(module: str, layers: Any, n_layers: int, width: int) -> list[Tensor]:
    if isinstance(layers, Tensor) or not isinstance(layers, Sequence):
        raise ValueError(
            f"neurons[{module!r}] must be a list with one index tensor per layer ({n_layers} layers)"
        )
    if len(layers) != n_layers:
        raise ValueError(
            f"neurons[{module!r}] has {len(layers)} layer(s) but the model's {module} has {n_layers}; "
            "pass one index tensor per layer (an empty one where no neuron is chosen)"
        )
    checked = []
    for layer, indices in enumerate(layers):
        indices = torch.as_tensor(indices)
        if indices.numel() == 0:
            indices = indices.long()
        if indices.ndim != 1 or indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
            raise ValueError(
                f"neurons[{module!r}][{layer}] has dtype {indices.dtype} and shape {tuple(indices.shape)}; "
                "pass a 1-d integer tensor of neuron indices"
            )
        bad = indices[(indices < 0) | (indices >= width)]
        if bad.numel():
            raise ValueError(
                f"neurons[{module!r}][{layer}] holds index {int(bad[0])} out of range: the layer has {width} "
                f"neurons (valid indices 0..{width - 1})"
            )
        checked.append(indices.long().cpu())
    return checked


def _checked_region(mask: Tensor, modality_map: ModalityMap | None) -> Bool[Tensor, "batch pos"]:
    """A boolean ``[batch, pos]`` mask of language-model positions (e.g. ``region_positions(
    ...).mask``), checked against the batch's map when one is given."""
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(
            f"positions as a tensor must be a boolean [batch, pos] mask (e.g. region_positions(...).mask); "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    if modality_map is not None and tuple(mask.shape) != tuple(modality_map.shape):
        raise ValueError(f"the positions mask has shape {tuple(mask.shape)} but the batch is {tuple(modality_map.shape)}")
    return mask


def _position_names(positions: str | Sequence[str]) -> frozenset[str] | None:
    """The chosen position names, or None for every position."""
    names = position_names(positions)
    return None if "all" in names else frozenset(names)


class _PositionMask:
    """Which positions of a language-model tensor ``[batch, pos, ...]`` to overwrite.

    Positions beyond the prompt (generated tokens) are text; see the module docstring.
    Masks are built once per (length, device) and shared by all hooks of a call.
    """

    def __init__(self, prompt: Bool[Tensor, "batch pos"], generated: bool = False, prompt_last: Tensor | None = None):
        self.prompt = prompt.cpu()
        self.prompt_last = prompt_last
        self.generated = generated
        self.last = prompt_last is not None
        self._cache: dict[tuple[int, torch.device], tuple[Tensor, bool]] = {}

    @classmethod
    def from_names(cls, modality_map: ModalityMap, names: frozenset[str]) -> _PositionMask:
        others = tuple(sorted(names - {"last"}))
        prompt = position_mask(modality_map, others) if others else torch.zeros(modality_map.shape, dtype=torch.bool)
        generated = bool(names & {"text", "special_text", "generated"})
        return cls(prompt, generated, modality_map.last_mask() if "last" in names else None)

    def __call__(self, act: Tensor) -> tuple[Bool[Tensor, "batch pos"], bool]:
        batch, pos = act.shape[0], act.shape[1]
        if batch != self.prompt.shape[0]:
            raise ValueError(
                f"a language-model hook saw batch size {batch} but the modality map has {self.prompt.shape[0]} rows; "
                "pass the map of the batch being run (beam search and other batch expansions need positions='all')"
            )
        key = (pos, act.device)
        if key not in self._cache:
            mask = self._build(pos)
            self._cache[key] = (mask.to(act.device), bool(mask.any()))
        return self._cache[key]

    def _build(self, pos: int) -> Tensor:
        batch, prompt_pos = self.prompt.shape
        if pos == prompt_pos:
            return self.prompt | self.prompt_last if self.prompt_last is not None else self.prompt.clone()
        n_generated = pos - prompt_pos if pos > prompt_pos else pos
        mask = torch.full((batch, n_generated), self.generated)
        if pos > prompt_pos:
            mask = torch.cat([self.prompt, mask], dim=1)
        if self.last:
            mask[:, -1] = True
        return mask


def _fill(
    act: Float[Tensor, "... neuron"],
    indices: Int[Tensor, "k"],
    value: float | Float[Tensor, ""] | Float[Tensor, "k"],
    where: Bool[Tensor, "batch pos"] | None,
) -> Float[Tensor, "... neuron"]:
    """``act`` with channels ``indices`` set to ``value`` (at positions ``where``), one copy."""
    if where is None and not (isinstance(value, Tensor) and value.ndim):
        return act.index_fill(-1, indices, value)
    fill = torch.as_tensor(value, dtype=act.dtype, device=act.device).expand(*act.shape[:-1], indices.numel())
    if where is not None:
        fill = torch.where(rearrange(where, "batch pos -> batch pos 1"), fill, act.index_select(-1, indices))
    return act.clone().index_copy_(-1, indices, fill.contiguous())


def _make_hook(
    indices: Tensor, mode: str, value: float | None, mean: Tensor | None, position_mask: _PositionMask | None
) -> HookFn:
    on_device: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def deactivate(act: Tensor, hook: Any = None) -> Tensor:
        if act.device not in on_device:
            on_device[act.device] = (indices.to(act.device), None if mean is None else mean.to(act.device))
        idx, mean_here = on_device[act.device]
        where = None
        if position_mask is not None:
            where, any_position = position_mask(act)
            if not any_position:
                return act
        if mode == "zero":
            fill: Any = 0.0
        elif mode == "constant":
            fill = float(value)  # type: ignore[arg-type]
        elif mode == "min":
            fill = act.amin()
        else:
            fill = mean_here.to(act.dtype)  # type: ignore[union-attr]
        return _fill(act, idx, fill, where)

    return deactivate


def check_neurons_fit(model: HookedMLLM, neuron_set: Any) -> None:
    """Refuse a ``NeuronSet`` made for a model of other widths or layer counts (naming both),
    so that neither it nor its random controls (drawn from its widths) is applied to this one."""
    widths, hook_names = getattr(neuron_set, "widths", None), model.neuron_hooks
    if widths is None:
        return
    for module in neuron_set.modules:
        if module not in hook_names:
            raise ValueError(f"the neuron set has module {module!r}, which this model lacks (it has {', '.join(hook_names)})")
        ours = (len(hook_names[module]), model.neuron_widths[module])
        theirs = (neuron_set.n_layers(module), widths[module])
        if ours != theirs:
            raise ValueError(
                f"the neuron set's {module} is {theirs[0]} layers x {theirs[1]} neurons but this model's is "
                f"{ours[0]} x {ours[1]}; it was made for another model: select neurons on this one"
            )


def deactivation_hooks(
    model: HookedMLLM,
    neurons: Neurons | Any,
    *,
    mode: str = "zero",
    value: float | None = None,
    means: Means | None = None,
    positions: str | Sequence[str] | Tensor = "all",
    modality_map: ModalityMap | None = None,
    complementary: bool = False,
    groups: Sequence[str] | None = None,
) -> list[tuple[str, HookFn]]:
    """``(hook_name, hook_fn)`` pairs that deactivate ``neurons`` of ``model``.

    ``neurons``: ``{module: [LongTensor of neuron indices, one per layer]}`` (modules as in
    ``model.neuron_hooks``) or a ``NeuronSet`` (``groups`` picks which of its groups).
    ``mode``: ``"zero"``, ``"mean"`` (needs ``means[module]`` of shape ``[layer, neuron]``),
    ``"min"`` (the hooked tensor's minimum) or ``"constant"`` (needs ``value``).
    ``positions``: ``"all"``, a modality name, ``"last"``, or a tuple of them; anything but
    ``"all"`` needs the batch's ``modality_map`` (a ``MultimodalBatch`` is accepted). Or a
    boolean ``[batch, pos]`` mask of language-model positions, e.g. the patches under a
    region of the picture (``region_positions(model, batch, box).mask``): only the language
    model's neurons are switched off, there, and never at generated tokens.
    ``complementary``: deactivate every other neuron of the listed modules instead.
    See the module docstring for vision hooks, generation and the minimum.
    """
    check_neurons_fit(model, neurons)
    neurons = neuron_dict(neurons, groups)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(repr(m) for m in MODES)}")
    if mode == "constant" and value is None:
        raise ValueError("mode='constant' needs value=, the number to write into the deactivated neurons")
    if mode != "constant" and value is not None:
        raise ValueError(f"value= is only used with mode='constant' (mode is {mode!r})")
    if mode != "mean" and means is not None:
        raise ValueError(f"means= is only used with mode='mean' (mode is {mode!r})")
    if mode == "mean" and means is None:
        raise ValueError(
            "mode='mean' needs means=, {module: tensor [layer, neuron]} of each neuron's mean activation"
        )
    if hasattr(modality_map, "modality_map"):
        modality_map = modality_map.modality_map  # a MultimodalBatch
    region = _checked_region(positions, modality_map) if isinstance(positions, Tensor) else None
    names = None if region is not None else _position_names(positions)

    hook_names = model.neuron_hooks
    unknown = [module for module in neurons if module not in hook_names]
    if unknown:
        raise ValueError(f"unknown neuron module(s) {unknown}; this model has {', '.join(hook_names)}")

    position_mask = None
    hooks: list[tuple[str, HookFn]] = []
    for module, layers in neurons.items():
        width, module_hooks = model.neuron_widths[module], hook_names[module]
        indices = _checked_indices(module, layers, len(module_hooks), width)
        module_means = None
        if mode == "mean":
            module_means = means.get(module)  # type: ignore[union-attr]
            expected = (len(module_hooks), width)
            if module_means is None or tuple(module_means.shape) != expected:
                found = "missing" if module_means is None else f"of shape {tuple(module_means.shape)}"
                raise ValueError(
                    f"means[{module!r}] is {found}; mode='mean' needs a tensor of shape [layer, neuron] = {list(expected)}"
                )
        for layer, (hook_name, chosen) in enumerate(zip(module_hooks, indices)):
            if complementary:
                keep = torch.ones(width, dtype=torch.bool)
                keep[chosen] = False
                chosen = torch.nonzero(keep).flatten()
            chosen = torch.unique(chosen)
            if chosen.numel() == 0:
                continue
            layer_mask = None
            if region is not None:
                if not _is_lm_hook(hook_name):
                    continue  # a mask of language-model positions says nothing about the encoder's rows
                if position_mask is None:
                    position_mask = _PositionMask(region)
                layer_mask = position_mask
            elif names is not None:
                if not _is_lm_hook(hook_name):
                    if not names & set(model.spec.feature_inputs):
                        continue
                else:
                    if modality_map is None:
                        raise ValueError(
                            f"positions={positions!r} needs modality_map= (batch.modality_map of the batch you run) "
                            "to know which positions are which; or use positions='all'"
                        )
                    if position_mask is None:
                        position_mask = _PositionMask.from_names(modality_map, names)
                    layer_mask = position_mask
            mean = None if module_means is None else module_means[layer].detach()[chosen]
            hooks.append((hook_name, _make_hook(chosen, mode, value, mean, layer_mask)))
    return hooks


@dataclass(frozen=True)
class Deactivation:
    """A deactivation to apply batch after batch: the arguments of ``deactivation_hooks``
    but the model and the batch's ``modality_map``, which ``hooks`` takes."""

    neurons: Neurons | Any
    mode: str = "zero"
    value: float | None = None
    means: Means | None = None
    positions: str | Sequence[str] | Tensor = "all"
    complementary: bool = False
    groups: Sequence[str] | None = None

    def hooks(self, model: HookedMLLM, modality_map: ModalityMap | None = None) -> list[tuple[str, HookFn]]:
        """The hook pairs for one batch of ``model`` with this ``modality_map``."""
        return deactivation_hooks(
            model, self.neurons, mode=self.mode, value=self.value, means=self.means, positions=self.positions,
            modality_map=modality_map, complementary=self.complementary, groups=self.groups,
        )


@contextlib.contextmanager
def deactivated(model: HookedMLLM, neurons: Neurons | Any, **kwargs: Any) -> Iterator[Any]:
    """Deactivate ``neurons`` in every call made inside (forward, ``run_with_cache``,
    ``model.generate``); keyword arguments as in ``deactivation_hooks``."""
    with model.hooks(fwd_hooks=deactivation_hooks(model, neurons, **kwargs)):
        yield model
