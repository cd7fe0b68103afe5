"""Generation with the media, through the hooks, with activations kept along the way.

``HookedMLLM.generate`` runs HF's own ``generate`` on the bridge-wrapped model (KV cache on),
so every hook fires at every step and the answer equals HF's on the untouched weights. With
``return_cache=True`` the activations of the hooks chosen by ``names_filter`` are gathered
over the prompt forward and every decoding step and assembled along the position axis into
one ``ActivationCache`` over the positions the model read: the prompt and each generated
token but the last one (the last token is produced, never fed back, so it has no
activations). Attention patterns are assembled causally: a decoding step's query row is
padded with zeros for the keys that did not exist yet, as in a full forward's pattern.
``Generation.batch`` is the whole sequence (prompt and answer) as a ``MultimodalBatch``
whose ``ModalityMap`` marks the answer ``generated``, ready for any other analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import ActivationCache

from mm_lens.base.hooks import block_hook
from mm_lens.base.modality import ModalityMap, modality_code
from mm_lens.model.inputs import MultimodalBatch

# inputs with one entry per token position, besides input_ids and attention_mask: answer
# tokens are text (type 0); position_ids are recomputed by the architecture (derived inputs)
TOKEN_TYPE_INPUTS = ("token_type_ids", "mm_token_type_ids")
PER_POSITION_INPUTS = ("input_ids", "attention_mask", "position_ids", *TOKEN_TYPE_INPUTS)


@dataclass
class Generation:
    """What ``HookedMLLM.generate`` returns.

    ``tokens`` ``[batch, prompt + new]``: the prompt's ids then the generated ones (the
    tokenizer's pad id after a row's end of sequence); ``new_tokens`` ``[batch, new]``;
    ``text`` the decoded answers (special tokens skipped); ``batch`` the whole sequence as a
    ``MultimodalBatch`` (answer positions ``generated``, positions after a row's end
    ``padding``); ``cache`` (with ``return_cache``) the activations over ``batch``'s first
    ``prompt + new - 1`` positions, which ``cache_batch`` holds (e.g. for
    ``NeuronStatsCollector.add_cache`` with the ``generated`` position class).
    """

    tokens: Int[Tensor, "batch pos"]
    new_tokens: Int[Tensor, "batch new"]
    text: list[str]
    batch: MultimodalBatch
    cache: ActivationCache | None = None

    @property
    def cache_batch(self) -> MultimodalBatch:
        """``batch`` without its last position: the positions ``cache`` covers."""
        length = self.tokens.shape[1] - 1
        inputs = {k: v[:, :length] if k in PER_POSITION_INPUTS else v for k, v in self.batch.inputs.items()}
        return MultimodalBatch(inputs, truncate_map(self.batch.modality_map, length))

    @property
    def cache_map(self) -> ModalityMap:
        """The ModalityMap of the cached positions (every position but the last)."""
        return self.cache_batch.modality_map


def extend_map(mm: ModalityMap, new_tokens: Int[Tensor, "batch new"], ended: Bool[Tensor, "batch new"]) -> ModalityMap:
    """``mm`` followed by ``new_tokens.shape[1]`` positions of kind ``generated`` (``padding``
    where ``ended``: after the row's end of sequence). ``last`` stays the last prompt position."""
    batch, n_new = new_tokens.shape
    kinds = torch.where(ended.cpu(), modality_code("padding"), modality_code("generated")).to(mm.modality.dtype)

    def pad(field: Tensor, value: int | bool) -> Tensor:
        return torch.cat([field, torch.full((batch, n_new), value, dtype=field.dtype)], dim=1)

    return replace(
        mm,
        modality=torch.cat([mm.modality, kinds], dim=1),
        image=pad(mm.image, -1),
        tile=pad(mm.tile, -1),
        row=pad(mm.row, -1),
        col=pad(mm.col, -1),
        feature=pad(mm.feature, -1),
        newline=pad(mm.newline, False),
    )


def truncate_map(mm: ModalityMap, length: int) -> ModalityMap:
    """The map of the first ``length`` positions (only generated positions may be cut)."""
    if mm.mask("image", "video", "audio")[:, length:].any():
        raise ValueError(f"cannot cut the map at {length}: media positions lie beyond it")
    cut = {name: getattr(mm, name)[:, :length] for name in ("modality", "image", "tile", "row", "col", "feature", "newline")}
    return replace(mm, **cut)


def ended_rows(new_tokens: Int[Tensor, "batch new"], eos_ids: Sequence[int]) -> Bool[Tensor, "batch new"]:
    """True at the positions after each row's first end-of-sequence token."""
    is_eos = torch.isin(new_tokens, torch.tensor(list(eos_ids), dtype=new_tokens.dtype, device=new_tokens.device))
    seen = torch.cumsum(is_eos.long(), dim=1)
    return (seen - is_eos.long()) > 0


def sequence_batch(prompt: MultimodalBatch, new_tokens: Tensor, ended: Tensor, derive: Callable[[dict], dict] | None) -> MultimodalBatch:
    """The prompt batch followed by the answer: ids appended, the attention mask extended
    (0 after a row's end), other per-position inputs (token type ids) extended with zeros,
    inputs the architecture derives from the others recomputed (``derive``)."""
    ids = prompt["input_ids"]
    n_new = new_tokens.shape[1]
    inputs = {}
    for name, value in prompt.inputs.items():
        if name == "input_ids":
            inputs[name] = torch.cat([ids, new_tokens.to(ids.device)], dim=1)
        elif name == "attention_mask":
            inputs[name] = torch.cat([value, (~ended).to(value.dtype).to(value.device)], dim=1)
        elif name in TOKEN_TYPE_INPUTS:
            inputs[name] = F.pad(value, (0, n_new))
        else:
            inputs[name] = value
    if derive is not None:
        inputs.update(derive(inputs))
    return MultimodalBatch(inputs, extend_map(prompt.modality_map, new_tokens.cpu(), ended.cpu()))


class StepRecorder:
    """Forward hooks that keep each firing of the chosen hooks during ``generate`` and
    assemble them into ``[batch, pos, ...]`` tensors over prompt + fed answer tokens."""

    def __init__(self, names: Sequence[str], prompt_length: int):
        self.names = list(names)
        self.prompt_length = prompt_length
        self.firings: dict[str, list[Tensor]] = {name: [] for name in self.names}
        self.forwards = 0

    def hooks(self) -> list[tuple[str, Callable]]:
        """(name, hook) pairs for ``model.hooks``, plus the step counter on ``blocks.0``'s input."""

        def keep(name: str) -> Callable:
            def hook(activation: Tensor, hook: Any) -> None:
                self.firings[name].append(activation.detach())

            return hook

        def count(activation: Tensor, hook: Any) -> None:
            self.forwards += 1

        return [(name, keep(name)) for name in self.names] + [(block_hook(0, "resid_pre"), count)]

    def cache_dict(self) -> dict[str, Tensor]:
        """Name -> activations; hooks that fired in the prompt forward only (the encoders)
        are kept as they fired."""
        out = {}
        for name, firings in self.firings.items():
            if not firings:
                continue
            if len(firings) == 1 and self.forwards > 1:
                out[name] = firings[0]
            elif len(firings) == self.forwards:
                out[name] = self._along_positions(name, firings)
            else:
                raise ValueError(
                    f"hook {name} fired {len(firings)} times over {self.forwards} forwards (the prompt forward and each "
                    "decoding step); generate one media kind per batch, or cache this hook with run_with_cache on generation.batch"
                )
        return out

    def _along_positions(self, name: str, firings: list[Tensor]) -> Tensor:
        """Concatenate the firings along the axis that holds the prompt's positions in the
        first forward and one position per decoding step. Attention patterns (queries on
        the second-to-last axis, keys on the last) are placed causally: each step's keys
        (the last ones only, after a sliding-window cache) at the positions they stand for,
        zeros elsewhere."""
        first, step, length = firings[0], firings[1], self.prompt_length
        query_axes = [a for a in range(first.ndim) if first.shape[a] == length and step.shape[a] == 1]
        keyed = first.ndim >= 2 and first.shape[-1] == first.shape[-2] == length and query_axes[-1:] == [first.ndim - 2]
        query = first.ndim - 2 if keyed else (query_axes[0] if len(query_axes) == 1 else None)
        fixed = [a for a in range(first.ndim) if a != query and not (keyed and a == first.ndim - 1)]
        if query is None or any(firing.shape[a] != first.shape[a] for firing in firings for a in fixed):
            raise ValueError(
                f"cannot find the position axis of {name} (prompt forward {tuple(first.shape)}, decoding step "
                f"{tuple(step.shape)}); leave it out of names_filter and use run_with_cache on generation.batch"
            )
        if not keyed:
            return torch.cat(firings, dim=query)
        total = length + len(firings) - 1
        parts = []
        for index, firing in enumerate(firings):
            seen = length + index  # keys that exist at this step: the prompt, then one more per step
            start = seen - firing.shape[-1]
            if start < 0:
                raise ValueError(f"{name} has {firing.shape[-1]} keys at decoding step {index}, more than the {seen} positions so far")
            parts.append(F.pad(firing, (start, total - seen)))
        return torch.cat(parts, dim=query)
