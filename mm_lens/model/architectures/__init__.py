"""Per-architecture knowledge, one small module each: which TL adapter (with mm_lens' extra
neuron hooks) boots the model, which hooks are its neuron modules, and how each media
item's features are laid out in the token sequence.

Every module of this package that defines ``SPECS`` (a tuple of ``ArchitectureSpec``, from
``spec.py``) is registered: adding an architecture means adding one module. The modules
import ``spec.py``, never this package, so the registry never sees a half-initialised one.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from mm_lens.model.architectures.spec import ArchitectureSpec, UnsupportedArchitectureError

__all__ = ["ARCHITECTURES", "ArchitectureSpec", "UnsupportedArchitectureError", "spec_for"]


def _registry() -> dict[str, ArchitectureSpec]:
    specs = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        specs.update({spec.hf_class: spec for spec in getattr(module, "SPECS", ())})
    return specs


ARCHITECTURES: dict[str, ArchitectureSpec] = _registry()


def spec_for(config: Any) -> ArchitectureSpec:
    """The spec of a HF config's architecture, or an error listing the supported ones."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = ", ".join(names) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise UnsupportedArchitectureError(
        f"mm_lens has no adapter for {found}; supported architectures: {', '.join(sorted(ARCHITECTURES))}"
    )
