"""Test data and references shared by the test modules: random pictures, samples of three
domains, HF logits with neurons zeroed by a plain PyTorch hook, and the runtime type
checker the tests run mm_lens under."""

from __future__ import annotations

import numpy as np
import torch
from beartype import BeartypeConf, beartype
from PIL import Image

# The runtime type checker conftest.py installs on mm_lens: beartype, with PEP 484's
# numeric tower (an int is a valid ``float``, as for static type checkers).
typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))


def random_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


DOMAINS = ("noise", "plain", "stripes")
# picture sizes that tile, crop or split differently (anyres tiles, Idefics3 crops, Qwen grids)
VARIED_SIZES = ((40, 60), (60, 20), (30, 50), (40, 40), (20, 60))


def _picture(domain: str, seed: int, size: tuple[int, int] = (40, 60)):
    height, width = size
    image = random_image(height, width, seed)
    if domain == "plain":
        image.paste((200, 30 + seed, 30), (0, 0, width, height))
    elif domain == "stripes":
        for y in range(0, height, 8):
            image.paste((255, 255, 255), (0, y, width, y + 3))
    return image


def make_samples(n: int = 10, sizes: tuple[tuple[int, int], ...] = ((40, 60),)) -> list[dict]:
    """Samples of three domains; every fourth has no image (text-only rows); picture ``i``
    has size ``sizes[i % len(sizes)]``."""
    questions = ["what is the color", "how many are there", "describe the picture", "is there a car"]
    answers = ["red", "two", "a road", "no"]
    return [
        {
            "question": questions[i % 4],
            "image": None if i % 4 == 3 else _picture(DOMAINS[i % 3], i, sizes[i % len(sizes)]),
            "domain": DOMAINS[i % 3],
            "answer": answers[i % 4],
        }
        for i in range(n)
    ]


def hf_logits_with_act_zeroed(hf_model, batch, layer: int, channels: list[int]) -> torch.Tensor:
    """An independent reference: HF logits with ``act_fn`` output channels of one LM layer zeroed
    by a plain PyTorch forward hook."""
    handle = hf_model.get_decoder().layers[layer].mlp.act_fn.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor(channels), 0.0)
    )
    try:
        return hf_model(**batch).logits
    finally:
        handle.remove()


def plateau_fall_tail(n_layers, b1, b2, high=9.0, low=2.0, noise=0.0, seed=0):
    """High plateau on [0, b1), a linear fall on [b1, b2) (from the plateau's last layer to
    the tail's first), a low tail on [b2, n)."""
    layers = torch.arange(n_layers, dtype=torch.float64)
    fall = high - (high - low) * (layers - b1 + 1) / (b2 - b1 + 1)
    curve = torch.where(layers < b1, high, torch.where(layers < b2, fall, low))
    return curve + noise * torch.randn(n_layers, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
