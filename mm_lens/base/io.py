"""One file per result: tensors in safetensors, everything else as a JSON header in the same
file's metadata, written atomically (a reader sees the old file or the new one).

Every result file says what it holds: its header carries ``format`` (``"mm_lens.<Kind>"``,
e.g. ``"mm_lens.NeuronStats"``) and ``format_version``; loading checks both and names the
file when they, or the file itself, are not what the caller expects.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

FORMAT_VERSION = 1
_HEADER_KEY = "mm_lens"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(temporary_name)`` into a temporary file beside ``path``, then move it onto
    ``path`` in one step (``os.replace``); the temporary file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], header: Mapping[str, Any], kind: str) -> Path:
    """Write ``tensors`` and a JSON-able ``header`` to one safetensors file at ``path``,
    tagged as an ``mm_lens.<kind>`` result of the current ``FORMAT_VERSION``."""
    tagged = {"format": f"mm_lens.{kind}", "format_version": FORMAT_VERSION, **header}
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda temporary: save_file(contiguous, temporary, metadata={_HEADER_KEY: json.dumps(tagged)}))


def load_tensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the header of an ``mm_lens.<kind>`` file written by ``save_tensors``."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} could not be read as a safetensors file ({error}); it may be truncated: write it again") from error
    if _HEADER_KEY not in metadata:
        raise ValueError(f"{path} was not written by mm_lens (no '{_HEADER_KEY}' header)")
    header = json.loads(metadata[_HEADER_KEY])
    expected = f"mm_lens.{kind}"
    if header.get("format") != expected or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} holds {header.get('format')!r} version {header.get('format_version')!r}; expected {expected!r} "
            f"version {FORMAT_VERSION} (load it with the class that saved it, or save it again with this mm_lens)"
        )
    return tensors, {k: v for k, v in header.items() if k not in ("format", "format_version")}
