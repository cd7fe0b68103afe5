"""Fixtures of the architecture tests: each test module names its tiny model's folder with a
``folder`` fixture; ``model`` wraps it, ``hf_reference`` is an untouched HF copy of it (the
bridge rewires its own)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForImageTextToText

from mm_lens import HookedMLLM


@pytest.fixture(scope="module")
def model(folder) -> HookedMLLM:
    return HookedMLLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_reference(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
