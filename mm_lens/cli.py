"""The ``mm-lens`` command line: each command runs one analysis on a model (default: the
shipped model organism) and a dataset (default: its shipped held-out samples) and writes a
results folder with tensors (safetensors), tables, metadata (JSON), plots (PNG) and an HTML
report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Interpretability of multimodal LLMs on TransformerLens.")

MODEL_HELP = "Model folder, or 'default' for the model organism shipped with mm_lens."
DATA_HELP = "Dataset: a datasets.save_to_disk folder or a folder with data.jsonl; default: the shipped test split."
# the options every analysis command shares
ModelOption = Annotated[str, typer.Option(help=MODEL_HELP)]
DataOption = Annotated[Optional[Path], typer.Option(help=DATA_HELP)]
SplitOption = Annotated[Optional[str], typer.Option(help="Split of a multi-split dataset.")]
LimitOption = Annotated[Optional[int], typer.Option(help="At most this many samples per domain.")]
SeedsOption = Annotated[str, typer.Option(help="Seeds of the random-neuron controls.")]


def _quiet_transformers() -> None:
    """Keep the console for results: no torchvision fallback notices or load progress bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(model: str, data: Optional[Path], split: Optional[str], limit: Optional[int]):
    """The model and the samples (at most ``limit`` per domain)."""
    from mm_lens import HookedMLLM
    from mm_lens.base.data import load_default_samples, load_samples
    from mm_lens.model.samples import first_per_domain

    _quiet_transformers()
    hooked = HookedMLLM.from_pretrained(model)
    samples = load_default_samples(split or "test") if data is None else load_samples(data, split)
    if limit is not None:
        samples = first_per_domain(samples, limit)
    typer.echo(f"{hooked!r}; {len(samples)} samples")
    return hooked, samples


def _seeds(seeds: str) -> tuple[int, ...]:
    return tuple(int(s) for s in seeds.split(",") if s.strip())


@app.command()
def neurons(
    model: ModelOption = "default",
    data: DataOption = None,
    split: SplitOption = None,
    out: Path = typer.Option(Path("results/neurons"), help="Results folder."),
    limit: LimitOption = None,
    top_rate: float = typer.Option(0.01, help="Share of each module's neurons kept (LAPE)."),
    evaluation_samples: int = typer.Option(40, help="Samples per domain for the deactivation evaluation."),
    seeds: SeedsOption = "0,1,2",
    batch_size: int = typer.Option(16),
) -> None:
    """Domain-specific neurons (MMNeuron): collect -> select -> deactivate vs random -> evaluate -> report."""
    from mm_lens.pipelines import run_domain_neurons

    hooked, samples = _load(model, data, split, limit)
    run = run_domain_neurons(hooked, samples, out, top_rate=top_rate, seeds=_seeds(seeds),
                             evaluation_samples=evaluation_samples, batch_size=batch_size)
    typer.echo(run.neurons.table())
    typer.echo(run.evaluation.table("accuracy"))
    typer.echo(f"Results in {out}/ (report.html, neurons/, stats.safetensors, evaluation/, *.png)")


@app.command()
def miner(
    model: ModelOption = "default",
    data: DataOption = None,
    split: SplitOption = None,
    out: Path = typer.Option(Path("results/miner"), help="Results folder."),
    limit: LimitOption = None,
    ratio: float = typer.Option(0.02, help="Share of LM MLP neurons selected (K = ratio * layers * neurons)."),
    strategy: str = typer.Option("LA_MU", help="LA_MU, adaptive, LU_MA, uniform or random."),
    evaluation_samples: int = typer.Option(20, help="Samples per dataset for deactivation and convergence."),
    seeds: SeedsOption = "0,1,2",
    batch_size: int = typer.Option(16),
) -> None:
    """Modality-specific neurons (MINER), each domain as a dataset: scores -> selection ->
    deactivation vs random -> convergence -> report."""
    from mm_lens.model.samples import sample_column
    from mm_lens.pipelines import run_miner

    hooked, samples = _load(model, data, split, limit)
    datasets: dict[str, list] = {}
    for i, domain in enumerate(sample_column(samples, "domain")):
        datasets.setdefault(domain, []).append(samples[i])
    run = run_miner(hooked, datasets, out, ratio=ratio, strategy=strategy, seeds=_seeds(seeds),
                    evaluation_samples=evaluation_samples, batch_size=batch_size)
    typer.echo(run.neurons.table())
    typer.echo(run.deactivation.table("accuracy"))
    typer.echo(f"Results in {out}/ (report.html, scores.safetensors, neurons/, deactivation/, convergence/, *.png)")


