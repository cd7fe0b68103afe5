"""Where do modalities converge? Per layer: how alike the modalities' representations are,
how much the last token attends to each modality, and what knocking those edges out does
to the answer — with and without the modality-specific neurons switched off (MINER §4).

Memory: one mean residual per sample, layer and modality (``samples x layers x modalities
x d_model`` floats) — run it on an evaluation subset (hundreds of samples), not a corpus.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.analysis.attention import attention_to_modalities, knockout_effect
from mm_lens.analysis.similarity import centered_mean_cosine, linear_cka
from mm_lens.base.hooks import block_hook, parse_block_hook
from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.base.modality import MODALITIES
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.inputs import answer_token_ids
from mm_lens.model.samples import Sample, Samples, chat_prompt, prompt_batch, sample_chunks
from mm_lens.neurons.deactivation import deactivated
from mm_lens.neurons.modality_neurons import modality_masks
from mm_lens.base.display import new_figure
from mm_lens.neurons.neuron_set import NeuronSet


@dataclass
class ModalityRepresentations:
    """Mean residual (``resid_post``) of each modality's positions, per sample and layer
    (NaN where the sample lacks the modality), and the mean over all positions per layer."""

    means: Float[Tensor, "sample layer modality d_model"]
    center: Float[Tensor, "layer d_model"]
    modalities: list[str]

    def cosine(self) -> Float[Tensor, "layer modality modality"]:
        """Cosine of the modality means (over samples) centred by the all-position mean."""
        present = ~self.means.isnan()
        totals = torch.where(present, self.means, 0.0).sum(0)
        counts = present.sum(0)
        dataset_means = torch.where(counts > 0, totals / counts.clamp(min=1), torch.nan)  # NaN: modality never seen
        return torch.stack([centered_mean_cosine(dataset_means[l], self.center[l]) for l in range(self.center.shape[0])])

    def cka(self) -> Float[Tensor, "layer modality modality"]:
        """Linear CKA between modalities over the samples holding both (NaN if < 2)."""
        n_layers, n_mod = self.means.shape[1], self.means.shape[2]
        result = torch.full((n_layers, n_mod, n_mod), torch.nan, dtype=torch.float64)
        for i in range(n_mod):
            for j in range(n_mod):
                both = ~(self.means[:, 0, i].isnan().any(-1) | self.means[:, 0, j].isnan().any(-1))
                if int(both.sum()) >= 2:
                    for layer in range(n_layers):
                        result[layer, i, j] = linear_cka(self.means[both, layer, i], self.means[both, layer, j])
        return result


def modality_representations(
    model: HookedMLLM,
    samples: Samples,
    modalities: Sequence[str] = ("text", "image"),
    *,
    neurons_off: NeuronSet | None = None,
    batch_size: int = 8,
) -> ModalityRepresentations:
    """Per-sample, per-layer mean residual of each modality (prefill, after each block),
    reduced inside the hooks layer by layer; results on the CPU."""
    n_layers, width = model.cfg.n_layers, model.cfg.d_model
    rows, center_sum, center_count = [], torch.zeros(n_layers, width, dtype=torch.float64), 0
    for _, chunk in sample_chunks(samples, batch_size):
        batch = prompt_batch(model, chunk)
        masks = modality_masks(batch.modality_map, modalities)
        keep = (~batch.modality_map.mask("padding")).float()
        means = torch.full((len(chunk), n_layers, len(modalities), width), torch.nan)

        def reduce_layer(resid: Tensor, hook: Any) -> None:
            layer, act = parse_block_hook(hook.name)[0], resid.float()
            center_sum[layer] += torch.einsum("bpd,bp->d", act, keep.to(act.device)).double().cpu()
            for m, name in enumerate(modalities):
                weights = masks[name].to(act.device).float()
                counts = weights.sum(1, keepdim=True)
                means[:, layer, m] = (torch.einsum("bpd,bp->bd", act, weights) / counts).cpu()  # NaN where absent

        hooks = [(block_hook(l, "resid_post"), reduce_layer) for l in range(n_layers)]
        with torch.no_grad(), _switched_off(model, neurons_off):
            model.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
        center_count += int(keep.sum())
        rows.append(means)
    return ModalityRepresentations(torch.cat(rows), (center_sum / center_count).float(), list(modalities))


def _switched_off(model: HookedMLLM, neurons: NeuronSet | None):
    return nullcontext() if neurons is None else deactivated(model, neurons)


@dataclass
class ConvergenceResult:
    """Per-layer convergence curves for each condition (``baseline``, ``neurons_off``).

    ``cosine``/``cka``: ``[layer, modality, modality]``; ``last_attention``: ``[layer,
    modality]`` (head-averaged share of the last token's attention); ``knockout``: ``[layer,
    modality]`` answer log-probability with the last token's edges to that modality knocked
    out at that layer, and ``clean``: the log-probability without knockout.
    """

    modalities: list[str]
    curves: dict[str, dict[str, Tensor]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        lines = []
        for condition, c in self.curves.items():
            lines.append(f"[{condition}] clean answer log-prob {float(c['clean']):+.3f}")
            pairs = [(i, j) for i in range(len(self.modalities)) for j in range(i + 1, len(self.modalities))]
            header = ["layer"] + [f"cos {self.modalities[i]}-{self.modalities[j]}" for i, j in pairs]
            header += [f"cka {self.modalities[i]}-{self.modalities[j]}" for i, j in pairs]
            header += [f"attn->{m}" for m in self.modalities] + [f"KO {m}" for m in self.modalities]
            lines.append("  ".join(f"{h:>14}" for h in header))
            for layer in range(c["cosine"].shape[0]):
                cells = [str(layer)] + [f"{float(c['cosine'][layer, i, j]):.3f}" for i, j in pairs]
                cells += [f"{float(c['cka'][layer, i, j]):.3f}" for i, j in pairs]
                cells += [f"{float(v):.3f}" for v in c["last_attention"][layer]]
                cells += [f"{float(v - c['clean']):+.3f}" for v in c["knockout"][layer]]
                lines.append("  ".join(f"{x:>14}" for x in cells))
        return "\n".join(lines)

    def plot(self):
        """Four panels over layers: cosine, CKA, last-token attention, knockout effect; solid
        lines for the baseline, dashed with the neurons off."""
        figure = new_figure(13, 8)
        axes = figure.subplots(2, 2).flatten()
        styles = {"baseline": "-", "neurons_off": "--"}
        pairs = [(i, j) for i in range(len(self.modalities)) for j in range(i + 1, len(self.modalities))]
        for condition, c in self.curves.items():
            layers = range(c["cosine"].shape[0])
            for i, j in pairs:
                label = f"{self.modalities[i]}-{self.modalities[j]} ({condition})"
                axes[0].plot(layers, c["cosine"][:, i, j], styles[condition], label=label)
                axes[1].plot(layers, c["cka"][:, i, j], styles[condition], label=label)
            for m, name in enumerate(self.modalities):
                axes[2].plot(layers, c["last_attention"][:, m], styles[condition], label=f"{name} ({condition})")
                axes[3].plot(layers, c["knockout"][:, m] - c["clean"], styles[condition], label=f"{name} ({condition})")
        titles = ["cosine of centred modality means", "linear CKA between modalities",
                  "last token's attention to each modality", "Δ answer log-prob, last→modality knocked out"]
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            ax.set_xlabel("layer")
            ax.legend(fontsize=7)
        return figure

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> None:
        """``folder/convergence.safetensors``: every curve, modalities and metadata."""
        tensors = {f"{cond}/{name}": t for cond, c in self.curves.items() for name, t in c.items()}
        save_tensors(Path(folder) / "convergence.safetensors", tensors, {"modalities": self.modalities, "metadata": self.metadata}, "ConvergenceResult", overwrite)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ConvergenceResult":
        tensors, header = load_tensors(Path(folder) / "convergence.safetensors", "ConvergenceResult")
        curves: dict[str, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            condition, name = key.split("/", 1)
            curves.setdefault(condition, {})[name] = tensor
        return cls(header["modalities"], curves, header["metadata"])


def _first_answer_logprob(model: HookedMLLM, chunk: Sequence[Sample], last: Tensor):
    """Metric for knockout: mean log-probability of each answer's first token at the last
    prompt position."""
    first = torch.tensor([
        answer_token_ids(model.processor, chat_prompt(model, s), s["answer"])[0]
        for s in chunk
    ])
    rows = torch.arange(len(chunk))

    def metric(logits: Tensor) -> Tensor:
        return logits[rows, last].float().log_softmax(-1)[rows, first].mean()

    return metric


def analyze_convergence(
    model: HookedMLLM,
    samples: Samples,
    *,
    modalities: Sequence[str] = ("text", "image"),
    neurons: NeuronSet | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> ConvergenceResult:
    """Per-layer convergence curves on ``samples`` (with ``answer``), once as is and, when
    ``neurons`` is given (e.g. the modality-specific neurons), once with them switched off.

    Knockout cuts the last token's attention to one modality at one layer and records the
    mean log-probability of the answer's first token.
    """
    not_positional = [m for m in modalities if m not in MODALITIES]
    if not_positional:
        raise ValueError(f"convergence curves need ModalityMap modalities ({', '.join(MODALITIES)}), not {not_positional}")
    conditions = {"baseline": None} | ({} if neurons is None else {"neurons_off": neurons})
    curves = {}
    steps = len(conditions) * ((len(samples) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="convergence", disable=not progress, unit="batch")
    for condition, off in conditions.items():
        representations = modality_representations(model, samples, modalities, neurons_off=off, batch_size=batch_size)
        attention, knocked, clean, rows = 0.0, 0.0, 0.0, 0
        for _, chunk in sample_chunks(samples, batch_size):
            batch = prompt_batch(model, chunk)
            metric = _first_answer_logprob(model, chunk, batch.modality_map.last)
            with torch.no_grad(), _switched_off(model, off):
                share = attention_to_modalities(model, batch, query="last", modalities=tuple(modalities)).by_layer()
                effects = [knockout_effect(model, batch, metric=metric, keys=m) for m in modalities]
            weight = len(chunk)
            attention = attention + share.double() * weight
            knocked = knocked + rearrange(torch.stack([e.knocked for e in effects]), "modality layer -> layer modality").double() * weight
            clean = clean + float(effects[0].clean) * weight
            rows += weight
            bar.update(1)
        curves[condition] = {
            "cosine": representations.cosine(),
            "cka": representations.cka(),
            "last_attention": attention / rows,
            "knockout": knocked / rows,
            "clean": torch.tensor(clean / rows, dtype=torch.float64),
        }
    bar.close()
    metadata = {"n_samples": len(samples), "neurons": None if neurons is None else neurons.metadata}
    return ConvergenceResult(list(modalities), curves, metadata)
