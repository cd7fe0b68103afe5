"""Streaming neuron statistics: one pass over a dataset, reduced inside the hooks.

For every neuron module (``model.neuron_hooks``), layer, neuron and group (domain x position
class) we keep: the count of activations > 0, their sum and sum of squares (float64), the
max and min, and the number of positions. Memory is O(groups x layers x neurons), whatever
the dataset size: activations never leave the hook.

Position classes: ``image`` (image-feature and image-newline positions), ``text`` (text
positions, special tokens excluded), ``all`` (every non-padding position) and ``last`` (the
last non-padding position of each row). Vision-tower and projector positions are all image
positions: they count in ``image`` and ``all``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from einops import rearrange
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mm_lens.modality import ModalityMap

POSITION_CLASSES: tuple[str, ...] = ("image", "text", "all", "last")
_FIELDS = ("over_zero", "sum", "sum_sq", "max", "min", "n_tokens")


@dataclass
class ModuleStats:
    """Statistics of one neuron module; tensors are ``[layer, domain, class, neuron]``
    (``n_tokens``: ``[layer, domain, class]``)."""

    over_zero: Int[Tensor, "layer domain cls neuron"]
    sum: Float[Tensor, "layer domain cls neuron"]
    sum_sq: Float[Tensor, "layer domain cls neuron"]
    max: Float[Tensor, "layer domain cls neuron"]
    min: Float[Tensor, "layer domain cls neuron"]
    n_tokens: Int[Tensor, "layer domain cls"]

    @classmethod
    def empty(cls, n_layers: int, n_domains: int, n_classes: int, width: int) -> "ModuleStats":
        shape = (n_layers, n_domains, n_classes, width)
        return cls(
            over_zero=torch.zeros(shape, dtype=torch.int64),
            sum=torch.zeros(shape, dtype=torch.float64),
            sum_sq=torch.zeros(shape, dtype=torch.float64),
            max=torch.full(shape, -torch.inf, dtype=torch.float64),
            min=torch.full(shape, torch.inf, dtype=torch.float64),
            n_tokens=torch.zeros(shape[:3], dtype=torch.int64),
        )

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in _FIELDS}

    def _per_token(self, total: Tensor) -> Tensor:
        return total / rearrange(self.n_tokens, "layer domain cls -> layer domain cls 1").clamp(min=1)

    def probability(self) -> Float[Tensor, "layer domain cls neuron"]:
        """Share of positions where each neuron fired (0 for groups with no position)."""
        return self._per_token(self.over_zero.double())

    def mean(self) -> Float[Tensor, "layer domain cls neuron"]:
        return self._per_token(self.sum)

    def std(self) -> Float[Tensor, "layer domain cls neuron"]:
        """Population standard deviation of each neuron's activation per group."""
        return (self._per_token(self.sum_sq) - self.mean() ** 2).clamp(min=0).sqrt()


