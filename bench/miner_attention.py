"""Cost of MINER's importance scores with the attention-weighted metrics (all five metrics,
text and image modalities, causal attention) vs the bare HF forward with its default (SDPA)
attention, on the same batch: the 224 px shape (296 positions), then (not in quick mode) the
LLaVA-NeXT shape (a 672 px square picture: 2,928 image tokens) with the peak memory of one
scoring run against the bare forward's. The default route (SDPA forward, the pattern's sums
block by block) is ``miner_attention``; the pattern route (eager attention, ``hook_pattern``)
and the published variant are reported beside it.

    python bench/miner_attention.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from common import batches, bench_line, build_model, low_mmap_threshold, one_shape_per_process, peak_extra_mb, samples, time_rivals
from mm_lens.neurons.modality_neurons import MinerScoreCollector

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
args = parser.parse_args()

def fast_forward(model, batch):
    with model.fast_attention():
        return model(batch)


low_mmap_threshold()
# shape -> (batch size, picture size)
SETUPS = {"quick": (4, (64, 96)), "full": (4, (64, 96)), "next": (1, (672, 672))}
for shape in one_shape_per_process(["quick"] if args.quick else ["full", "next"]):
    model, bare = build_model(args.quick, attention="sdpa", shape=shape)
    size, picture = SETUPS[shape]
    (batch,) = batches(model, samples(size, size=picture), batch_size=size)
    collector = MinerScoreCollector(model, ("text", "image"))  # the default: fast route
    pattern = MinerScoreCollector(model, ("text", "image"), route="pattern")
    published = MinerScoreCollector(model, ("text", "image"), published_attention=True)
    fast, eager, public = "MINER scores, causal (default route)", "MINER scores, causal (pattern route)", "MINER scores, published attention"
    with torch.no_grad():
        for run in (lambda: bare(**batch.inputs), lambda: collector.update(batch, "bench"), lambda: pattern.update(batch, "bench")):
            run()  # warm-up; the collector's first call is its self-check (both routes)
        memory = {  # before the timings: they leave the heap in another shape
            "bare": peak_extra_mb(lambda: bare(**batch.inputs)),
            "miner": peak_extra_mb(lambda: collector.update(batch, "bench")),
            "pattern": peak_extra_mb(lambda: pattern.update(batch, "bench")),
        }
        times = time_rivals(
            {
                "bare HF forward (SDPA)": lambda: bare(**batch.inputs),
                "bridge forward (SDPA path)": lambda: fast_forward(model, batch),
                fast: lambda: collector.update(batch, "bench"),
                eager: lambda: pattern.update(batch, "bench"),
                public: lambda: published.update(batch, "bench"),
            },
            repeats=3 if args.quick or shape == "next" else 5,
        )
    assert collector.route == "fast", "the fast route fell back to the pattern route: see the FastPathWarning above"
    base = times["bare HF forward (SDPA)"]
    print(f"[{shape}] batch {tuple(batch['input_ids'].shape)}, {model.cfg.n_layers} layers x {model.cfg.d_mlp} neurons")
    for name, seconds in times.items():
        print(f"  {name:<38} {seconds * 1000:8.1f} ms   {seconds / base:5.2f}x bare")
    print(
        f"  peak memory above the weights: bare forward {memory['bare']:.0f} MB, MINER scores {memory['miner']:.0f} MB"
        f" (pattern route {memory['pattern']:.0f} MB)"
    )
    print(bench_line("miner_attention", times[fast] / base, "<=", 1.5, vs="hf_sdpa", shape=shape))
    print(bench_line("miner_attention_pattern_route", times[eager] / base, "<=", 1.5, vs="hf_sdpa", shape=shape))
    print(bench_line("miner_attention_published", times[public] / base, "<=", 1.5, vs="hf_sdpa", shape=shape))
    print(bench_line("miner_peak_memory", memory["miner"] / max(memory["bare"], 1.0), "<=", 1.5, vs="hf_sdpa", shape=shape))
    print(bench_line("miner_peak_memory_pattern_route", memory["pattern"] / max(memory["bare"], 1.0), "<=", 1.5, vs="hf_sdpa", shape=shape))
