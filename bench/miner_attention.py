"""Cost of MINER's importance scores with the attention-weighted metrics (all five metrics,
text and image modalities, causal attention) vs the bare HF forward with its default (SDPA)
attention, on the same batch.

    python bench/miner_attention.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from common import batches, bench_line, build_model, samples, time_rivals
from mm_lens.neurons.modality_neurons import MinerScoreCollector

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
args = parser.parse_args()

def fast_forward(model, batch):
    with model.fast_attention():
        return model(batch)


model, bare = build_model(args.quick, attention="sdpa")
(batch,) = batches(model, samples(4), batch_size=4)
collector = MinerScoreCollector(model, ("text", "image"))
published = MinerScoreCollector(model, ("text", "image"), published_attention=True)
with torch.no_grad():
    times = time_rivals(
        {
            "bare HF forward (SDPA)": lambda: bare(**batch.inputs),
            "bridge forward (SDPA path)": lambda: fast_forward(model, batch),
            "MINER scores, causal attention": lambda: collector.update(batch, "bench"),
            "MINER scores, published attention": lambda: published.update(batch, "bench"),
        },
        repeats=3 if args.quick else 5,
    )
base = times["bare HF forward (SDPA)"]
print(f"batch {tuple(batch['input_ids'].shape)}, {model.cfg.n_layers} layers x {model.cfg.d_mlp} neurons")
for name, seconds in times.items():
    print(f"  {name:<36} {seconds * 1000:8.1f} ms   {seconds / base:5.2f}x bare")
print(bench_line("miner_attention", times["MINER scores, causal attention"] / base, "<=", 1.5, vs="hf_sdpa"))
print(bench_line("miner_attention_published", times["MINER scores, published attention"] / base, "<=", 1.5, vs="hf_sdpa"))