@dataclass
class NeuronStats:
    """Statistics of every neuron module, for ``domains`` x ``classes`` groups."""

    domains: tuple[str, ...]
    classes: tuple[str, ...]
    modules: dict[str, ModuleStats]
    metadata: dict[str, Any] = field(default_factory=dict)

    def over_zero(self, module: str, position_class: str = "all") -> Int[Tensor, "layer neuron domain"]:
        """Counts in the layout ``lape_select`` takes."""
        c = self._class_index(position_class)
        return rearrange(self.modules[module].over_zero[:, :, c], "layer domain neuron -> layer neuron domain")

    def n_tokens(self, module: str, position_class: str = "all") -> Int[Tensor, "domain"]:
        """Positions counted per domain (the same at every layer)."""
        return self.modules[module].n_tokens[0, :, self._class_index(position_class)]

    def _class_index(self, position_class: str) -> int:
        if position_class not in self.classes:
            raise ValueError(f"position class {position_class!r} was not collected; have {', '.join(self.classes)}")
        return self.classes.index(position_class)

    def equals(self, other: "NeuronStats") -> bool:
        """Bit-identical statistics (same groups, modules and values)."""
        if (self.domains, self.classes, list(self.modules)) != (other.domains, other.classes, list(other.modules)):
            return False
        return all(
            torch.equal(a, b)
            for name in self.modules
            for a, b in zip(self.modules[name].tensors().values(), other.modules[name].tensors().values())
        )

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file (groups, modules and metadata in its header), written
        atomically: a reader sees the old file or the new one, never a mix."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{i}.{name}": t.contiguous() for i, m in enumerate(self.modules.values()) for name, t in m.tensors().items()}
        header = {"domains": list(self.domains), "classes": list(self.classes), "modules": list(self.modules), "metadata": self.metadata}
        temporary = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(temporary), metadata={"mm_lens": json.dumps(header)})
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NeuronStats":
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads(handle.metadata()["mm_lens"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        modules = {
            name: ModuleStats(**{f: tensors[f"{i}.{f}"] for f in _FIELDS}) for i, name in enumerate(header["modules"])
        }
        return cls(tuple(header["domains"]), tuple(header["classes"]), modules, header["metadata"])

    def all_reduce(self) -> None:
        """Combine the statistics of every rank of the default ``torch.distributed`` group
        in place: sums for counts and moments, max and min for the extremes."""
        import torch.distributed as dist

        for stats in self.modules.values():
            for name in ("over_zero", "sum", "sum_sq", "n_tokens"):
                dist.all_reduce(getattr(stats, name), op=dist.ReduceOp.SUM)
            dist.all_reduce(stats.max, op=dist.ReduceOp.MAX)
            dist.all_reduce(stats.min, op=dist.ReduceOp.MIN)


class NeuronStatsCollector:
    """Accumulates ``NeuronStats`` over batches through TL hooks on a ``HookedMLLM``.

    ``update(batch, domains)`` runs one forward with hooks that reduce each neuron module's
    activation into the running statistics; ``domains[i]`` labels row ``i`` of the batch.
    """

    def __init__(
        self,
        model: Any,
        domains: Sequence[str],
        modules: Sequence[str] | None = None,
        classes: Sequence[str] = POSITION_CLASSES,
    ):
        unknown = set(classes) - set(POSITION_CLASSES)
        if unknown:
            raise ValueError(f"unknown position classes {sorted(unknown)}; choose from {', '.join(POSITION_CLASSES)}")
        if len(set(domains)) != len(domains) or not domains:
            raise ValueError(f"domains must be a non-empty list of distinct names, got {list(domains)}")
        available = model.neuron_hooks
        modules = list(available) if modules is None else list(modules)
        missing = [m for m in modules if m not in available]
        if missing:
            raise ValueError(f"unknown neuron modules {missing}; this model has {', '.join(available)}")
        self.model = model
        self.hooks = {m: available[m] for m in modules}
        self.stats = NeuronStats(tuple(domains), tuple(classes), {}, {})
        self._widths = {m: _width(model, hooks[0]) for m, hooks in self.hooks.items()}
        for module, hooks in self.hooks.items():
            self.stats.modules[module] = ModuleStats.empty(len(hooks), len(domains), len(classes), self._widths[module])

    def update(self, batch: Any, domains: Sequence[str]) -> None:
        """Run ``batch`` (a ``MultimodalBatch``) once and add its activations."""
        mm: ModalityMap = batch.modality_map
        if len(domains) != mm.shape[0]:
            raise ValueError(f"{len(domains)} domain labels for a batch of {mm.shape[0]} rows; pass one label per row")
        unknown = sorted(set(domains) - set(self.stats.domains))
        if unknown:
            raise ValueError(f"domain labels {unknown} are not among the collector's domains {list(self.stats.domains)}")
        domain_of_row = torch.tensor([self.stats.domains.index(d) for d in domains])
        groups = _position_groups(mm, domain_of_row, self.stats.classes)
        fwd_hooks = [
            (name, self._reducer(module, layer, groups, on_sequence=name.startswith("blocks.")))
            for module, hooks in self.hooks.items()
            for layer, name in enumerate(hooks)
        ]
        with torch.no_grad():
            self.model.run_with_hooks(batch, fwd_hooks=fwd_hooks, return_type=None)

    def _reducer(self, module: str, layer: int, groups: "_Groups", on_sequence: bool) -> Callable:
        stats = self.stats.modules[module]
        n_groups = len(self.stats.domains) * len(self.stats.classes)

        def flat(t: Tensor) -> Tensor:
            """This layer's ``[domain*cls, neuron]`` view of a statistic."""
            return t[layer].view(n_groups, -1)

        def reduce_into_stats(act: Tensor, hook: Any) -> None:
            rows, group = groups.select(act, on_sequence)
            values = rows.double()
            flat(stats.over_zero).index_add_(0, group, (values > 0).long())
            flat(stats.sum).index_add_(0, group, values)
            flat(stats.sum_sq).index_add_(0, group, values * values)
            index = group[:, None].expand_as(values)
            flat(stats.max).scatter_reduce_(0, index, values, reduce="amax")
            flat(stats.min).scatter_reduce_(0, index, values, reduce="amin")
            stats.n_tokens[layer].view(-1).index_add_(0, group, torch.ones_like(group))

        return reduce_into_stats


def _width(model: Any, hook_name: str) -> int:
    """Neurons per layer of the module whose first hook is ``hook_name``."""
    cfg, hf_cfg = model.cfg, model.hf_model.config
    if ".mlp.hook_act" in hook_name:
        return cfg.d_mlp
    if hook_name.startswith("vision_encoder"):
        return hf_cfg.vision_config.intermediate_size
    if hook_name == "vision_projector.hook_hidden":
        return model.hf_model.model.multi_modal_projector.linear_1.out_features
    raise ValueError(f"no known width for neuron hook {hook_name}")


@dataclass
class _Groups:
    """For one batch: which rows of a hooked activation go to which (domain, class) group."""

    lm_index: tuple[Tensor, Tensor]  # (batch, pos) coordinates, one entry per (position, class)
    lm_group: Tensor
    tile_group_rows: Tensor  # domain*n_classes + class for each (tile, class) pair
    tile_index: Tensor
    shape: tuple[int, int]
    n_tiles: int

    def select(self, act: Tensor, on_sequence: bool) -> tuple[Tensor, Tensor]:
        """(rows [m, neuron], group index [m]) of ``act`` for the statistics.

        ``on_sequence``: ``act`` is ``[batch, pos, neuron]`` (language model); otherwise
        ``[tiles, tokens, neuron]`` (vision tower, projector).
        """
        if on_sequence:
            if tuple(act.shape[:2]) != self.shape:
                raise ValueError(f"a language-model hook saw shape {tuple(act.shape)}; the batch is {list(self.shape)}")
            return act[self.lm_index], self.lm_group
        if act.shape[0] != self.n_tiles:
            raise ValueError(
                f"a neuron hook saw a tensor of shape {tuple(act.shape)}; expected [batch, pos, ...] = "
                f"{list(self.shape)} or [tiles, tokens, ...] with {self.n_tiles} tiles"
            )
        tokens = act.shape[1]
        rows = act[self.tile_index].flatten(0, 1)
        return rows, self.tile_group_rows.repeat_interleave(tokens)


def _position_groups(mm: ModalityMap, domain_of_row: Tensor, classes: Sequence[str]) -> _Groups:
    n_classes = len(classes)
    masks = {
        "image": mm.mask("image"),
        "text": mm.mask("text"),
        "all": ~mm.mask("padding"),
        "last": mm.last_mask(),
    }
    batch_index, pos_index, group = [], [], []
    for c, name in enumerate(classes):
        b, p = torch.nonzero(masks[name], as_tuple=True)
        batch_index.append(b)
        pos_index.append(p)
        group.append(domain_of_row[b] * n_classes + c)
    tile_domain = domain_of_row[mm.tile_rows()]
    vision_classes = torch.tensor([c for c, name in enumerate(classes) if name in ("image", "all")], dtype=torch.long)
    tile_group = rearrange(tile_domain, "tile -> tile 1") * n_classes + rearrange(vision_classes, "cls -> 1 cls")
    return _Groups(
        lm_index=(torch.cat(batch_index), torch.cat(pos_index)),
        lm_group=torch.cat(group),
        tile_group_rows=rearrange(tile_group, "tile cls -> (tile cls)"),
        tile_index=torch.arange(len(tile_domain)).repeat_interleave(len(vision_classes)),
        shape=mm.shape,
        n_tiles=int(mm.image_tiles.sum()),
    )
