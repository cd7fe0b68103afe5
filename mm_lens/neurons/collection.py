"""Drive the statistics collector over a dataset: batching, progress, checkpoints, and
data-parallel shards with ``torch.distributed``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch.distributed as dist
from tqdm.auto import tqdm

from mm_lens.model.hooked import HookedMLLM
from mm_lens.model.fingerprint import data_fingerprint, model_fingerprint
from mm_lens.model.samples import Samples, prompt_batch, sample_column
from mm_lens.neurons.statistics import NeuronStats, NeuronStatsCollector


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collect_neuron_stats(
    model: HookedMLLM,
    samples: Samples,
    *,
    domains: Sequence[str] | None = None,
    modules: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    batch_size: int = 8,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 20,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> NeuronStats:
    """Statistics of every neuron module over ``samples``, grouped by ``sample["domain"]``.

    Under ``torch.distributed`` each rank takes every ``world``-th sample and the result is
    all-reduced, so every rank returns the statistics of the whole dataset. With
    ``checkpoint`` (a file; one per rank, suffixed ``.rank{r}`` when distributed) the state
    is saved atomically every ``checkpoint_every`` batches and a rerun resumes from it,
    giving the same statistics as an uninterrupted run. NaN or inf in an activation is an
    error naming the hook and batch unless ``allow_nonfinite``.
    """
    if batch_size < 1 or checkpoint_every < 1:
        raise ValueError("batch_size and checkpoint_every must be >= 1")
    labels = sample_column(samples, "domain")
    domains = tuple(sorted(set(labels))) if domains is None else tuple(domains)
    rank, world = _rank_and_world()
    shard = list(range(rank, len(labels), world))
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]

    collector = NeuronStatsCollector(model, domains, modules, classes, allow_nonfinite=allow_nonfinite)
    settings = {
        "n_samples": len(labels), "batch_size": batch_size, "domains": list(domains),
        "modules": list(collector.hooks), "classes": list(collector.stats.classes), "rank": rank, "world_size": world,
        "model": model_fingerprint(model), "data": data_fingerprint(samples),
    }
    done = 0
    path = None if checkpoint is None else Path(f"{checkpoint}.rank{rank}" if world > 1 else checkpoint)
    if path is not None and path.exists():
        saved = NeuronStats.load(path)
        theirs = saved.metadata.get("settings") or {}
        differs = sorted(key for key in set(settings) | set(theirs) if settings.get(key) != theirs.get(key))
        if differs:
            details = "; ".join(f"{key}: checkpoint {theirs.get(key)!r}, this run {settings.get(key)!r}" for key in differs)
            raise ValueError(
                f"checkpoint {path} belongs to another run ({details}); delete it, choose another checkpoint path "
                "or results folder, or rerun with overwrite=True (--overwrite)"
            )
        collector.stats, done = saved, saved.metadata["batches_done"]

    bar = tqdm(total=len(batches), initial=done, desc="neuron statistics", disable=not progress or rank != 0, unit="batch")
    for number, indices in enumerate(batches[done:], start=done + 1):
        chunk = [samples[i] for i in indices]
        batch = prompt_batch(model, chunk)
        collector.update(batch, [s["domain"] for s in chunk])
        bar.update(1)
        if path is not None and (number % checkpoint_every == 0 or number == len(batches)):
            collector.stats.metadata = {"settings": settings, "batches_done": number}
            collector.stats.save(path, overwrite=True)  # this run's own checkpoint
    bar.close()

    stats = collector.stats
    if world > 1:
        stats.all_reduce()
    stats.metadata = {
        "settings": {**settings, "rank": 0, "world_size": world},
        "model": getattr(model.cfg, "model_name", None),
        "batches_done": len(batches),
    }
    return stats
