"""Logit lens on any position, image tokens first (MMNeuron's three-stage analysis).

After a layer, ``unembed(final_norm(resid))`` reads the residual stream as if the model
stopped there. Per layer and position this module reports the entropy of that distribution
(nats), its top-k tokens and probabilities, and the log-probability and rank of given target
tokens; over a dataset, per-domain entropy curves with their spread, the most frequent top
tokens per layer, and an automatic split of the layers into three stages.

Decisions:

- **The pure core** (chunked statistics in bounded memory, precision, ranks, the stage
  rule) is ``mm_lens.analysis.lens_core``.
- **Residual kinds** (``resid_pre``, ``resid_mid``, ``resid_post``) go through the model's
  real final norm (the HF module the bridge wraps) and ``lm_head`` weight and bias: at the
  last layer's ``resid_post`` the lens equals the model's own log-probabilities.
- **Component kinds** (``attn_out``, ``mlp_out``) are read as *direct* logits, the
  convention of direct logit attribution and TransformerLens' ``apply_ln_to_stack``: the
  component is centred if the final norm is a LayerNorm, divided by the scale of the
  **final** residual at that position (``ln_final.hook_scale``, taken from a first forward),
  multiplied by the norm's weight, and unembedded without the bias. With this convention the
  direct logits of the embedding and of every ``attn_out`` and ``mlp_out``, plus the bias,
  sum to the model's logits. Asking for a component kind costs one extra forward.
- **Summary spread** is the standard deviation over positions (every selected token of every
  sample of the domain), streamed as sums and sums of squares in float64.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.analysis.lens_core import LensStats, Norm, lens_logits, lens_logits_stats, three_stages
from mm_lens.base.display import new_figure
from mm_lens.base.fast_path import mismatch, warn_fallback
from mm_lens.base.hooks import block_hook, resolve_layers
from mm_lens.base.io import load_tensors, save_tensors
from mm_lens.base.modality import position_mask
from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.samples import Samples, prompt_batch, sample_chunks, sample_column

RESIDUAL_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
COMPONENT_KINDS: tuple[str, ...] = ("attn_out", "mlp_out")
HOOK_KINDS: tuple[str, ...] = RESIDUAL_KINDS + COMPONENT_KINDS

def final_norm_and_unembed(model: HookedMLLM) -> tuple[Norm, Tensor, Tensor | None]:
    """The model's real final norm (the HF module), ``W_U`` ``[d_model, vocab]`` (a view of
    ``lm_head.weight``, tied or not) and ``b_U`` (None when ``lm_head`` has no bias)."""
    unembed = model.bridge.unembed
    bias = getattr(unembed.original_component, "bias", None)
    b_U = unembed.b_U if bias is not None and bool(bias.any()) else None
    return model.bridge.ln_final.original_component, unembed.W_U, b_U


def normalize_component(
    model: HookedMLLM, component: Float[Tensor, "... d_model"], final_scale: Float[Tensor, "... 1"]
) -> Float[Tensor, "... d_model"]:
    """A residual component as the final norm sees it inside the final residual: centred
    (LayerNorm only), divided by the final residual's ``final_scale`` (``ln_final.hook_scale``)
    and multiplied by the norm's weight, without the norm's bias. Linear in ``component``:
    the components' results sum to ``final_norm(final residual)`` (less the norm's bias)."""
    ln = model.bridge.ln_final
    x = component.float()
    if not ln.uses_rms_norm:
        x = x - x.mean(-1, keepdim=True)
    weight = ln.original_component.weight
    weight = 1.0 + weight if ln.uses_weight_offset else weight
    return weight * (x / final_scale.float()).to(component.dtype)


def _target_ids(model: HookedMLLM, targets: Any, n_columns: int, vocab: int) -> Tensor | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, Tensor) and all(isinstance(t, str) for t in targets):
        tokenizer = model.processor.tokenizer
        ids = []
        for word in targets:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ValueError(f"target {word!r} is {len(pieces)} tokens {pieces}; pass single tokens or token ids")
            ids.append(pieces[0])
        targets = ids
    targets = torch.as_tensor(targets)
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be token ids (integers) or single-token strings, got {targets.dtype}")
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < vocab):
        raise ValueError(f"target ids must lie in [0, {vocab}) (the vocabulary), got [{int(targets.min())}, {int(targets.max())}]")
    if targets.ndim == 1:
        return targets.long().expand(n_columns, -1).contiguous()
    if targets.ndim == 2 and targets.shape[0] == n_columns:
        return targets.long()
    raise ValueError(f"targets must be [target] ids for every position or [pos={n_columns}, target], got shape {tuple(targets.shape)}")


@dataclass
class LogitLens:
    """Logit-lens readings of one batch.

    ``stats[kind]`` holds ``[layer, pos]`` readings for each hook kind; column ``j`` of
    ``pos`` is batch row ``rows[j]``, sequence position ``positions[j]``; ``layers`` are the
    layer indices of the leading axis. With one kind, ``entropy``, ``top_ids``,
    ``top_probs``, ``target_logprobs`` and ``target_ranks`` read it directly.
    """

    stats: dict[str, LensStats]
    layers: list[int]
    rows: Int[Tensor, "pos"]
    positions: Int[Tensor, "pos"]
    targets: Int[Tensor, "pos target"] | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __getitem__(self, kind: str) -> LensStats:
        if kind not in self.stats:
            raise KeyError(f"no readings for {kind!r}; this lens has {list(self.stats)}")
        return self.stats[kind]

    def _only(self) -> LensStats:
        if len(self.stats) != 1:
            raise ValueError(f"this lens holds {list(self.stats)}; pick one with lens[kind]")
        return next(iter(self.stats.values()))

    entropy = property(lambda self: self._only().entropy)
    top_ids = property(lambda self: self._only().top_ids)
    top_probs = property(lambda self: self._only().top_probs)
    target_logprobs = property(lambda self: self._only().target_logprobs)
    target_ranks = property(lambda self: self._only().target_ranks)

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not read; this lens has layers {self.layers}")
        return self.layers.index(layer)

    def top_tokens(self, layer: int, kind: str | None = None) -> list[list[str]]:
        """Decoded top-k tokens at ``layer``, one list per column."""
        if self.tokenizer is None:
            raise ValueError("this lens has no tokenizer; decode top_ids with your tokenizer")
        stats = self._only() if kind is None else self[kind]
        ids = stats.top_ids[self._row(layer)]
        return [self.tokenizer.batch_decode([[i] for i in row]) for row in ids.tolist()]

    def table(self) -> str:
        """Per kind and layer: mean and std of the entropy over columns, most frequent top-1."""
        lines = [f"{len(self.rows)} positions"]
        for kind, stats in self.stats.items():
            lines.append(f"[{kind}]  layer  entropy mean ± std  most frequent top-1")
            for r, layer in enumerate(self.layers):
                (token, count), = Counter(stats.top_ids[r, :, 0].tolist()).most_common(1)
                name = self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)
                h = stats.entropy[r].double()
                lines.append(f"  {layer:>5}  {float(h.mean()):7.3f} ± {float(h.std(correction=0)):.3f}  {name!r} ({count}/{h.numel()})")
        return "\n".join(lines)


def _final_scale(model: HookedMLLM, batch: Any, mask: Tensor) -> Tensor:
    """``ln_final.hook_scale`` at the selected positions (one forward)."""
    kept = {}

    def keep(scale: Tensor, hook: Any) -> None:
        kept["scale"] = scale[mask.to(scale.device)]

    model.run_with_hooks(batch, fwd_hooks=[("ln_final.hook_scale", keep)], return_type=None)
    return kept["scale"]


def _final_rows_hooks(model: HookedMLLM, row: Tensor, col: Tensor, kept: dict[str, Tensor]) -> list:
    """Hooks keeping the last residual and the model's own logits at one position."""

    def keep(name: str):
        def hook(activation: Tensor, hook: Any) -> None:
            kept[name] = activation[row, col].detach()

        return hook

    return [(block_hook(model.cfg.n_layers - 1, "resid_post"), keep("resid")), ("unembed.hook_out", keep("logits"))]


