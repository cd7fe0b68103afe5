"""Cost of the logit lens at every layer x every image token (entropy and top-10) against its
real limit, the unembedding GEMM of all selected rows alone (``[layers x positions, d] @
[d, vocab]`` on random rows of the same size), against that GEMM plus one bare HF forward
(the lens needs the residuals of one forward), and against one bare HF forward on the same
batch. Memory is measured by ``logit_lens_memory.py``.

    python bench/logit_lens_time.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from common import batches, bench_line, build_model, samples, time_rivals
from mm_lens.analysis.lens import logit_lens
from mm_lens.analysis.lens_core import lens_logits_stats

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
args = parser.parse_args()

model, bare = build_model(args.quick, "sdpa")
(batch,) = batches(model, samples(4), batch_size=4)
n_image = int(batch.modality_map.mask("image").sum())
rows = torch.randn(model.cfg.n_layers * n_image, model.cfg.d_model)
unembed = model.W_U.detach()
with torch.no_grad():
    times = time_rivals(
        {
            "bare HF forward (SDPA)": lambda: bare(**batch.inputs),
            "unembedding GEMM alone": lambda: rows @ unembed,
            "logit lens, all layers x image tokens": lambda: logit_lens(model, batch, positions="image", k=10),
        },
        repeats=3 if args.quick else 5,
    )
lens = times["logit lens, all layers x image tokens"]
print(f"{model.cfg.n_layers} layers x {n_image} image tokens, vocabulary {model.cfg.d_vocab}")
for name, seconds in times.items():
    print(f"  {name:<40} {seconds * 1000:8.1f} ms   lens / this {lens / seconds:5.2f}")
print(bench_line("logit_lens", lens / times["unembedding GEMM alone"], "<=", 1.3, vs="unembed_gemm"))
# a lens must also run the model once to have residuals: its floor is one forward plus the GEMM
floor = times["unembedding GEMM alone"] + times["bare HF forward (SDPA)"]
print(f"  one forward + the GEMM: {floor * 1000:.1f} ms, lens / this {lens / floor:5.2f}")
print(bench_line("logit_lens", lens / floor, "<=", 1.3, vs="unembed_gemm_plus_hf_sdpa"))
print(bench_line("logit_lens", lens / times["bare HF forward (SDPA)"], "<=", 1.5, vs="hf_sdpa"))

# The same core at a 7B model's width: the GEMM's d_model multiply-adds per logit then
# outweigh the lens' fixed elementwise passes (softmax sums, entropy, top-k) over the logits.
for width in (model.cfg.d_model, 4096):
    rows = torch.randn(1024, width)
    weights = torch.randn(width, model.cfg.d_vocab) / width**0.5
    with torch.no_grad():
        core = time_rivals({"GEMM": lambda: rows @ weights, "lens core": lambda: lens_logits_stats(rows, None, weights, k=10)},
                           repeats=3)
    print(f"  lens core on 1024 rows x d_model {width}: {core['lens core'] * 1000:.0f} ms, GEMM {core['GEMM'] * 1000:.0f} ms, "
          f"ratio {core['lens core'] / core['GEMM']:.2f}")
    print(bench_line("logit_lens_core", core["lens core"] / core["GEMM"], "<=", 1.3, vs="unembed_gemm", d_model=width))
