"""Fixtures shared by the analysis tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def pairs(models, images):
    """Per architecture, a clean and a corrupted batch of two prompts: the same text, the
    second picture resized to the first's size in the corrupted run."""
    out = {}
    for arch, model in models.items():
        prompts = ["what is the color", "how many are there"]
        clean = model.prepare_inputs(prompts, [images[0], images[0]])
        corrupted = model.prepare_inputs(prompts, [images[2].resize(images[0].size)] * 2)
        out[arch] = (clean, corrupted)
    return out
