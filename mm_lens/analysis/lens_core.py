"""The logit lens' pure core: ``unembed(final_norm(resid))`` statistics over a large
vocabulary in bounded memory, and the three-stage split of an entropy curve. Tensors in,
tensors out (``mm_lens.analysis.lens`` is the model edge).

Decisions:

- **Memory is bounded by the chunks.** ``lens_logits_stats`` never holds more than
  ``[position_chunk, vocab_chunk]`` logits: it streams over the vocabulary with an online
  log-sum-exp, accumulating ``sum exp(l - m)`` and ``sum exp(l - m) (l - m)`` (entropy =
  ``log s - t / s``), merging top-k candidates chunk by chunk, and counting the tokens
  strictly above each target. Thousands of image tokens x a 150k vocabulary need no more
  memory than the chunks (``bench/logit_lens_memory.py``).
- **Precision.** The unembedding runs in the weight's dtype, as the model's own ``lm_head``
  does; logits are then read in float32 (float64 if the inputs are float64) and the running
  sums are kept in float64.
- **Ranks** are 0-based: the number of vocabulary entries whose logit is strictly larger than
  the target's (rank 0 = the top token). The target's logit for counting is computed once per
  position beside the chunked matmul, so entries tied with it within rounding (~1e-7
  relative in float32) may count either way; the token itself never counts.
- **Stages** (``three_stages``): the layers are cut into three consecutive stages whose
  boundaries minimise the total squared error of fitting one straight line to each stage's
  mean entropy (exact search over all pairs of cut points; every stage at least two layers
  when there are six or more, else one). On the curve MMNeuron describes (a high plateau, a
  fall, a low tail) the cuts land where the fall begins and where it ends. A kink layer fits
  two lines equally well, so exact ties go to the shortest middle stage (the last layer of the
  plateau stays in stage 1, the first layer of the tail starts stage 3), then to the earliest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

Norm = Callable[[Tensor], Tensor]


# ---- pure core ------------------------------------------------------------------------
@dataclass
class LensStats:
    """Logit-lens readings; leading axes ``*lead`` (none, or ``layer``) then ``pos``.

    ``top_probs`` are probabilities of ``top_ids`` (descending); ``target_logprobs`` and
    ``target_ranks`` (0 = top token) are None when no targets were given.
    """

    entropy: Float[Tensor, "*lead pos"]
    top_ids: Int[Tensor, "*lead pos k"]
    top_probs: Float[Tensor, "*lead pos k"]
    target_logprobs: Float[Tensor, "*lead pos target"] | None = None
    target_ranks: Int[Tensor, "*lead pos target"] | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {name: t for name, t in vars(self).items() if t is not None}

    def to(self, device: torch.device | str) -> "LensStats":
        return LensStats(**{name: None if t is None else t.to(device) for name, t in vars(self).items()})

    @staticmethod
    def stack(parts: Sequence["LensStats"]) -> "LensStats":
        """Stack readings of the same positions along a new leading axis (e.g. layers)."""
        return LensStats(
            **{name: None if getattr(parts[0], name) is None else torch.stack([getattr(p, name) for p in parts]) for name in vars(parts[0])}
        )


def lens_logits(
    resid: Float[Tensor, "pos d_model"],
    final_norm: Norm | None,
    W_U: Float[Tensor, "d_model vocab"],
    b_U: Float[Tensor, "vocab"] | None = None,
) -> Float[Tensor, "pos vocab"]:
    """Full lens logits ``final_norm(resid) @ W_U + b_U`` (for a few positions; see
    ``lens_logits_stats`` for many)."""
    return _logits(_normed(resid, final_norm, W_U), W_U, b_U, 0, W_U.shape[1])


def _normed(resid: Tensor, final_norm: Norm | None, W_U: Tensor) -> Tensor:
    return (resid if final_norm is None else final_norm(resid)).to(W_U.dtype)


def _logits(h: Tensor, W_U: Tensor, b_U: Tensor | None, start: int, stop: int) -> Tensor:
    W = W_U[:, start:stop]
    logits = h @ W if b_U is None else torch.addmm(b_U[start:stop], h, W)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def lens_logits_stats(
    resid: Tensor,
    final_norm: Norm | None,
    W_U: Tensor,
    b_U: Tensor | None = None,
    *,
    k: object = 10,
    targets: Tensor | None = None,
    position_chunk: int = 256,
    vocab_chunk: int = 32768,
) -> LensStats:
    """Entropy, top-k and target log-probs/ranks of ``softmax(final_norm(resid) @ W_U + b_U)``
    per position, never holding more than ``[position_chunk, vocab_chunk]`` logits.

    ``resid`` ``[pos, d_model]``, ``W_U`` ``[d_model, vocab]``, ``b_U`` ``[vocab]``, ``k``
    an int in ``[1, vocab]``, ``targets`` integer token ids ``[pos, target]``: all checked
    here (``ValueError`` saying what is wrong). ``final_norm`` is applied to
    ``position_chunk`` rows at a time (None: identity).
    """
    if resid.ndim != 2:
        raise ValueError(f"resid must be [pos, d_model], got shape {tuple(resid.shape)}; select positions first")
    if W_U.ndim != 2 or W_U.shape[0] != resid.shape[1]:
        raise ValueError(f"W_U must be [d_model={resid.shape[1]}, vocab], got shape {tuple(W_U.shape)}")
    n_pos, vocab = resid.shape[0], W_U.shape[1]
    if b_U is not None and tuple(b_U.shape) != (vocab,):
        raise ValueError(f"b_U must be [vocab={vocab}], got shape {tuple(b_U.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, {vocab}] (the vocabulary size), got {k!r}")
    if position_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"chunks must be >= 1, got position_chunk={position_chunk}, vocab_chunk={vocab_chunk}")
    if targets is not None:
        if targets.ndim != 2 or targets.shape[0] != n_pos or targets.dtype.is_floating_point:
            raise ValueError(f"targets must be integer token ids [pos={n_pos}, target], got {targets.dtype} {tuple(targets.shape)}")
        if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < vocab):
            raise ValueError(f"target ids must lie in [0, {vocab}), got [{int(targets.min())}, {int(targets.max())}]")
        targets = targets.to(resid.device, torch.long)
    if n_pos == 0:
        raise ValueError("resid holds no position; select at least one")
    return _lens_logits_stats(resid, final_norm, W_U, b_U, k, targets, position_chunk, vocab_chunk)


def _lens_logits_stats(
    resid: Float[Tensor, "pos d_model"],
    final_norm: Norm | None,
    W_U: Float[Tensor, "d_model vocab"],
    b_U: Float[Tensor, "vocab"] | None,
    k: int,
    targets: Int[Tensor, "pos target"] | None,
    position_chunk: int,
    vocab_chunk: int,
) -> LensStats:
    """``lens_logits_stats`` of checked arguments."""
    n_pos, vocab = resid.shape[0], W_U.shape[1]
    buffers = _Buffers(min(n_pos, position_chunk) * min(vocab, vocab_chunk), resid.device)
    parts = [
        _stats_of_rows(
            _normed(resid[p0 : p0 + position_chunk], final_norm, W_U),
            W_U, b_U, k, None if targets is None else targets[p0 : p0 + position_chunk], vocab_chunk, buffers,
        )
        for p0 in range(0, n_pos, position_chunk)
    ]
    return LensStats(**{name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts]) for name in vars(parts[0])})


class _Buffers:
    """Chunk-sized work buffers, allocated once per call and reused by every chunk, so the
    allocator sees no chunk-sized allocation after the first (no heap growth on the CPU)."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity, self.device, self.flat = capacity, device, {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        if name not in self.flat:
            self.flat[name] = torch.empty(self.capacity, dtype=dtype, device=self.device)
        return self.flat[name][: rows * cols].view(rows, cols)