@app.command("logit-lens")
def logit_lens(
    model: ModelOption = "default",
    data: DataOption = None,
    split: SplitOption = None,
    out: Path = typer.Option(Path("results/logit_lens"), help="Results folder."),
    limit: LimitOption = 20,
    batch_size: int = typer.Option(16),
) -> None:
    """Logit lens on image tokens: entropy per layer and domain, top-1 tokens, three stages."""
    from mm_lens.pipelines import run_logit_lens

    hooked, samples = _load(model, data, split, limit)
    run = run_logit_lens(hooked, samples, out, batch_size=batch_size)
    typer.echo(run.summary.table())
    typer.echo(f"Results in {out}/ (report.html, lens.safetensors, *.png)")


@app.command()
def patch(
    model: ModelOption = "default",
    data: DataOption = None,
    split: SplitOption = None,
    out: Path = typer.Option(Path("results/patch"), help="Results folder."),
    domain: Optional[str] = typer.Option(None, help="Domain to take the image pair from (default: the first)."),
    hook: str = typer.Option("resid_pre", help="resid_pre, resid_mid, resid_post, attn_out, mlp_out or mlp_act."),
    metric: str = typer.Option("logit_diff", help="logit_diff, prob or kl."),
) -> None:
    """Activation patching across two images with the same question and different answers:
    per layer and position, and per image cell drawn over the picture."""
    from mm_lens.pipelines import run_patching

    hooked, samples = _load(model, data, split, None)
    run = run_patching(hooked, samples, out, domain=domain, hook=hook, metric=metric)
    typer.echo(run.description)
    typer.echo(f"Results in {out}/ (report.html, by_position/, by_cell/, *.png)")


@app.command()
def report(folder: Path = typer.Argument(..., help="A results folder written by another command.")) -> None:
    """(Re)build ``report.html`` of a results folder from the tables and plots in it."""
    from mm_lens.pipelines import folder_report

    typer.echo(f"Wrote {folder_report(folder)}")


@app.command()
def inspect(
    model: ModelOption = "default",
    out: Path = typer.Option(Path("results/inspect"), help="Results folder."),
) -> None:
    """Where image tokens sit in a batch, and how each neuron module fires on image vs text tokens."""
    from mm_lens.pipelines import run_inspect

    hooked, available = _load(model, None, None, 1)
    samples = [s for s in available if s["image"] is not None][:2] + [s for s in available if s["image"] is None][:1]
    run = run_inspect(hooked, samples, out)
    typer.echo(run.modality_map)
    typer.echo(run.table())
    typer.echo(f"Results written to {out}/ (summary.json, neuron_means.safetensors)")


@app.command("build-tiny")
def build_tiny(
    folder: Path = typer.Argument(..., help="Where to write the model."),
    arch: str = typer.Option("llava_next", help="one of the tiny builders: llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, instructblip, qwen2_audio, gemma3, idefics3"),
) -> None:
    """Write a tiny random-initialised model (weights, tokenizer, processor) to a folder."""
    from mm_lens.model.tiny import TINY_BUILDERS

    if arch not in TINY_BUILDERS:
        raise typer.BadParameter(f"unknown arch {arch!r}; choose one of {', '.join(TINY_BUILDERS)}")
    typer.echo(f"Wrote {TINY_BUILDERS[arch](folder)}")


if __name__ == "__main__":
    app()
