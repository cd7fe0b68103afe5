"""The ``mm-lens`` command line: each command runs one analysis on a model (default: the
shipped model organism) and a dataset (default: its shipped held-out samples) and writes a
results folder with tensors (safetensors), tables, metadata (JSON), plots (PNG) and an HTML
report."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Interpretability of multimodal LLMs on TransformerLens.")
_settings = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a user error too.")) -> None:
    _settings["debug"] = debug


class UserError(Exception):
    """A mistake in the command's options or inputs: one line, exit code 2."""


# errors the library raises for bad input (a wrong path, a bad value, an unsupported model)
_USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``command``; a user error becomes one line on stderr and exit code 2 (the full
    traceback with ``--debug``); anything else keeps its traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except _USER_ERRORS as error:
            if _settings["debug"]:
                raise
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"mm-lens {command.__name__.replace('_', '-')}: error: {message}", file=sys.stderr)
            raise typer.Exit(2) from None

    return run


def _check(condition: bool, option: str, message: str) -> None:
    if not condition:
        raise UserError(f"{option}: {message}")


def _check_common(model: str, data: Optional[Path] = None, limit: Optional[int] = None, batch_size: int = 1) -> None:
    """The options every analysis command shares, checked before anything is loaded."""
    from mm_lens.model.hooked import resolve_model

    try:
        resolve_model(model)  # a missing folder or config.json is refused here, before anything loads
    except FileNotFoundError as error:
        raise UserError(f"--model: {error}") from None
    _check(data is None or data.exists(), "--data", f"{data} does not exist")
    _check(limit is None or limit >= 1, "--limit", f"must be at least 1, got {limit}")
    _check(batch_size >= 1, "--batch-size", f"must be at least 1, got {batch_size}")


def _check_out(out: Path, overwrite: bool) -> None:
    """A results folder that holds a finished run is refused before anything loads."""
    manifest = out / "manifest.json"
    finished = manifest.is_file() and json.loads(manifest.read_text()).get("complete")
    _check(overwrite or not finished, "--out", f"{out} already holds finished results; pass --overwrite to recompute, or choose another folder")


def _check_fraction(option: str, value: float) -> None:
    _check(0.0 < value <= 1.0, option, f"must be a fraction in (0, 1], got {value}")

