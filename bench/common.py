"""Shared parts of the benchmarks: a LLaVA-shaped random model, fixed batches, timing."""

from __future__ import annotations

import ctypes
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import transformers
from PIL import Image

from mm_lens import HookedMLLM
from mm_lens.model.tiny.llava import build_tiny_llava, build_tiny_llava_next

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# LM 8 layers x 1408 MLP, 6-layer vision tower, 256 image tokens + prompt ~ 297 positions.
FULL = dict(image_size=224, patch_size=14, width=512, vision_layers=6, text_layers=8,
            vision_overrides={"hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 6},
            text_overrides={"intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000})
QUICK = dict(image_size=112, patch_size=14, width=256, vision_layers=3, text_layers=4,
             vision_overrides={"hidden_size": 192, "intermediate_size": 768, "num_attention_heads": 6},
             text_overrides={"intermediate_size": 704, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000})
# Real image lengths, the same LM and tower: LLaVA-1.5 (336 px, patch 14: 576 image tokens)
# and LLaVA-NeXT anyres (336 px tiles; a 64x96 picture takes the 1x2 grid: base view +
# 2 tiles, unpadded, plus one newline per row: ~1,200 tokens; a 672 px square one the 2x2 grid:
# 576 + 48 x 48 + 48 newlines = 2,928 image tokens).
LLAVA15 = {**FULL, "image_size": 336}
# LLaVA-1.5-7B's widths (LM 4096 x 11008, 32 heads; CLIP-L tower 1024 x 4096) on 2 LM and 2
# tower layers: what a reduction costs next to a forward at a real model's width.
WIDE = dict(image_size=336, patch_size=14, width=4096, vision_layers=2, text_layers=2,
            vision_overrides={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16},
            text_overrides={"intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000})
NEXT = {**FULL, "image_size": 336, "anyres": True}
SHAPES = {"quick": QUICK, "full": FULL, "llava15": LLAVA15, "next": NEXT, "wide7b": WIDE}
QUESTION = ("describe the picture what is the color of the shape in this image how many are there "
            "left right top bottom which domain is this picture a road a field a page or a scan")


def build_model(quick: bool, attention: str = "eager", shape: str | None = None, also: tuple[str, ...] = ()):
    """The bridged model and a separate bare HF copy of the same weights (``attention``:
    the bare copy's attention implementation, ``eager`` or ``sdpa``); ``shape`` one of
    ``SHAPES`` (default: ``quick`` or ``full``); ``also``: more bare copies, returned after."""
    settings = dict(SHAPES[shape or ("quick" if quick else "full")])
    builder = build_tiny_llava_next if settings.pop("anyres", False) else build_tiny_llava
    folder = builder(Path(tempfile.mkdtemp(prefix="mm_lens_bench_")), **settings)
    bares = [transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=a).eval() for a in (attention, *also)]
    return (HookedMLLM.from_pretrained(folder), *bares)


def samples(n: int, seed: int = 0, domains: int = 5, size: tuple[int, int] = (64, 96)) -> list[dict]:
    rng = np.random.RandomState(seed)
    return [
        {"question": QUESTION, "image": Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8)),
         "domain": f"domain{i % domains}"}
        for i in range(n)
    ]


def batches(model: HookedMLLM, items: list[dict], batch_size: int):
    return [
        model.prepare_inputs([s["question"] for s in items[i : i + batch_size]], [s["image"] for s in items[i : i + batch_size]])
        for i in range(0, len(items), batch_size)
    ]


def time_rivals(rivals: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each rival, interleaved so drift hits all alike
    (``clock=time.process_time`` with one torch thread: CPU seconds, which other processes
    on a shared machine inflate far less than wall time). The allocator is put in
    ``timing_mode`` first."""
    timing_mode()
    for run in rivals.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in rivals}
    for _ in range(repeats):
        for name, run in rivals.items():
            start = clock()
            run()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_line(name: str, ratio: float, op: str, target: float, vs: str | None = None, **tags: object) -> str:
    """``BENCH <name> [vs=<rival>] [tag=value ...] ratio=<x> target=<op><y>``."""
    fields = ({"vs": vs} if vs else {}) | tags
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    return f"BENCH {name}{extra} ratio={ratio:.2f} target={op}{target:.2f}"


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_extra_mb(run: Callable[[], object]) -> float:
    """Peak resident memory of one call of ``run`` above the memory held before it (MB):
    the kernel's peak mark is reset first (``/proc/self/clear_refs``). Meaningful after
    ``low_mmap_threshold()`` and before ``timing_mode()``."""
    if _timed:
        raise RuntimeError("peak memory read after timing_mode(): read it before the timings")
    Path("/proc/self/clear_refs").write_text("5")
    before = status_mb("VmRSS")
    run()
    return status_mb("VmHWM") - before


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_timed = False  # set by timing_mode: peak-memory readings must come before


def low_mmap_threshold() -> None:
    """Re-run this script with ``MALLOC_MMAP_THRESHOLD_`` = 1 MiB (glibc reads it at start),
    so that a freed tensor leaves the process and ``peak_extra_mb`` sees each call's own
    memory. Timings then switch back with ``timing_mode``."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})


def timing_mode() -> None:
    """glibc's allocator as a long-running process has it, for timings: allocations under
    32 MiB come from the heap (``M_MMAP_THRESHOLD`` at the top of glibc's adaptive range,
    which a process reaches once it frees such chunks; trimming at twice that). With the
    1 MiB threshold of ``low_mmap_threshold`` every large temporary costs fresh page faults:
    MINER's fast route read 1.56x the bare forward there against 1.40x here. Fixed rather
    than adaptive so that every rival and shape times under the same settings."""
    global _timed
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    _timed = True


def one_shape_per_process(shapes: list[str]) -> list[str]:
    """The shapes this process measures. Given several, run this script once per shape in
    a child process (``BENCH_SHAPE``; output passed through) and exit: each shape's peak
    memory is read before any timing (a heap shaped by a timing phase reads ~10% higher)."""
    if os.environ.get("BENCH_SHAPE"):
        return [os.environ["BENCH_SHAPE"]]
    if len(shapes) == 1:
        return shapes
    for shape in shapes:
        code = subprocess.run([sys.executable, *sys.argv], env={**os.environ, "BENCH_SHAPE": shape}).returncode
        if code:
            sys.exit(code)
    sys.exit(0)