def _chunk_logits(h: Tensor, W_U: Tensor, b_U: Tensor | None, start: int, stop: int, buffers: _Buffers) -> Tensor:
    """``_logits`` of one vocabulary chunk, written into the reused buffers."""
    W = W_U[:, start:stop]
    raw = buffers.get("raw", h.shape[0], stop - start, W.dtype)
    if b_U is None:
        torch.mm(h, W, out=raw)
    else:
        torch.addmm(b_U[start:stop], h, W, out=raw)
    wide = torch.promote_types(W.dtype, torch.float32)
    return raw if raw.dtype == wide else buffers.get("logits", h.shape[0], stop - start, wide).copy_(raw)


def _stats_of_rows(
    h: Tensor, W_U: Tensor, b_U: Tensor | None, k: int, targets: Tensor | None, vocab_chunk: int, buffers: _Buffers
) -> LensStats:
    """One position chunk: stream over the vocabulary (online log-sum-exp)."""
    rows, vocab = h.shape[0], W_U.shape[1]
    acc = {"dtype": torch.float64, "device": h.device}
    m = s = t = None  # running max, sum exp(l - m), sum exp(l - m) (l - m)
    top_values = top_ids = None
    if targets is not None:
        n_targets = targets.shape[1]
        target_logits = torch.zeros(rows, n_targets, **acc)
        estimate = torch.stack(  # the threshold ranks are counted against
            [_logits_at(h, W_U, b_U, targets[:, j]) for j in range(n_targets)], dim=1
        ) if n_targets else torch.zeros(rows, 0, dtype=torch.float32, device=h.device)
        above = torch.zeros(rows, n_targets, dtype=torch.long, device=h.device)

    for start in range(0, vocab, vocab_chunk):
        stop = min(start + vocab_chunk, vocab)
        logits = _chunk_logits(h, W_U, b_U, start, stop, buffers)  # [rows, chunk]

        v, i = logits.topk(min(k, stop - start), dim=-1)
        i = i + start
        if top_values is None:
            top_values, top_ids = v, i
        else:
            top_values, pick = torch.cat([top_values, v], -1).topk(min(k, top_values.shape[1] + v.shape[1]), dim=-1)
            top_ids = torch.cat([top_ids, i], -1).gather(-1, pick)

        if targets is not None:
            inside = (targets >= start) & (targets < stop)
            exact = logits.gather(-1, (targets - start).clamp(0, stop - start - 1))
            target_logits = torch.where(inside, exact.double(), target_logits)
            for j in range(targets.shape[1]):  # int32 sums of bools run twice as fast as int64
                larger = torch.gt(logits, estimate[:, j : j + 1], out=buffers.get("larger", rows, stop - start, torch.bool))
                above[:, j] += larger.sum(-1, dtype=torch.int32)
            above -= (inside & (exact > estimate)).long()  # the target itself never counts

        m_c = logits.amax(-1)  # amax: no indices (max's cost ~4x)
        shifted = logits.sub_(m_c[:, None])  # in place: logits are not needed any more
        e = torch.exp(shifted, out=buffers.get("exp", rows, stop - start, shifted.dtype))
        s_c = e.sum(-1).double()
        t_c = torch.linalg.vecdot(e, shifted).double()  # sum e * shifted, no buffer (a batched [1, v] @ [v, 1] product costs ~4x)
        m_c = m_c.double()
        if m is None:
            m, s, t = m_c, s_c, t_c
        else:  # move both partial sums to the larger reference: l - M = (l - m) + (m - M)
            m_new = torch.maximum(m, m_c)
            a, a_c = (m - m_new).exp(), (m_c - m_new).exp()
            t = a * (t + (m - m_new) * s) + a_c * (t_c + (m_c - m_new) * s_c)
            s, m = a * s + a_c * s_c, m_new

    lse = m + s.log()
    out_dtype = torch.promote_types(h.dtype, torch.float32)
    return LensStats(
        entropy=(s.log() - t / s).to(out_dtype),
        top_ids=top_ids,
        top_probs=(top_values.double() - lse[:, None]).exp().to(out_dtype),
        target_logprobs=None if targets is None else (target_logits - lse[:, None]).to(out_dtype),
        target_ranks=None if targets is None else above,
    )


