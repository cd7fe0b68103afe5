"""NeuronSet: chosen neurons per group (a domain or a modality), module and layer.

``neurons[group][module][layer]`` is a sorted, unique int64 tensor of neuron indices in
``[0, widths[module])``; modules are the keys of ``HookedMLLM.neuron_hooks`` (``lm_mlp``,
``vision_mlp``, ``projector``), a layer is one hook of that module. Built from
``lape_select`` (``from_lape``) or ``miner_select`` (``from_pairs``); ``random_control``
draws the matched random set that both papers lack; ``save``/``load`` keep it with its
provenance.

Decisions:

- Tensors are stored as int64 on the CPU (move them when indexing activations).
- Group order is kept and matters (rows of ``counts``/``overlap``, equality); modules
  follow the order of ``widths``.
- ``count(group=None)`` and the ``(any group)`` row of ``table`` count the union: a neuron
  chosen for several groups counts once. ``counts`` is per group.
- ``==`` compares the selection (groups, modules, widths, layers, indices), not
  ``metadata``: metadata is provenance and ``save`` adds library versions to it.
- ``jaccard`` of two empty sets is 1 (they are equal sets).
- Files: ``neurons.json`` holds names, widths, layer counts and metadata;
  ``neurons.safetensors`` holds, per (group, module) by position, the layers' indices
  concatenated (``"{g}/{m}/indices"``) and layer boundaries (``"{g}/{m}/offsets"``), so
  names may contain anything and empty layers need no special case. Each file is written
  with ``base.io.atomic_write`` (a temporary file moved into place).
- Plots build a ``matplotlib.figure.Figure`` directly (no pyplot, no backend or display
  needed, nothing shown); pass ``ax`` to draw into your own figure.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from mm_lens.base.display import figure_and_axes, new_figure, text_table
from mm_lens.base.compat import installed_versions
from mm_lens.base.io import atomic_write, refuse_to_replace

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["NeuronSet"]

FORMAT = "mm_lens.NeuronSet"
FORMAT_VERSION = 1
JSON_NAME = "neurons.json"
TENSORS_NAME = "neurons.safetensors"
VERSIONED_PACKAGES = ("mm_lens", "torch", "transformers", "transformer_lens")
UNION_LABEL = "(any group)"


def library_versions() -> dict[str, str | None]:
    """Installed versions of the packages results depend on (None if not installed)."""
    return installed_versions(VERSIONED_PACKAGES)


def _where(group: str, module: str, layer: int) -> str:
    return f"group {group!r}, module {module!r}, layer {layer}"


def _check_indices(t: Any, width: int, where: str) -> Tensor:
    """The layer's indices as a CPU int64 tensor, or ``ValueError`` saying what is wrong."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{where}: got {type(t).__name__}; pass a 1-D integer tensor")
    if t.ndim != 1:
        raise ValueError(f"{where}: indices have shape {tuple(t.shape)}; pass a 1-D tensor")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(
            f"{where}: indices have dtype {t.dtype}; pass neuron indices as an integer tensor "
            "(torch.nonzero(mask).flatten() for a mask)"
        )
    t = t.detach().to(device="cpu", dtype=torch.long).contiguous()
    if t.numel() == 0:
        return t
    step = t[1:] - t[:-1]
    if (step < 0).any():
        i = int(torch.nonzero(step < 0)[0])
        raise ValueError(
            f"{where}: indices are not sorted ({int(t[i])} before {int(t[i + 1])}); "
            "pass torch.sort(indices).values"
        )
    if (step == 0).any():
        i = int(torch.nonzero(step == 0)[0])
        raise ValueError(
            f"{where}: neuron {int(t[i])} appears more than once; pass unique indices "
            "(torch.unique)"
        )
    lo, hi = int(t[0]), int(t[-1])
    if lo < 0 or hi >= width:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{where}: neuron {bad} is out of range; the module has {width} neurons per "
            f"layer, so indices must lie in [0, {width})"
        )
    return t


