"""Cost of the logit lens at every layer x every image token (entropy and top-10) vs one bare
HF forward on the same batch. Memory is measured by ``logit_lens_memory.py``.

    python bench/logit_lens_time.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from common import batches, bench_line, build_model, samples, time_rivals
from mm_lens.analysis.lens import logit_lens

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
args = parser.parse_args()

model, bare = build_model(args.quick)
(batch,) = batches(model, samples(4), batch_size=4)
with torch.no_grad():
    times = time_rivals(
        {
            "bare HF forward": lambda: bare(**batch.inputs),
            "logit lens, all layers x image tokens": lambda: logit_lens(model, batch, positions="image", k=10),
        },
        repeats=3 if args.quick else 5,
    )
base = times["bare HF forward"]
n_image = int(batch.modality_map.mask("image").sum())
print(f"{model.cfg.n_layers} layers x {n_image} image tokens, vocabulary {model.cfg.d_vocab}")
for name, seconds in times.items():
    print(f"  {name:<40} {seconds * 1000:8.1f} ms   {seconds / base:5.2f}x bare")
print(bench_line("logit_lens", times["logit lens, all layers x image tokens"] / base, "<=", 1.5, vs="hf_eager"))