def _check_against_model(kept: Mapping[str, Tensor], final_norm: Norm, W_U: Tensor, b_U: Tensor | None) -> None:
    """The lens' fast path (the HF final norm and ``lm_head`` weights applied directly) must
    give the model's own log-probabilities from its last residual; a mismatch (e.g. a release that adds
    a logit transform) is reported with a ``FastPathWarning``: intermediate layers have no
    other reference to fall back to."""
    if "logits" not in kept:
        return
    ours = lens_logits(kept["resid"][None].to(W_U.device), final_norm, W_U, b_U)[0]
    # log-probabilities: compatibility mode centres the unembedding, which shifts logits alone
    problem = mismatch(ours.float().log_softmax(-1), kept["logits"].to(ours.device).float().log_softmax(-1))
    if problem is not None:
        warn_fallback("logit lens", problem, "the lens readings may not be what the model computes")


def logit_lens(
    model: HookedMLLM,
    batch: Mapping[str, Any],
    *,
    hooks: str | Sequence[str] = "resid_post",
    positions: str | Sequence[str] | Tensor = "image",
    layers: Sequence[int] | None = None,
    k: int = 10,
    targets: Any = None,
    position_chunk: int = 256,
    vocab_chunk: int = 32768,
) -> LogitLens:
    """Logit lens of ``batch`` (a ``MultimodalBatch``) after each of ``layers`` (default all).

    ``hooks``: kinds among resid_pre, resid_mid, resid_post, attn_out, mlp_out (components are
    read as direct logits; see the module notes). ``positions``: see ``position_mask``.
    ``targets``: token ids or single-token strings read at every position, or ``[pos,
    target]`` ids per selected position. Readings are computed inside the hooks, layer by
    layer; no activation is cached. Attention runs through SDPA (``model.fast_attention``;
    ``model.use_sdpa = False`` keeps it eager).
    """
    kinds = [hooks] if isinstance(hooks, str) else list(hooks)
    unknown = [h for h in kinds if h not in HOOK_KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"hooks must be distinct kinds among {', '.join(HOOK_KINDS)}; got {kinds}")
    layer_list = resolve_layers(layers, model.cfg.n_layers)
    mm = batch.modality_map if hasattr(batch, "modality_map") else model.modality_map(batch)
    mask = position_mask(mm, positions)
    if not mask.any():
        raise ValueError(f"no position of the batch matches positions={positions!r} ({mm.summary()}); pass a batch with such tokens or other positions")
    rows, cols = torch.nonzero(mask, as_tuple=True)
    final_norm, W_U, b_U = final_norm_and_unembed(model)
    target_ids = _target_ids(model, targets, len(rows), W_U.shape[1])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= W_U.shape[1]:
        raise ValueError(f"k must be an integer in [1, {W_U.shape[1]}] (the vocabulary size), got {k!r}")

    with torch.no_grad(), model.fast_attention():  # no reading needs the attention pattern
        scale = _final_scale(model, batch, mask).to(W_U.device) if any(kind in COMPONENT_KINDS for kind in kinds) else None
        readings: dict[str, dict[int, LensStats]] = {kind: {} for kind in kinds}

        def reader(kind: str, layer: int):
            def hook(activation: Tensor, hook: Any) -> None:
                x = activation[mask.to(activation.device)].to(W_U.device)
                if kind in COMPONENT_KINDS:
                    x, norm, bias = normalize_component(model, x, scale), None, None
                else:
                    norm, bias = final_norm, b_U
                tgt = None if target_ids is None else target_ids.to(W_U.device)
                readings[kind][layer] = lens_logits_stats(
                    x, norm, W_U, bias, k=k, targets=tgt, position_chunk=position_chunk, vocab_chunk=vocab_chunk
                ).to("cpu")

            return hook

        fwd_hooks = [(block_hook(l, kind), reader(kind, l)) for kind in kinds for l in layer_list]
        model.run_with_hooks(batch, fwd_hooks=fwd_hooks + _final_rows_hooks(model, rows[0], cols[0], kept := {}), return_type=None)
    _check_against_model(kept, final_norm, W_U, b_U)
    stats = {kind: LensStats.stack([readings[kind][l] for l in layer_list]) for kind in kinds}
    return LogitLens(stats, layer_list, rows, cols, target_ids, getattr(model.processor, "tokenizer", None))


