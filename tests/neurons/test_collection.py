"""Collection over a dataset: checkpoints resume bit-identically; data-parallel runs equal
the single-process one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import make_samples
from mm_lens import HookedMLLM
from mm_lens.neurons.collection import collect_neuron_stats
from mm_lens.neurons.statistics import NeuronStats


def _eager(model: HookedMLLM) -> HookedMLLM:
    """The model with TransformerLens' eager attention: the ranks see other batches (other
    padding) than the single process, and SDPA's CPU kernel blocks its sums by sequence
    length, so its last bits would differ; eager attention keeps max/min bit-identical, which
    is what this test checks of the reduction across processes."""
    model.use_sdpa = False
    return model


def _worker(rank: int, world: int, folder: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _eager(HookedMLLM.from_pretrained(folder))
        stats = collect_neuron_stats(model, make_samples(), batch_size=2, progress=False)
        stats.save(f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_collection_equals_single_process(model_folders, tmp_path):
    out = str(tmp_path / "stats")
    mp.spawn(_worker, args=(2, model_folders["llava_next"], out, _free_port()), nprocs=2, join=True)
    single = collect_neuron_stats(_eager(HookedMLLM.from_pretrained(model_folders["llava_next"])), make_samples(), batch_size=2, progress=False)
    for rank in range(2):
        parallel = NeuronStats.load(f"{out}.{rank}")
        assert parallel.metadata["settings"]["world_size"] == 2
        for name, s in single.modules.items():
            p = parallel.modules[name]
            for field in ("over_zero", "n_tokens", "max", "min"):
                assert torch.equal(getattr(p, field), getattr(s, field)), (name, field)
            for field in ("sum", "sum_sq"):
                assert torch.allclose(getattr(p, field), getattr(s, field), rtol=1e-12, atol=1e-10), (name, field)


class _Interrupting(dict):
    """A sample that stops the run (as Ctrl-C would) when the run reads its question. The
    stop sits in the sample, not in the list's indexing: the tests' type checker reads a
    random item of each sequence argument, which must not stop the run."""

    def __getitem__(self, key):
        if key == "question":
            raise KeyboardInterrupt
        return super().__getitem__(key)


def _interrupted_at(samples, index):
    return [*samples[:index], _Interrupting(samples[index]), *samples[index + 1 :]]


@pytest.fixture(scope="module")
def samples():
    return make_samples()


def test_resume_after_interruption_is_bit_identical(model, samples, tmp_path):
    plain = collect_neuron_stats(model, samples, batch_size=2, progress=False)
    path = tmp_path / "stats.safetensors"
    with pytest.raises(KeyboardInterrupt):
        collect_neuron_stats(model, _interrupted_at(samples, 7), batch_size=2, checkpoint=path, checkpoint_every=1, progress=False)
    assert NeuronStats.load(path).metadata["batches_done"] == 3
    resumed = collect_neuron_stats(model, samples, batch_size=2, checkpoint=path, checkpoint_every=1, progress=False)
    assert resumed.equals(plain)


def test_checkpoint_with_other_settings_is_refused(model, samples, tmp_path):
    path = tmp_path / "stats.safetensors"
    collect_neuron_stats(model, samples[:4], batch_size=2, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match=r"belongs to another run \(batch_size: checkpoint 2, this run 1\)"):
        collect_neuron_stats(model, samples[:4], batch_size=1, checkpoint=path, progress=False)
