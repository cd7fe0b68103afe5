"""Session fixtures: tiny random models saved offline (LLaVA-1.5 and LLaVA-NeXT for every
analysis test; the other architectures for their own tests in tests/architectures), and images."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from mm_lens import HookedMLLM
from mm_lens.tiny import TINY_BUILDERS

ARCHS = ("llava", "llava_next")


def random_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


DOMAINS = ("noise", "plain", "stripes")


def _picture(domain: str, seed: int):
    image = random_image(40, 60, seed)
    if domain == "plain":
        image.paste((200, 30 + seed, 30), (0, 0, 60, 40))
    elif domain == "stripes":
        for y in range(0, 40, 8):
            image.paste((255, 255, 255), (0, y, 60, y + 3))
    return image


def make_samples(n: int = 10) -> list[dict]:
    """Samples of three domains; every fourth has no image (text-only rows)."""
    questions = ["what is the color", "how many are there", "describe the picture", "is there a car"]
    answers = ["red", "two", "a road", "no"]
    return [
        {
            "question": questions[i % 4],
            "image": None if i % 4 == 3 else _picture(DOMAINS[i % 3], i),
            "domain": DOMAINS[i % 3],
            "answer": answers[i % 4],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """``tiny_folder(name)``: the folder of the tiny model ``name`` of ``TINY_BUILDERS``,
    built on first use."""
    root, built = tmp_path_factory.mktemp("tiny_models"), {}

    def folder(name: str) -> str:
        if name not in built:
            built[name] = str(TINY_BUILDERS[name](root / name))
        return built[name]

    return folder


@pytest.fixture(scope="session")
def model_folders(tiny_folder) -> dict[str, str]:
    """The LLaVA-1.5 and LLaVA-NeXT folders every analysis test runs on."""
    return {arch: tiny_folder(arch) for arch in ARCHS}


@pytest.fixture(scope="session", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def models(model_folders) -> dict[str, HookedMLLM]:
    return {arch: HookedMLLM.from_pretrained(folder) for arch, folder in model_folders.items()}


@pytest.fixture(scope="session")
def model(models, arch) -> HookedMLLM:
    return models[arch]


@pytest.fixture(scope="session")
def hf_reference(model_folders, arch):
    """An untouched HF model of the same folder (the bridge rewires its own copy)."""
    return AutoModelForImageTextToText.from_pretrained(model_folders[arch], attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Images of different sizes and aspect ratios (anyres picks different tilings)."""
    return [random_image(30, 50, 0), random_image(60, 20, 1), random_image(40, 40, 2)]


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


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
