"""Whether the fast patching sweep's small disagreement with full forwards at LLaVA-NeXT's
length (2,928 image tokens) is float32 rounding: the same sweep (layer 4, every 512th image
position, KL metric) fast and as one full forward per patch, in float32 and then with the
same model in float64. In float64 the two agree exactly once the logits are rounded to
float32 (the metric's precision); in float32 both sit ~1e-6 from the float64 values.

    python bench/patching_float64.py     # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from common import QUESTION, build_model
from mm_lens.analysis.patching import patch_sweep

model, _ = build_model(False, shape="next")
rng = np.random.RandomState(0)
pictures = [Image.fromarray(rng.randint(0, 256, (672, 672, 3), dtype=np.uint8)) for _ in range(2)]
metrics = {}
for dtype in (torch.float32, torch.float64):
    model.to(dtype)
    clean, corrupted = (model.prepare_inputs([QUESTION], [p]) for p in pictures)
    for batch in (clean, corrupted):
        batch.inputs["pixel_values"] = batch.inputs["pixel_values"].to(dtype)
    mask = clean.modality_map.mask("image") & (torch.arange(clean["input_ids"].shape[1]) % 512 == 0)
    for fast in (True, False):
        result = patch_sweep(model, clean, corrupted, layers=[4], positions=mask, metric="kl", fast=fast, progress=False)
        metrics[dtype, fast] = result.metric.double()
    print(f"{dtype}: clean - corrupted metric {result.clean_metric - result.corrupted_metric:.3e}")
    gap = float((metrics[dtype, True] - metrics[dtype, False]).abs().max())
    print(f"  fast vs full forwards, largest metric difference {gap:.2e}")
truth = metrics[torch.float64, False]
for fast in (True, False):
    print(f"float32 {'fast' if fast else 'full forwards'} vs float64: {float((metrics[torch.float32, fast] - truth).abs().max()):.2e}")
