"""A full layer x image-position patching sweep (resid_pre): mm_lens' fast path (several
patches per forward, each resumed at the patched layer from cached residuals) vs the same
sweep done as TransformerLens does it (one full forward per patch). Results must agree.
Then attribution patching over every image position against the exact fast sweep over the
same positions: its time ratio, and how well its effects correlate with the sweep's per layer.
``--shape next`` runs the first comparison at LLaVA-NeXT's length (2,928 image tokens) on
three layers and every 128th image position (the naive sweep would otherwise take hours).

    python bench/patching_sweep.py [--quick | --shape next]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from common import QUESTION, bench_line, build_model
from mm_lens.analysis.patching import attribution_patch, layer_agreement, patch_sweep

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="smaller model (under a minute)")
parser.add_argument("--shape", choices=["next"], default=None, help="LLaVA-NeXT anyres length instead (a few minutes)")
args = parser.parse_args()

model, _ = build_model(args.quick, shape=args.shape)
rng = np.random.RandomState(0)
size = (672, 672) if args.shape == "next" else (64, 96)
pictures = [Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(2)]
clean = model.prepare_inputs([QUESTION], [pictures[0]])
corrupted = model.prepare_inputs([QUESTION], [pictures[1]])
positions = "image"
image_tokens = int(clean.modality_map.mask("image").sum())
stride = 4 if args.quick else 128 if args.shape else 8  # every stride-th image position keeps the naive run affordable
mask = clean.modality_map.mask("image") & (torch.arange(clean["input_ids"].shape[1]) % stride == 0)
layers = [0, model.cfg.n_layers // 2, model.cfg.n_layers - 1] if args.shape else None

times, results = {}, {}
for name, settings in {"TL-style, full forward per patch": dict(fast=False, patches_per_forward=1),
                       "mm_lens fast path": dict(fast=True, patches_per_forward=16)}.items():
    start = time.perf_counter()
    results[name] = patch_sweep(model, clean, corrupted, layers=layers, positions=mask, metric="kl", progress=False, **settings)
    times[name] = time.perf_counter() - start
naive, fast = results.values()
same = torch.allclose(naive.effect, fast.effect, atol=1e-4)
gap = float((naive.effect - fast.effect).abs().max())
print(f"{len(layers or range(model.cfg.n_layers))} layers x {len(fast.units)} image positions (every {stride}th of {image_tokens}); "
      f"identical: {same} (largest difference {gap:.1e}, effects up to {float(naive.effect.abs().max()):.1e})", flush=True)
for name, seconds in times.items():
    print(f"  {name:<34} {seconds:7.2f} s")
ratio = times["TL-style, full forward per patch"] / times["mm_lens fast path"]
print(bench_line("patching", ratio, ">=", 2.0, vs="tl_forward_per_patch", image_tokens=image_tokens))
if args.shape:  # attribution patching at this length: see the default run
    raise SystemExit(0)

every = clean.modality_map.mask("image")
start = time.perf_counter()
exact = patch_sweep(model, clean, corrupted, positions=every, metric="logit_diff", progress=False, patches_per_forward=16)
sweep_seconds = time.perf_counter() - start
start = time.perf_counter()
estimate = attribution_patch(model, clean, corrupted, positions=every, metric="logit_diff")
attribution_seconds = time.perf_counter() - start
agreement = layer_agreement(estimate, exact)
print(f"attribution patching, {model.cfg.n_layers} layers x {len(exact.units)} image positions (logit_diff): "
      f"sweep {sweep_seconds:.2f} s, attribution {attribution_seconds:.2f} s; correlation with the sweep per layer "
      + " ".join(f"{float(r):.2f}" for r in agreement))
print(bench_line("attribution_patching", sweep_seconds / attribution_seconds, ">=", 5.0, vs="mm_lens_fast_sweep"))
