"""Tiny random-initialised MLLMs built offline from real ``transformers`` classes.

Used by the test-suite and by the command line before a trained model is at hand. Each
builder writes a complete model folder (weights as safetensors, config, tokenizer,
image processor or feature extractor, processor with chat template) that
``HookedMLLM.from_pretrained`` loads with no network.

Every module of this package that defines ``BUILDERS`` (name -> ``build(folder, **settings)``)
is registered in ``TINY_BUILDERS``; ``common.py`` holds what the builders share (a word-level
tokenizer, a chat template in the LLaVA-1.5 style). The builders import ``common``, never this
package, so the registry never sees a half-initialised one.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

__all__ = ["TINY_BUILDERS"]


def _registry() -> dict[str, Callable[..., Path]]:
    builders = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        builders.update(getattr(importlib.import_module(f"{__name__}.{module_info.name}"), "BUILDERS", {}))
    return builders


TINY_BUILDERS: dict[str, Callable[..., Path]] = _registry()

