"""The ``mm-lens`` command line."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Interpretability of multimodal LLMs on TransformerLens.")


def _demo_images():
    """Three synthetic pictures of different sizes (a gradient, stripes, a square)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:48, 0:80]
    gradient = np.stack([x * 3, y * 5, 255 - x * 3], axis=-1).clip(0, 255).astype(np.uint8)
    stripes = np.zeros((90, 40, 3), dtype=np.uint8)
    stripes[::10] = 255
    square = np.full((64, 64, 3), 30, dtype=np.uint8)
    square[16:48, 16:48] = (200, 40, 40)
    return [Image.fromarray(a) for a in (gradient, stripes, square)]


def _quiet_transformers() -> None:
    """Keep the console for results: no torchvision fallback notices or load progress bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
def inspect(
    model: Optional[Path] = typer.Option(None, help="Local model folder; default: a tiny random LLaVA-NeXT built on the spot."),
    out: Path = typer.Option(Path("results/inspect"), help="Results folder."),
) -> None:
    """Load a model, run prompts with images, and report where image tokens sit and how the
    neurons of every neuron module fire on image vs text tokens."""
    import torch
    from safetensors.torch import save_file

    from mm_lens import HookedMLLM
    from mm_lens.tiny import build_tiny_llava_next

    _quiet_transformers()
    if model is None:
        model = build_tiny_llava_next(Path(tempfile.mkdtemp(prefix="mm_lens_tiny_")))
        typer.echo(f"No --model given: using a tiny random-initialised LLaVA-NeXT at {model}")
    hooked = HookedMLLM.from_pretrained(model)
    typer.echo(repr(hooked))
    pictures = _demo_images()
    batch = hooked.prepare_inputs(
        ["what is the color of the shape", "how many are there", "describe"],
        [pictures[0], [pictures[1], pictures[2]], None],
    )
    mm = batch.modality_map
    typer.echo(mm.summary())
    hook_names = [name for hooks in hooked.neuron_hooks.values() for name in hooks]
    with torch.no_grad():
        _, cache = hooked.run_with_cache(batch, names_filter=hook_names)

    out.mkdir(parents=True, exist_ok=True)
    tensors, rows = {}, []
    image, text = mm.mask("image"), mm.mask("text")
    for module, hooks in hooked.neuron_hooks.items():
        for layer, name in enumerate(hooks):
            act = cache[name]
            if act.shape[:2] == image.shape:  # language-model positions: split by modality
                groups = {"image": act[image], "text": act[text]}
            else:  # vision tower / projector positions are all image
                groups = {"image": act.flatten(0, -2)}
            for group, values in groups.items():
                tensors[f"{module}.{layer}.{group}.mean"] = values.mean(0).contiguous()
                rows.append({
                    "module": module, "layer": layer, "group": group, "tokens": int(values.shape[0]),
                    "mean": float(values.mean()), "fraction_positive": float((values > 0).float().mean()),
                })
    save_file(tensors, str(out / "neuron_means.safetensors"))
    (out / "summary.json").write_text(json.dumps({"model": str(model), "modality_map": mm.summary(), "neurons": rows}, indent=2))
    typer.echo(f"{'module':<11} {'layer':>5} {'group':<6} {'tokens':>7} {'mean':>9} {'>0':>6}")
    for r in rows:
        typer.echo(f"{r['module']:<11} {r['layer']:>5} {r['group']:<6} {r['tokens']:>7} {r['mean']:>9.4f} {r['fraction_positive']:>6.2f}")
    typer.echo(f"Results written to {out}/ (summary.json, neuron_means.safetensors)")


@app.command("build-tiny")
def build_tiny(
    folder: Path = typer.Argument(..., help="Where to write the model."),
    arch: str = typer.Option("llava_next", help="llava or llava_next"),
) -> None:
    """Write a tiny random-initialised model (weights, tokenizer, processor) to a folder."""
    from mm_lens.tiny import TINY_BUILDERS

    if arch not in TINY_BUILDERS:
        raise typer.BadParameter(f"unknown arch {arch!r}; choose one of {', '.join(TINY_BUILDERS)}")
    typer.echo(f"Wrote {TINY_BUILDERS[arch](folder)}")


if __name__ == "__main__":
    app()
