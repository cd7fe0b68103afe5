"""Fast paths that check themselves.

A fast path reuses HF internals (recorded block inputs, the HF final norm and ``lm_head``)
to skip work; a new transformers release can change those internals without an error. So
each fast path compares itself once per call, on its first unit, with the plain path and, on
a mismatch (or an exception), warns once per process and lets the caller fall back.
"""

from __future__ import annotations

import warnings
from typing import Callable, TypeVar

import torch
from torch import Tensor

RTOL = 1e-4
_warned: set[str] = set()
T = TypeVar("T")


class FastPathWarning(UserWarning):
    """A fast path disagreed with the plain path; the plain path was used."""


def mismatch(fast: Tensor, plain: Tensor, rtol: float = RTOL) -> str | None:
    """``None`` when ``fast`` equals ``plain`` within ``rtol`` of ``plain``'s largest
    magnitude, else a sentence saying how they differ."""
    if fast.shape != plain.shape:
        return f"shapes differ: {tuple(fast.shape)} vs {tuple(plain.shape)}"
    fast, plain = fast.detach().double(), plain.detach().double()
    if not torch.isfinite(fast).all():
        return "the fast path gave non-finite values"
    error = float((fast - plain).abs().max()) if plain.numel() else 0.0
    scale = float(plain.abs().max()) if plain.numel() else 0.0
    if error > rtol * max(scale, 1e-12):
        return f"max |fast - plain| = {error:.3g}, {error / max(scale, 1e-12):.3g} of the plain values' scale"
    return None


def warn_fallback(name: str, reason: str, consequence: str = "using the plain path") -> None:
    """Warn (once per ``name`` and process) that ``name``'s fast path disagrees with the
    plain path, and what follows (``consequence``)."""
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"mm_lens: the {name} fast path disagrees with the plain path ({reason}); {consequence}. "
        "This usually means an untested transformers/transformer-lens version; please report it.",
        FastPathWarning,
        stacklevel=3,
    )


def agreeing(name: str, fast: Callable[[], T], expected: Tensor, view: Callable[[T], Tensor] | None = None, rtol: float = RTOL) -> T | None:
    """Run the fast path; return its result when ``view(result)`` equals ``expected`` (the
    plain path's numbers), else warn and return ``None`` so that the caller falls back. An
    exception in the fast path (e.g. a drifted block signature) counts as a mismatch."""
    try:
        result = fast()
        problem = mismatch(result if view is None else view(result), expected, rtol)
    except Exception as error:  # noqa: BLE001 - any failure of the fast path means: use the plain one
        result, problem = None, f"{type(error).__name__}: {error}"
    if problem is None:
        return result
    warn_fallback(name, problem)
    return None