@dataclass(eq=False)
class NeuronSet:
    """Chosen neurons: ``neurons[group][module][layer]`` = sorted unique int64 indices.

    ``widths[module]``: neurons per layer of each module. ``metadata``: JSON-able
    provenance (model, data, method, parameters; ``save`` adds library versions).
    """

    neurons: dict[str, dict[str, list[Tensor]]]
    widths: dict[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.widths, Mapping) or not self.widths:
            raise ValueError("widths is empty; pass {module: neurons per layer} for every module")
        for module, width in self.widths.items():
            if not isinstance(module, str) or not module:
                raise ValueError(f"module name {module!r} is not a non-empty string")
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(
                    f"widths[{module!r}] is {width!r}; pass the number of neurons per layer "
                    "(a positive int)"
                )
        if not isinstance(self.neurons, Mapping) or not self.neurons:
            raise ValueError("neurons is empty; a NeuronSet needs at least one group")
        modules = list(self.widths)
        layer_counts: dict[str, int] = {}
        checked: dict[str, dict[str, list[Tensor]]] = {}
        for group, per_module in self.neurons.items():
            if not isinstance(group, str) or not group:
                raise ValueError(f"group name {group!r} is not a non-empty string")
            if not isinstance(per_module, Mapping) or set(per_module) != set(modules):
                have = sorted(per_module) if isinstance(per_module, Mapping) else per_module
                raise ValueError(
                    f"group {group!r} has modules {have} but widths has {sorted(modules)}; "
                    "every group needs exactly the modules of widths"
                )
            checked[group] = {}
            for module in modules:
                layers = per_module[module]
                if not isinstance(layers, (list, tuple)) or not layers:
                    raise ValueError(
                        f"group {group!r}, module {module!r}: pass a non-empty list with one "
                        "index tensor per layer"
                    )
                expected = layer_counts.setdefault(module, len(layers))
                if len(layers) != expected:
                    first = next(iter(checked))
                    raise ValueError(
                        f"group {group!r}, module {module!r} has {len(layers)} layers but group "
                        f"{first!r} has {expected}; all groups need the same layers per module"
                    )
                width = self.widths[module]
                checked[group][module] = [
                    _check_indices(t, width, _where(group, module, layer))
                    for layer, t in enumerate(layers)
                ]
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"metadata is not JSON-able ({err}); store numbers, strings, lists and dicts "
                "(convert tensors with .tolist())"
            ) from None
        self.neurons = checked
        self.widths = {m: int(self.widths[m]) for m in modules}
        self.metadata = dict(self.metadata or {})

    # ---- constructors ----------------------------------------------------------------
    @classmethod
    def from_lape(
        cls,
        result_per_module: Mapping[str, Sequence[Sequence[Tensor]]],
        groups: Sequence[str],
        widths: Mapping[str, int],
        metadata: Mapping[str, Any] | None = None,
    ) -> NeuronSet:
        """From ``lape_select`` outputs: ``result_per_module[module][domain][layer]``, the
        domains in the order of ``groups``. ``metadata["method"]`` defaults to ``"lape"``."""
        groups = list(groups)
        if len(set(groups)) != len(groups):
            raise ValueError(f"group names repeat: {groups}; pass each once")
        for module, per_domain in result_per_module.items():
            if len(per_domain) != len(groups):
                raise ValueError(
                    f"lape result for module {module!r} has {len(per_domain)} domains but "
                    f"{len(groups)} groups {groups} were given; pass one name per domain"
                )
        neurons = {
            g: {m: list(per_domain[i]) for m, per_domain in result_per_module.items()}
            for i, g in enumerate(groups)
        }
        return cls(neurons, dict(widths), {"method": "lape", **(metadata or {})})

    @classmethod
    def from_pairs(
        cls,
        pairs: Mapping[str, Tensor],
        module: str,
        n_layers: int,
        width: int,
        metadata: Mapping[str, Any] | None = None,
    ) -> NeuronSet:
        """From ``miner_select`` output: per group, ``(layer, neuron)`` pairs ``[k, 2]`` of one
        module (any order; each group its own ``k``, checked here). ``metadata["method"]``
        defaults to ``"miner"``."""
        neurons = {}
        for group, p in pairs.items():
            if not isinstance(p, Tensor) or p.ndim != 2 or p.shape[1] != 2:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(
                    f"pairs[{group!r}] has shape {shape}; pass (layer, neuron) pairs, [k, 2]"
                )
            p = p.detach().cpu().long()
            layer = p[:, 0]
            if ((layer < 0) | (layer >= n_layers)).any():
                bad = int(layer[(layer < 0) | (layer >= n_layers)][0])
                raise ValueError(
                    f"pairs[{group!r}] names layer {bad} but module {module!r} has "
                    f"{n_layers} layers; pass n_layers of the scores the pairs came from"
                )
            neurons[group] = {
                module: [torch.sort(p[layer == l, 1]).values for l in range(n_layers)]
            }
        return cls(neurons, {module: width}, {"method": "miner", **(metadata or {})})

    # ---- shape -------------------------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        return list(self.neurons)

    @property
    def modules(self) -> list[str]:
        return list(self.widths)

    def n_layers(self, module: str) -> int:
        self._check_module(module)
        return len(next(iter(self.neurons.values()))[module])

    def _check_module(self, module: str) -> None:
        if module not in self.widths:
            raise KeyError(f"unknown module {module!r}; this NeuronSet has {self.modules}")

    def _check_group(self, group: str) -> None:
        if group not in self.neurons:
            raise KeyError(f"unknown group {group!r}; this NeuronSet has {self.groups}")

    def _selected_modules(self, module: str | None) -> list[str]:
        if module is None:
            return self.modules
        self._check_module(module)
        return [module]

    # ---- counts --------------------------------------------------------------------
    def count(self, group: str | None = None, module: str | None = None) -> int:
        """Chosen (module, layer, neuron) of ``group`` (None: of any group, each counted
        once), in ``module`` (None: all modules)."""
        modules = self._selected_modules(module)
        if group is None:
            union = self.union()
            return sum(int(t.numel()) for m in modules for t in union[m])
        self._check_group(group)
        return sum(int(t.numel()) for m in modules for t in self.neurons[group][m])

    def counts(self, module: str) -> Int[Tensor, "group layer"]:
        """Neurons chosen per group and layer of ``module``."""
        self._check_module(module)
        return torch.tensor(
            [[t.numel() for t in self.neurons[g][module]] for g in self.groups],
            dtype=torch.long,
        ).reshape(len(self.groups), self.n_layers(module))

    def records(self) -> list[dict[str, Any]]:
        """One dict per group, module and layer: ``group, module, layer, count, width``."""
        return [
            {"group": g, "module": m, "layer": layer, "count": int(t.numel()),
             "width": self.widths[m]}
            for g in self.groups
            for m in self.modules
            for layer, t in enumerate(self.neurons[g][m])
        ]

    def table(self) -> str:
        """Counts as text: totals per group x module, then per layer for each module.
        The ``(any group)`` row counts the union (shared neurons once)."""
        union = self.union()
        per_layer = {
            m: [*self.counts(m).tolist(), [int(t.numel()) for t in union[m]]]
            for m in self.modules
        }
        labels = [*self.groups, UNION_LABEL]
        totals = [[sum(per_layer[m][i]) for m in self.modules] for i in range(len(labels))]
        rows = [[label, *row, sum(row)] for label, row in zip(labels, totals)]
        blocks = [
            "neurons per group and module\n" + text_table(["group", *self.modules, "all"], rows)
        ]
        for m in self.modules:
            n = self.n_layers(m)
            header = ["group", "total", *(f"L{layer}" for layer in range(n))]
            rows = [[label, sum(c), *c] for label, c in zip(labels, per_layer[m])]
            title = f"{m}: {n} layers x {self.widths[m]} neurons"
            blocks.append(f"{title}\n{text_table(header, rows)}")
        return "\n\n".join(blocks)

    def __repr__(self) -> str:
        shape = {m: f"{self.n_layers(m)}x{self.widths[m]}" for m in self.modules}
        method = self.metadata.get("method")
        return (
            f"NeuronSet(groups={self.groups}, modules={shape}, "
            f"count={self.count()}, method={method!r})"
        )

    # ---- set algebra ---------------------------------------------------------------
    def _masks(self, module: str, layer: int) -> Float[Tensor, "group neuron"]:
        masks = torch.zeros(len(self.groups), self.widths[module], dtype=torch.float64)
        for i, g in enumerate(self.groups):
            masks[i, self.neurons[g][module][layer]] = 1.0
        return masks

    def overlap(self, module: str | None = None) -> Int[Tensor, "group group"]:
        """Shared (module, layer, neuron) between each pair of groups; the diagonal holds
        each group's size. ``module`` None: all modules."""
        total = torch.zeros(len(self.groups), len(self.groups), dtype=torch.float64)
        for m in self._selected_modules(module):
            for layer in range(self.n_layers(m)):
                masks = self._masks(m, layer)
                total += masks @ masks.T
        return total.round().long()

    def jaccard(self, module: str | None = None) -> Float[Tensor, "group group"]:
        """|A ∩ B| / |A ∪ B| for each pair of groups (1 for two empty sets)."""
        shared = self.overlap(module).double()
        size = shared.diagonal()
        union = size[:, None] + size[None, :] - shared
        return torch.where(union > 0, shared / union.clamp(min=1), 1.0)

    def union(self, groups: Sequence[str] | None = None) -> dict[str, list[Tensor]]:
        """Per module, per layer: neurons chosen for any of ``groups`` (None: all)."""
        groups = self.groups if groups is None else list(groups)
        for g in groups:
            self._check_group(g)
        return {
            m: [
                torch.unique(torch.cat([self.neurons[g][m][layer] for g in groups]))
                if groups
                else torch.zeros(0, dtype=torch.long)
                for layer in range(self.n_layers(m))
            ]
            for m in self.modules
        }

    def complement(self, group: str) -> dict[str, list[Tensor]]:
        """Per module, per layer: the neurons NOT chosen for ``group``."""
        self._check_group(group)
        out = {}
        for m in self.modules:
            everything = torch.arange(self.widths[m])
            out[m] = [
                everything[~torch.isin(everything, chosen)] for chosen in self.neurons[group][m]
            ]
        return out

    # ---- controls ------------------------------------------------------------------
    def random_control(self, seed: int, exclude_selected: bool = True) -> NeuronSet:
        """As many random neurons as chosen, per group, module and layer, drawn with
        ``torch.Generator().manual_seed(seed)``; with ``exclude_selected`` none of them is
        among the group's own chosen neurons."""
        gen = torch.Generator().manual_seed(seed)
        neurons: dict[str, dict[str, list[Tensor]]] = {}
        for g in self.groups:
            neurons[g] = {}
            for m in self.modules:
                drawn = []
                everything = torch.arange(self.widths[m])
                for layer, chosen in enumerate(self.neurons[g][m]):
                    pool = everything
                    if exclude_selected:
                        pool = everything[~torch.isin(everything, chosen)]
                    k = chosen.numel()
                    if k > pool.numel():
                        raise ValueError(
                            f"{_where(g, m, layer)}: {k} of {self.widths[m]} neurons are "
                            f"chosen, so only {pool.numel()} others remain to draw {k} from; "
                            "pass exclude_selected=False or choose fewer neurons"
                        )
                    pick = torch.randperm(pool.numel(), generator=gen)[:k]
                    drawn.append(torch.sort(pool[pick]).values)
                neurons[g][m] = drawn
        metadata = {
            "method": "random_control",
            "seed": seed,
            "exclude_selected": exclude_selected,
            "source": self.metadata,
        }
        return NeuronSet(neurons, dict(self.widths), metadata)

    # ---- equality ------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        """Same groups (in order), modules, widths, layers and indices; metadata ignored."""
        if not isinstance(other, NeuronSet):
            return NotImplemented
        if self.groups != other.groups or self.widths != other.widths:
            return False
        return all(
            len(self.neurons[g][m]) == len(other.neurons[g][m])
            and all(torch.equal(a, b) for a, b in zip(self.neurons[g][m], other.neurons[g][m]))
            for g in self.groups
            for m in self.modules
        )

    __hash__ = None  # type: ignore[assignment]

    # ---- files ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``path/neurons.safetensors`` and ``path/neurons.json`` (folder created);
        library versions are added to the saved metadata unless already there."""
        folder = Path(path)
        for name in (TENSORS_NAME, JSON_NAME):
            refuse_to_replace(folder / name, overwrite)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for gi, g in enumerate(self.groups):
            for mi, m in enumerate(self.modules):
                layers = self.neurons[g][m]
                sizes = torch.tensor([0, *(t.numel() for t in layers)], dtype=torch.long)
                tensors[f"{gi}/{mi}/indices"] = torch.cat(layers).contiguous()
                tensors[f"{gi}/{mi}/offsets"] = torch.cumsum(sizes, 0)
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "groups": self.groups,
            "modules": self.modules,
            "widths": self.widths,
            "n_layers": {m: self.n_layers(m) for m in self.modules},
            "metadata": {
                **self.metadata,
                "versions": self.metadata.get("versions") or library_versions(),
            },
        }
        text = json.dumps(header, indent=2)
        atomic_write(
            folder / TENSORS_NAME,
            lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}),
        )

        def write_json(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")

        atomic_write(folder / JSON_NAME, write_json)
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronSet:
        """Read a folder written by ``save``."""
        folder = Path(path)
        json_path, tensors_path = folder / JSON_NAME, folder / TENSORS_NAME
        for p in (json_path, tensors_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found; pass a folder written by NeuronSet.save")
        header = json.loads(json_path.read_text(encoding="utf-8"))
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{json_path} has format {header.get('format')!r} version "
                f"{header.get('format_version')!r}; expected {FORMAT!r} version {FORMAT_VERSION}"
            )
        tensors = load_file(tensors_path)
        neurons = {}
        for gi, g in enumerate(header["groups"]):
            neurons[g] = {}
            for mi, m in enumerate(header["modules"]):
                key = f"{gi}/{mi}"
                if f"{key}/indices" not in tensors or f"{key}/offsets" not in tensors:
                    raise ValueError(
                        f"{tensors_path} lacks {key}/indices or {key}/offsets (group {g!r}, "
                        f"module {m!r}); the two files do not belong together"
                    )
                flat, offsets = tensors[f"{key}/indices"], tensors[f"{key}/offsets"].tolist()
                if len(offsets) != header["n_layers"][m] + 1 or offsets[-1] != flat.numel():
                    raise ValueError(
                        f"{tensors_path}: group {g!r}, module {m!r} has offsets {offsets} for "
                        f"{flat.numel()} indices and {header['n_layers'][m]} layers; the files "
                        "do not belong together"
                    )
                neurons[g][m] = [flat[a:b].clone() for a, b in zip(offsets[:-1], offsets[1:])]
        widths = {m: header["widths"][m] for m in header["modules"]}
        return cls(neurons, widths, header["metadata"])

    # ---- plots ---------------------------------------------------------------------
    def plot_layers(self, module: str, ax: Axes | None = None, kind: str = "line") -> Figure:
        """Neurons per layer of ``module``, one series per group (``kind`` "line" or "bar")."""
        if kind not in ("line", "bar"):
            raise ValueError(f"kind is {kind!r}; pass 'line' or 'bar'")
        counts = self.counts(module)
        fig, ax = figure_and_axes(ax)
        layers = torch.arange(self.n_layers(module))
        kind = "bar" if len(layers) == 1 else kind  # one point per series reads better as bars
        n = len(self.groups)
        markers, styles = "osD^v<>p", ("-", "--", "-.", ":")
        for i, g in enumerate(self.groups):
            if kind == "line":  # each series shifted a little and drawn its own way: equal counts stay visible
                shift = (i - (n - 1) / 2) * 0.12 / max(n - 1, 1)
                ax.plot((layers + shift).tolist(), counts[i].tolist(), marker=markers[i % len(markers)],
                        linestyle=styles[i % len(styles)], label=g)
            else:
                offset = (i - (n - 1) / 2) * 0.8 / n
                ax.bar((layers + offset).tolist(), counts[i].tolist(), width=0.8 / n, label=g)
        from matplotlib.ticker import MaxNLocator

        if len(layers) <= 16:
            ax.set_xticks(layers.tolist())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("neurons")
        ax.set_title(f"{module}: chosen neurons per layer")
        ax.legend()
        return fig

    def plot_overlap(
        self, module: str | None = None, ax: Axes | None = None, jaccard: bool = False
    ) -> Figure:
        """Heatmap of ``overlap`` (or ``jaccard``) between groups, values written in cells."""
        values = self.jaccard(module) if jaccard else self.overlap(module)
        fig, ax = figure_and_axes(ax)
        image = ax.imshow(values.double().numpy(), cmap="viridis")
        n = len(self.groups)
        ax.set_xticks(range(n), self.groups, rotation=45, ha="right")
        ax.set_yticks(range(n), self.groups)
        top = float(values.max()) if values.numel() else 0.0
        for i in range(n):
            for j in range(n):
                v = float(values[i, j])
                text = f"{v:.2f}" if jaccard else str(int(v))
                color = "black" if v > top / 2 else "white"
                ax.text(j, i, text, ha="center", va="center", color=color)
        fig.colorbar(image, ax=ax)
        what = "Jaccard index" if jaccard else "shared neurons"
        ax.set_title(f"{what} ({module or 'all modules'})")
        return fig

    def plot(self) -> Figure:
        """``plot_layers`` for every module, side by side."""
        fig = new_figure(5 * len(self.modules), 3.5)
        axes = fig.subplots(1, len(self.modules), squeeze=False)[0]
        for m, ax in zip(self.modules, axes):
            self.plot_layers(m, ax=ax)
        return fig
