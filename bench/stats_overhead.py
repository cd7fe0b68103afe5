"""Cost of streaming neuron statistics on all neuron modules vs the bare HF forward.

Rivals on the same batches, in one process: bare HF forward (eager attention), the
bridge's forward, mm_lens statistics (LM MLP, vision MLP, projector; 5 domains x 4 position
classes), and TransformerLens ``run_with_cache`` followed by the same reduction. Then peak
memory of a statistics run over 1x and 10x the samples.

    python bench/stats_overhead.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

from common import batches, bench_line, build_model, peak_rss_mb, samples, time_rivals
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.neurons.statistics import NeuronStatsCollector

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats (< 1 minute)")
args = parser.parse_args()
torch.manual_seed(0)

model, bare = build_model(args.quick)
domains = [f"domain{i}" for i in range(5)]
items = samples(4)
(batch,) = batches(model, items, batch_size=4)
labels = [s["domain"] for s in items]
hook_names = [n for hooks in model.neuron_hooks.values() for n in hooks]
collector = NeuronStatsCollector(model, domains)


def cache_then_reduce():
    _, cache = model.run_with_cache(batch, names_filter=hook_names)
    NeuronStatsCollector(model, domains).add_cache(cache, batch, labels)


with torch.no_grad():
    times = time_rivals(
        {
            "bare HF forward": lambda: bare(**batch.inputs),
            "bridge forward": lambda: model(batch),
            "mm_lens statistics": lambda: collector.update(batch, labels),
            "TL run_with_cache + reduce": cache_then_reduce,
        },
        repeats=3 if args.quick else 7,
    )
base = times["bare HF forward"]
print(f"batch {tuple(batch['input_ids'].shape)}, {len(hook_names)} neuron hooks, 5 domains x 4 classes")
for name, seconds in times.items():
    print(f"  {name:<28} {seconds * 1000:8.1f} ms   {seconds / base:5.2f}x bare")

n = 8 if args.quick else 16
collect_neuron_stats(model, samples(n, seed=1), domains=domains, batch_size=4, progress=False)
rss_1x = peak_rss_mb()
collect_neuron_stats(model, samples(10 * n, seed=2), domains=domains, batch_size=4, progress=False)
rss_10x = peak_rss_mb()
state_mb = sum(t.numel() * t.element_size() for m in collector.stats.modules.values() for t in m.tensors().values()) / 2**20
print(f"peak RSS after {n} samples: {rss_1x:.0f} MB; after {10 * n} more: {rss_10x:.0f} MB; statistics state {state_mb:.1f} MB")
print(bench_line("stats_memory", rss_10x / rss_1x, "<=", 1.05))
print(bench_line("stats", times["mm_lens statistics"] / base, "<=", 1.05))