# ---- dataset summary ------------------------------------------------------------------
@dataclass
class LensSummary:
    """Per-domain logit-lens curves over a dataset, for one hook kind.

    ``entropy_sum``/``entropy_sq_sum`` ``[domain, layer]`` are float64 sums over positions;
    ``n_positions[domain]`` the positions read; ``top_counts[domain][layer]`` maps a token id
    to the number of positions that had it among their top ``k`` (k = 1: top-1 frequency);
    ``token_strings`` decodes the ids seen.
    """

    domains: list[str]
    layers: list[int]
    hook: str
    k: int
    n_positions: Int[Tensor, "domain"]
    n_samples: Int[Tensor, "domain"]
    entropy_sum: Float[Tensor, "domain layer"]
    entropy_sq_sum: Float[Tensor, "domain layer"]
    top_counts: dict[str, list[dict[int, int]]]
    token_strings: dict[int, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> Float[Tensor, "domain layer"]:
        """Mean entropy (nats) per domain and layer; NaN for a domain with no position."""
        return self.entropy_sum / self.n_positions[:, None].double()

    def std(self) -> Float[Tensor, "domain layer"]:
        """Standard deviation over positions of the entropy per domain and layer."""
        mean = self.mean()
        return (self.entropy_sq_sum / self.n_positions[:, None].double() - mean**2).clamp(min=0).sqrt()

    def _domains_with_data(self) -> list[str]:
        return [d for i, d in enumerate(self.domains) if int(self.n_positions[i]) > 0]

    def top_tokens(self, domain: str, layer: int, n: int = 5) -> list[tuple[str, float]]:
        """The ``n`` most frequent top tokens at ``layer`` with their share of positions."""
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; this summary has {self.domains}")
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not read; this summary has layers {self.layers}")
        total = int(self.n_positions[self.domains.index(domain)])
        counts = Counter(self.top_counts[domain][self.layers.index(layer)])
        return [(self.token_strings.get(t, str(t)), c / total) for t, c in counts.most_common(n)]

    def stages(self) -> dict[str, tuple[int, int]]:
        """Per domain, the first layers of stages 2 and 3 (``three_stages`` on the mean
        entropy curve; see the module notes). Domains with no position are left out."""
        means = self.mean()
        result = {}
        for d in self._domains_with_data():
            b1, b2 = three_stages(means[self.domains.index(d)])
            result[d] = (self.layers[b1], self.layers[b2])
        return result

    def summary(self) -> str:
        """Two or three sentences from the measured numbers: how far the entropy falls from
        the first to the last layer read (against ln|V|), which domains end most and least
        certain, and the most frequent top token at the last layer per domain."""
        domains = self._domains_with_data()
        if not domains:
            return "No position was read: nothing to summarise."
        mean = self.mean()
        first, last = self.layers[0], self.layers[-1]
        rows = [self.domains.index(d) for d in domains]
        start, end = float(mean[rows, 0].mean()), float(mean[rows, -1].mean())
        vocab = self.metadata.get("vocab_size")
        ceiling = f" (ln|V| = {math.log(vocab):.2f})" if vocab else ""
        text = (f"Averaged over {len(domains)} domain(s), the lens' entropy at {self.hook} goes from {start:.2f} nats at layer "
                f"{first} to {end:.2f} at layer {last}{ceiling}.")
        if len(domains) > 1:
            at_last = {d: float(mean[self.domains.index(d), -1]) for d in domains}
            ordered = sorted(at_last, key=at_last.get)
            most, least = ordered[0], ordered[-1]
            text += f" At layer {last}, {most} is the most certain ({at_last[most]:.2f} nats) and {least} the least ({at_last[least]:.2f})."
        tops = [f"{d} {token!r} ({share:.0%})" for d in domains for token, share in self.top_tokens(d, last, 1)]
        if tops:
            text += f" Most frequent top token at layer {last}: {', '.join(tops)}."
        return text

    def table(self, n: int = 3) -> str:
        """Per domain and layer: entropy mean ± std, stage, the ``n`` most frequent top tokens."""
        stages = self.stages() if len(self.layers) >= 3 else {}
        mean, std = self.mean(), self.std()
        lines = [f"logit lens ({self.hook}, top-{self.k} counts)"]
        for d in self._domains_with_data():
            i = self.domains.index(d)
            lines.append(f"[{d}] {int(self.n_samples[i])} samples, {int(self.n_positions[i])} positions"
                         + (f"; stages start at layers 0, {stages[d][0]}, {stages[d][1]}" if d in stages else ""))
            lines.append("  layer  stage  entropy mean ± std  top tokens (share)")
            for r, layer in enumerate(self.layers):
                stage = "-" if d not in stages else 1 + (layer >= stages[d][0]) + (layer >= stages[d][1])
                tokens = ", ".join(f"{t!r} {share:.0%}" for t, share in self.top_tokens(d, layer, n))
                lines.append(f"  {layer:>5}  {stage:>5}  {float(mean[i, r]):7.3f} ± {float(std[i, r]):.3f}  {tokens}")
        return "\n".join(lines)

    def plot(self):
        """Left: mean entropy per layer and domain with a ±1 std band, dashed lines at the
        stage boundaries (or a note that there are too few layers for them), and the uniform
        distribution's entropy ln|V| as the ceiling. Right: the most frequent top token per
        layer and domain."""
        domains = self._domains_with_data()
        figure = new_figure(13, max(4.0, 0.28 * len(self.layers) + 1.5))
        curves, tokens = figure.subplots(1, 2, width_ratios=[3, 2])
        stages = self.stages() if len(self.layers) >= 3 else {}
        vocab = self.metadata.get("vocab_size")
        if vocab:
            curves.axhline(math.log(vocab), color="0.4", linestyle=":", linewidth=1)
            curves.annotate(f"ln|V| = {math.log(vocab):.2f} (uniform over {vocab:,} tokens)", (0.01, math.log(vocab)),
                            xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="0.3")
        if len(self.layers) < 3:
            curves.text(0.5, 0.02, f"no stage split: {len(self.layers)} layer(s), three stages need at least 3",
                        transform=curves.transAxes, ha="center", fontsize=8, color="0.3")
        mean, std = self.mean(), self.std()
        for d in domains:
            i = self.domains.index(d)
            line, = curves.plot(self.layers, mean[i].tolist(), marker="o", markersize=3, label=d)
            curves.fill_between(self.layers, (mean[i] - std[i]).tolist(), (mean[i] + std[i]).tolist(), color=line.get_color(), alpha=0.2)
            for boundary in stages.get(d, ()):
                curves.axvline(boundary - 0.5, color=line.get_color(), linestyle="--", linewidth=1)
        from matplotlib.ticker import MaxNLocator

        curves.xaxis.set_major_locator(MaxNLocator(integer=True))
        curves.set_xlabel("layer")
        curves.set_ylabel("entropy (nats)")
        curves.set_title(f"logit-lens entropy ({self.hook}); dashed: stage boundaries")
        curves.legend()
        cells = [["{} {:.0%}".format(*self.top_tokens(d, layer, 1)[0]) if self.top_counts[d][r] else "" for d in domains]
                 for r, layer in enumerate(self.layers)]
        tokens.axis("off")
        tokens.set_title(f"most frequent top-{self.k} token")
        if domains:
            tokens.table(cellText=cells, rowLabels=[str(l) for l in self.layers], colLabels=domains, loc="center", fontsize=8)
        return figure

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """One safetensors file: tensors, and the rest as JSON in its header (atomic write)."""
        tensors = {name: getattr(self, name) for name in ("n_positions", "n_samples", "entropy_sum", "entropy_sq_sum")}
        header = {
            "domains": self.domains, "layers": self.layers, "hook": self.hook, "k": self.k,
            "metadata": self.metadata, "token_strings": {str(t): s for t, s in self.token_strings.items()},
            "top_counts": {d: [{str(t): c for t, c in layer.items()} for layer in per_layer] for d, per_layer in self.top_counts.items()},
        }
        save_tensors(path, tensors, header, "LensSummary", overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LensSummary":
        tensors, header = load_tensors(path, "LensSummary")
        return cls(
            domains=header["domains"], layers=header["layers"], hook=header["hook"], k=header["k"],
            top_counts={d: [{int(t): c for t, c in layer.items()} for layer in per_layer] for d, per_layer in header["top_counts"].items()},
            token_strings={int(t): s for t, s in header["token_strings"].items()},
            metadata=header["metadata"], **tensors,
        )


def logit_lens_summary(
    model: HookedMLLM,
    samples: Samples,
    *,
    positions: str | Sequence[str] = "image",
    hook: str = "resid_post",
    layers: Sequence[int] | None = None,
    domains: Sequence[str] | None = None,
    k: int = 1,
    batch_size: int = 8,
    position_chunk: int = 256,
    vocab_chunk: int = 32768,
    progress: bool = True,
) -> LensSummary:
    """Per-domain logit-lens summary of ``samples`` (``question``, ``image``, ``domain``).

    Streams: per batch, one ``logit_lens`` forward, then sums per domain; batches with no
    selected position (e.g. text-only rows for ``positions="image"``) are skipped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if hook not in HOOK_KINDS:
        raise ValueError(f"hook must be one of {', '.join(HOOK_KINDS)}; got {hook!r}")
    labels = sample_column(samples, "domain")
    domain_list = sorted(set(labels)) if domains is None else list(domains)
    missing = sorted(set(labels) - set(domain_list))
    if missing:
        raise ValueError(f"samples have domains {missing} that are not in domains={domain_list}; add them or leave domains=None")
    layer_list = list(range(model.cfg.n_layers)) if layers is None else [int(l) for l in layers]
    n_domains, n_layers = len(domain_list), len(layer_list)
    n_positions = torch.zeros(n_domains, dtype=torch.long)
    n_samples = torch.zeros(n_domains, dtype=torch.long)
    sums = torch.zeros(n_domains, n_layers, dtype=torch.float64)
    sq_sums = torch.zeros(n_domains, n_layers, dtype=torch.float64)
    counts: list[list[Counter]] = [[Counter() for _ in layer_list] for _ in domain_list]
    tokenizer = model.processor.tokenizer

    chunks = list(sample_chunks(samples, batch_size))
    for start, chunk in tqdm(chunks, desc="logit lens", disable=not progress, unit="batch"):
        index = torch.tensor([domain_list.index(labels[i]) for i in range(start, start + len(chunk))])
        n_samples += torch.bincount(index, minlength=n_domains)
        batch = prompt_batch(model, chunk)
        if not position_mask(batch.modality_map, positions).any():
            continue
        lens = logit_lens(model, batch, hooks=hook, positions=positions, layers=layer_list, k=k,
                          position_chunk=position_chunk, vocab_chunk=vocab_chunk)
        column_domain = index[lens.rows]
        one_hot = torch.nn.functional.one_hot(column_domain, n_domains).double()  # [pos, domain]
        entropy = lens.entropy.double()  # [layer, pos]
        sums += (entropy @ one_hot).T
        sq_sums += ((entropy**2) @ one_hot).T
        n_positions += torch.bincount(column_domain, minlength=n_domains)
        for d in column_domain.unique().tolist():
            ids = lens.top_ids[:, column_domain == d]  # [layer, pos_d, k]
            for r in range(n_layers):
                counts[d][r].update(ids[r].flatten().tolist())

    seen = sorted({t for per_domain in counts for layer in per_domain for t in layer})
    strings = dict(zip(seen, tokenizer.batch_decode([[t] for t in seen]))) if seen else {}
    return LensSummary(
        domains=domain_list, layers=layer_list, hook=hook, k=k,
        n_positions=n_positions, n_samples=n_samples, entropy_sum=sums, entropy_sq_sum=sq_sums,
        top_counts={d: [dict(c) for c in counts[i]] for i, d in enumerate(domain_list)},
        token_strings=strings,
        metadata={"positions": positions if isinstance(positions, str) else list(positions), "batch_size": batch_size,
                  "n_samples": len(labels), "model": getattr(model.cfg, "model_name", None), "vocab_size": int(model.cfg.d_vocab)},
    )
