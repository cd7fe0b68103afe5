"""One file per result: tensors in safetensors, everything else as a JSON header in the same
file's metadata, written atomically (a reader sees the old file or the new one)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

_HEADER_KEY = "mm_lens"


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], header: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and a JSON-able ``header`` to one safetensors file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata={_HEADER_KEY: json.dumps(header)})
    os.replace(temporary, path)
    return path


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the header written by ``save_tensors``."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if _HEADER_KEY not in metadata:
            raise ValueError(f"{path} was not written by mm_lens (no '{_HEADER_KEY}' header)")
        return {key: handle.get_tensor(key) for key in handle.keys()}, json.loads(metadata[_HEADER_KEY])
