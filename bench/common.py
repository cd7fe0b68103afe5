"""Shared parts of the benchmarks: a LLaVA-shaped random model, fixed batches, timing."""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from PIL import Image

from mm_lens import HookedMLLM
from mm_lens.model.tiny.llava import build_tiny_llava

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# LM 8 layers x 1408 MLP, 6-layer vision tower, 256 image tokens + prompt ~ 297 positions.
FULL = dict(image_size=224, patch_size=14, width=512, vision_layers=6, text_layers=8,
            vision_overrides={"hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 6},
            text_overrides={"intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000})
QUICK = dict(image_size=112, patch_size=14, width=256, vision_layers=3, text_layers=4,
             vision_overrides={"hidden_size": 192, "intermediate_size": 768, "num_attention_heads": 6},
             text_overrides={"intermediate_size": 704, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000})
QUESTION = ("describe the picture what is the color of the shape in this image how many are there "
            "left right top bottom which domain is this picture a road a field a page or a scan")


def build_model(quick: bool, attention: str = "eager") -> tuple[HookedMLLM, torch.nn.Module]:
    """The bridged model and a separate bare HF copy of the same weights (``attention``:
    the bare copy's attention implementation, ``eager`` or ``sdpa``)."""
    folder = build_tiny_llava(Path(tempfile.mkdtemp(prefix="mm_lens_bench_")), **(QUICK if quick else FULL))
    bare = transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attention).eval()
    return HookedMLLM.from_pretrained(folder), bare


def samples(n: int, seed: int = 0, domains: int = 5) -> list[dict]:
    rng = np.random.RandomState(seed)
    return [
        {"question": QUESTION, "image": Image.fromarray(rng.randint(0, 256, (64, 96, 3), dtype=np.uint8)),
         "domain": f"domain{i % domains}"}
        for i in range(n)
    ]


def batches(model: HookedMLLM, items: list[dict], batch_size: int):
    return [
        model.prepare_inputs([s["question"] for s in items[i : i + batch_size]], [s["image"] for s in items[i : i + batch_size]])
        for i in range(0, len(items), batch_size)
    ]


def time_rivals(rivals: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each rival, interleaved so drift hits all alike."""
    for run in rivals.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in rivals}
    for _ in range(repeats):
        for name, run in rivals.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_line(name: str, ratio: float, op: str, target: float) -> str:
    return f"BENCH {name} ratio={ratio:.2f} target={op}{target:.2f}"