def _logits_at(h: Tensor, W_U: Tensor, b_U: Tensor | None, ids: Int[Tensor, "rows"]) -> Float[Tensor, "rows"]:
    """Logit of one token per row, without the full vocabulary: accumulated in float32 (or
    float64), bias added, then rounded once to the weight's dtype, as ``addmm`` does."""
    wide = torch.promote_types(W_U.dtype, torch.float32)
    columns = rearrange(W_U[:, ids], "d rows -> rows d")
    values = (h.to(wide) * columns.to(wide)).sum(-1)
    if b_U is not None:
        values = values + b_U[ids].to(wide)
    return values.to(W_U.dtype).to(wide)


def three_stages(curve: Float[Tensor, "layer"], min_layers: int | None = None) -> tuple[int, int]:
    """Cut a per-layer curve into three stages ``[0, b1)``, ``[b1, b2)``, ``[b2, L)``.

    The cuts minimise the total squared error of one least-squares line per stage (exact
    search over all pairs; ties go to the shortest middle stage, then the earliest cuts).
    ``min_layers`` per stage defaults
    to 2 when the curve has at least 6 layers, else 1. Returns ``(b1, b2)`` as indices.
    """
    y = torch.as_tensor(curve, dtype=torch.float64).flatten()
    n = y.shape[0]
    if min_layers is None:
        min_layers = 2 if n >= 6 else 1
    if n < 3 * min_layers or min_layers < 1:
        raise ValueError(f"a three-stage split of {n} layers with at least {min_layers} layer(s) per stage is impossible; need >= {3 * max(min_layers, 1)} layers")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("the curve has NaN or infinite values; a stage split needs a finite value per layer")
    x = torch.arange(n, dtype=torch.float64)
    prefix = {name: torch.cat([torch.zeros(1, dtype=torch.float64), v.cumsum(0)]) for name, v in
              {"n": torch.ones(n, dtype=torch.float64), "x": x, "y": y, "xx": x * x, "xy": x * y, "yy": y * y}.items()}

    def sse(i: int, j: int) -> float:  # squared error of the best line through points [i, j)
        S = {name: float(p[j] - p[i]) for name, p in prefix.items()}
        if S["n"] < 2:
            return 0.0
        var_x = S["xx"] - S["x"] ** 2 / S["n"]
        cov = S["xy"] - S["x"] * S["y"] / S["n"]
        return max(S["yy"] - S["y"] ** 2 / S["n"] - cov * cov / var_x, 0.0)

    costs = {(b1, b2): sse(0, b1) + sse(b1, b2) + sse(b2, n)
             for b1 in range(min_layers, n - 2 * min_layers + 1)
             for b2 in range(b1 + min_layers, n - min_layers + 1)}
    best = min(costs.values())
    tolerance = 1e-9 * (float(((y - y.mean()) ** 2).sum()) + 1e-12)
    return min((cut for cut, cost in costs.items() if cost <= best + tolerance), key=lambda cut: (cut[1] - cut[0], cut[0]))


# ---- the model edge -------------------------------------------------------------------
