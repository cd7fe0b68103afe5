"""docs/api.md lists every public class and function of the package."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import mm_lens

API = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
SKIP = {"mm_lens.cli", "mm_lens.model.architectures.bridge_components"}  # command line; internals
# one module per architecture: adapters, layouts and checks, documented in docs/models.md
SKIP_PREFIX = "mm_lens.model.architectures."


def test_every_public_name_is_in_the_api_reference():
    missing = []
    for info in pkgutil.walk_packages(mm_lens.__path__, "mm_lens."):
        if info.ispkg or info.name in SKIP or info.name.startswith(SKIP_PREFIX):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and f"`{name}`" not in API:
                missing.append(f"{info.name}.{name}")
    assert not missing, f"add to docs/api.md: {missing}"