MODEL_HELP = "Model folder, or 'default' for the model organism shipped with mm_lens."
DATA_HELP = "Dataset: a datasets.save_to_disk folder or a folder with data.jsonl; default: the shipped test split."
# the options every analysis command shares
ModelOption = Annotated[str, typer.Option(help=MODEL_HELP)]
DataOption = Annotated[Optional[Path], typer.Option(help=DATA_HELP)]
SplitOption = Annotated[Optional[str], typer.Option(help="Split of a multi-split dataset.")]
LimitOption = Annotated[Optional[int], typer.Option(help="At most this many samples per domain.")]
SeedsOption = Annotated[str, typer.Option(help="Seeds of the random-neuron controls.")]
ModeOption = Annotated[str, typer.Option(help="How neurons are switched off: zero, or mean (their mean activation).")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Recompute into a folder that already holds results.")]


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
    samples = load_default_samples(split or "test") if data is None else load_samples(data, split)  # checked before the model loads
    hooked = HookedMLLM.from_pretrained(model)
    if limit is not None:
        samples = first_per_domain(samples, limit)
    typer.echo(f"{hooked!r}; {len(samples)} samples")
    return hooked, samples


def _doses(doses: str) -> tuple[float, ...]:
    try:
        parsed = tuple(float(d) for d in doses.split(",") if d.strip())
    except ValueError:
        raise UserError(f"--doses: {doses!r} is not a comma-separated list of fractions") from None
    _check(all(0 < d <= 1 for d in parsed) and list(parsed) == sorted(set(parsed)), "--doses",
           f"{doses!r}: give increasing fractions in (0, 1], e.g. 0.01,0.05,0.2")
    return parsed


def _check_mode(mode: str) -> None:
    _check(mode in ("zero", "mean"), "--mode", f"{mode!r} is not one of zero, mean")


def _seeds(seeds: str) -> tuple[int, ...]:
    try:
        parsed = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seeds: {seeds!r} is not a comma-separated list of integers") from None
    _check(bool(parsed), "--seeds", "give at least one seed")
    return parsed


@app.command()
@_one_line_errors
def neurons(
    model: ModelOption = "default",
    data: DataOption = None,
    split: SplitOption = None,
    out: Path = typer.Option(Path("results/neurons"), help="Results folder."),
    limit: LimitOption = None,
    top_rate: float = typer.Option(0.01, help="Share of each module's neurons kept (LAPE)."),
    mode: ModeOption = "zero",
    doses: str = typer.Option("0.01,0.02,0.05,0.1,0.2", help="Shares of neurons for the dose-response curve ('' for none)."),
    dose_samples: int = typer.Option(16, help="Samples per domain for the dose-response curve."),
    evaluation_samples: int = typer.Option(40, help="Samples per domain for the deactivation evaluation."),
    seeds: SeedsOption = "0,1,2",
    batch_size: int = typer.Option(16),
    overwrite: OverwriteOption = False,
) -> None:
    """Domain-specific neurons (MMNeuron): collect -> select -> deactivate vs random -> evaluate -> report."""
    from mm_lens.pipelines import run_domain_neurons

    _check_out(out, overwrite)
    _check_common(model, data, limit, batch_size)
    _check_fraction("--top-rate", top_rate)
    _check_mode(mode)
    doses_ = _doses(doses)
    _check(evaluation_samples >= 1, "--evaluation-samples", f"must be at least 1, got {evaluation_samples}")
    _check(dose_samples >= 1, "--dose-samples", f"must be at least 1, got {dose_samples}")
    seeds_ = _seeds(seeds)
    hooked, samples = _load(model, data, split, limit)
    run = run_domain_neurons(hooked, samples, out, overwrite=overwrite, top_rate=top_rate, mode=mode, seeds=seeds_, doses=doses_,
                             dose_samples=dose_samples, evaluation_samples=evaluation_samples, batch_size=batch_size)
    typer.echo(run.neurons.table())
    typer.echo(run.evaluation.table("answer_logprob"))
    typer.echo(run.evaluation.table("accuracy"))
    if run.dose_response is not None:
        typer.echo(run.dose_response.table())
    typer.echo(run.evaluation.summary("answer_logprob"))
    typer.echo(f"Results in {out}/ (report.html, neurons/, stats.safetensors, evaluation/, dose_response/, *.png)")


@app.command()
@_one_line_errors
def miner(
    model: ModelOption = "default",
    data: DataOption = None,
    split: SplitOption = None,
    out: Path = typer.Option(Path("results/miner"), help="Results folder."),
    limit: LimitOption = None,
    ratio: float = typer.Option(0.02, help="Share of LM MLP neurons selected (K = ratio * layers * neurons)."),
    strategy: str = typer.Option("LA_MU", help="LA_MU, adaptive, LU_MA, uniform or random."),
    mode: ModeOption = "zero",
    evaluation_samples: int = typer.Option(20, help="Samples per dataset for deactivation and convergence."),
    seeds: SeedsOption = "0,1,2",
    batch_size: int = typer.Option(16),
    overwrite: OverwriteOption = False,
) -> None:
    """Modality-specific neurons (MINER), each domain as a dataset: scores -> selection ->
    deactivation vs random -> convergence -> report."""
    from mm_lens.model.samples import sample_column
    from mm_lens.neurons.miner import MINER_STRATEGIES
    from mm_lens.pipelines import run_miner

    _check_out(out, overwrite)
    _check_common(model, data, limit, batch_size)
    _check_fraction("--ratio", ratio)
    _check(strategy in MINER_STRATEGIES, "--strategy", f"{strategy!r} is not one of {', '.join(MINER_STRATEGIES)}")
    _check_mode(mode)
    _check(evaluation_samples >= 1, "--evaluation-samples", f"must be at least 1, got {evaluation_samples}")
    seeds_ = _seeds(seeds)
    hooked, samples = _load(model, data, split, limit)
    datasets: dict[str, list] = {}
    for i, domain in enumerate(sample_column(samples, "domain")):
        datasets.setdefault(domain, []).append(samples[i])
    run = run_miner(hooked, datasets, out, overwrite=overwrite, ratio=ratio, strategy=strategy, mode=mode, seeds=seeds_,
                    evaluation_samples=evaluation_samples, batch_size=batch_size)
    typer.echo(run.neurons.table())
    typer.echo(run.deactivation.table("answer_logprob"))
    typer.echo(run.deactivation.table("accuracy"))
    typer.echo(run.deactivation.summary("answer_logprob"))
    typer.echo(f"Results in {out}/ (report.html, scores.safetensors, neurons/, deactivation/, convergence/, *.png)")


@app.command("logit-lens")
@_one_line_errors
def logit_lens(
    model: ModelOption = "default",
    data: DataOption = None,
    split: SplitOption = None,
    out: Path = typer.Option(Path("results/logit_lens"), help="Results folder."),
    limit: LimitOption = 20,
    batch_size: int = typer.Option(16),
    overwrite: OverwriteOption = False,
) -> None:
    """Logit lens on image tokens: entropy per layer and domain, top-1 tokens, three stages."""
    from mm_lens.pipelines import run_logit_lens

    _check_out(out, overwrite)
    _check_common(model, data, limit, batch_size)
    hooked, samples = _load(model, data, split, limit)
    run = run_logit_lens(hooked, samples, out, overwrite=overwrite, batch_size=batch_size)
    typer.echo(run.summary.table())
    typer.echo(f"Results in {out}/ (report.html, lens.safetensors, *.png)")


@app.command()
@_one_line_errors
def patch(
    model: ModelOption = "default",
    data: DataOption = None,
    split: SplitOption = None,
    out: Path = typer.Option(Path("results/patch"), help="Results folder."),
    domain: Optional[str] = typer.Option(None, help="Domain to take the image pair from (default: the first)."),
    hook: str = typer.Option("resid_pre", help="resid_pre, resid_mid, resid_post, attn_out, mlp_out or mlp_act."),
    metric: str = typer.Option("logit_diff", help="logit_diff, prob or kl."),
    overwrite: OverwriteOption = False,
) -> None:
    """Activation patching across two images with the same question and different answers:
    per layer and position (each named by its token), and per image cell beside the clean and corrupted pictures."""
    from mm_lens.analysis.patching import HOOKS, METRICS
    from mm_lens.pipelines import run_patching

    _check_out(out, overwrite)
    _check_common(model, data)
    _check(hook in HOOKS, "--hook", f"{hook!r} is not one of {', '.join(HOOKS)}")
    _check(metric in METRICS, "--metric", f"{metric!r} is not one of {', '.join(METRICS)}")
    hooked, samples = _load(model, data, split, None)
    run = run_patching(hooked, samples, out, overwrite=overwrite, domain=domain, hook=hook, metric=metric)
    typer.echo(run.description)
    typer.echo(f"Results in {out}/ (report.html, by_position/, by_cell/, *.png)")


@app.command()
@_one_line_errors
def report(folder: Path = typer.Argument(..., help="A results folder written by another command.")) -> None:
    """(Re)build ``report.html`` of a results folder from the tables and plots in it."""
    from mm_lens.pipelines import folder_report

    _check(folder.is_dir(), "FOLDER", f"{folder} is not a results folder")
    typer.echo(f"Wrote {folder_report(folder)}")


@app.command()
@_one_line_errors
def inspect(
    model: ModelOption = "default",
    out: Path = typer.Option(Path("results/inspect"), help="Results folder."),
) -> None:
    """Where image tokens sit in a batch, and how each neuron module fires on image vs text tokens."""
    from mm_lens.pipelines import run_inspect

    _check_common(model)
    hooked, available = _load(model, None, None, 1)
    samples = [s for s in available if s["image"] is not None][:2] + [s for s in available if s["image"] is None][:1]
    run = run_inspect(hooked, samples, out)
    typer.echo(run.modality_map)
    typer.echo(run.table())
    typer.echo(f"Results written to {out}/ (summary.json, neuron_means.safetensors)")


@app.command("build-tiny")
@_one_line_errors
def build_tiny(
    folder: Path = typer.Argument(..., help="Where to write the model."),
    arch: str = typer.Option("llava_next", help="one of the tiny builders: llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, instructblip, qwen2_audio, gemma3, idefics3"),
) -> None:
    """Write a tiny random-initialised model (weights, tokenizer, processor) to a folder."""
    from mm_lens.model.tiny import TINY_BUILDERS

    _check(arch in TINY_BUILDERS, "--arch", f"unknown arch {arch!r}; choose one of {', '.join(TINY_BUILDERS)}")
    typer.echo(f"Wrote {TINY_BUILDERS[arch](folder)}")


if __name__ == "__main__":
    app()
