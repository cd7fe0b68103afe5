"""Cost of streaming neuron statistics on all neuron modules vs what a user would run
instead: the bare HF forward with SDPA attention (HF's default), at real image lengths.

Per shape, each in its own process (``--quick``: the small model; else LLaVA-1.5, 336 px =
576 image tokens, batch 2, and LLaVA-NeXT anyres, a square picture on the 2x2 grid = 2,928
image tokens, batch 1; ``--shapes wide7b``: LLaVA-1.5-7B's widths on 2 + 2 layers): first the
peak memory of one statistics run against the bare SDPA forward's, then the rivals on the
same batch, interleaved: bare HF forward (SDPA), bare HF forward (eager), the bridge's
forward, mm_lens statistics (LM MLP, vision MLP, projector; 5 domains x 4 position classes;
attention through SDPA, no hook needs the pattern) and the same statistics on
TransformerLens' eager attention; CPU seconds on one thread (``--wall``: wall time on all
threads). Then (small shapes) the peak memory over 1x and 10x the samples.

    python bench/stats_overhead.py [--quick | --shapes llava15 next wide7b]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import batches, bench_line, build_model, low_mmap_threshold, one_shape_per_process, peak_extra_mb, peak_rss_mb, samples, time_rivals
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.neurons.statistics import NeuronStatsCollector

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats (< 1 minute)")
parser.add_argument("--wall", action="store_true", help="wall-clock time on all threads (default: CPU time, one thread)")
parser.add_argument("--shapes", nargs="*", default=None, help="shapes of common.SHAPES (default: llava15 next; quick: quick)")
args = parser.parse_args()
low_mmap_threshold()
torch.manual_seed(0)
if not args.wall:  # CPU seconds on one thread: robust to the other jobs of a shared machine
    torch.set_num_threads(1)
clock = time.perf_counter if args.wall else time.process_time
domains = [f"domain{i}" for i in range(5)]
# shape -> (batch size, picture size)
SETUPS = {"quick": (4, (64, 96)), "full": (4, (64, 96)), "llava15": (2, (64, 96)), "next": (1, (672, 672)), "wide7b": (1, (64, 96))}
lines = []


def eager_stats(model, collector, batch, labels):
    model.use_sdpa = False
    try:
        collector.update(batch, labels)
    finally:
        model.use_sdpa = True


def fast_forward(model, batch):
    with model.fast_attention():
        return model(batch)


shapes = args.shapes or (["quick"] if args.quick else ["llava15", "next"])
for shape in one_shape_per_process(shapes):
    model, bare_sdpa, bare_eager = build_model(args.quick, "sdpa", shape=shape, also=("eager",))
    batch_size, size = SETUPS[shape]
    items = samples(batch_size, size=size)
    (batch,) = batches(model, items, batch_size=batch_size)
    labels = [s["domain"] for s in items]
    hook_names = [n for hooks in model.neuron_hooks.values() for n in hooks]
    collector = NeuronStatsCollector(model, domains)
    with torch.no_grad():
        for run in (lambda: bare_sdpa(**batch.inputs), lambda: collector.update(batch, labels), lambda: eager_stats(model, collector, batch, labels)):
            run()  # warm-up
        memory = {  # before the timings: they leave the heap in another shape
            "bare HF forward (SDPA)": peak_extra_mb(lambda: bare_sdpa(**batch.inputs)),
            "mm_lens statistics": peak_extra_mb(lambda: collector.update(batch, labels)),
            "statistics, eager attention": peak_extra_mb(lambda: eager_stats(model, collector, batch, labels)),
        }
        times = time_rivals(
            {
                "bare HF forward (SDPA)": lambda: bare_sdpa(**batch.inputs),
                "bare HF forward (eager)": lambda: bare_eager(**batch.inputs),
                "bridge forward": lambda: fast_forward(model, batch),
                "mm_lens statistics": lambda: collector.update(batch, labels),
                "statistics, eager attention": lambda: eager_stats(model, collector, batch, labels),
            },
            repeats=3,
            clock=clock,
        )
    n_image = int((batch["input_ids"] == model.hf_model.config.image_token_id).sum())
    print(f"[{shape}] batch {tuple(batch['input_ids'].shape)}, {n_image // batch_size} image tokens per row, "
          f"{len(hook_names)} neuron hooks, 5 domains x 4 classes")
    sdpa, eager = times["bare HF forward (SDPA)"], times["bare HF forward (eager)"]
    for name, seconds in times.items():
        print(f"  {name:<30} {seconds * 1000:8.1f} ms   {seconds / sdpa:5.2f}x SDPA   {seconds / eager:5.2f}x eager")
    for name, mb in memory.items():
        print(f"  peak memory above the weights, {name:<30} {mb:8.0f} MB")
    lines += [
        bench_line("stats", times["mm_lens statistics"] / sdpa, "<=", 1.05, vs="hf_sdpa", shape=shape),
        bench_line("stats", times["mm_lens statistics"] / eager, "<=", 1.05, vs="hf_eager", shape=shape),
        bench_line("stats_eager_attention", times["statistics, eager attention"] / sdpa, "<=", 1.05, vs="hf_sdpa", shape=shape),
        bench_line("bridge_forward", times["bridge forward"] / sdpa, "<=", 1.05, vs="hf_sdpa", shape=shape),
        bench_line("stats_peak_memory", memory["mm_lens statistics"] / memory["bare HF forward (SDPA)"], "<=", 1.10, vs="hf_sdpa", shape=shape),
    ]
    if shape in ("quick", "llava15"):  # memory over 1x and 10x the samples: the small shapes only
        n = 4
        collect_neuron_stats(model, samples(n, seed=1, size=size), domains=domains, batch_size=batch_size, progress=False)
        rss_1x = peak_rss_mb()
        collect_neuron_stats(model, samples(10 * n, seed=2, size=size), domains=domains, batch_size=batch_size, progress=False)
        rss_10x = peak_rss_mb()
        print(f"  peak RSS after {n} samples: {rss_1x:.0f} MB; after {10 * n} more: {rss_10x:.0f} MB")
        lines.append(bench_line("stats_memory", rss_10x / rss_1x, "<=", 1.05, vs="1x_samples", shape=shape))
    del model, bare_sdpa, bare_eager, collector
print("\n".join(lines))
