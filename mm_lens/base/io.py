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


def refuse_to_replace(path: str | os.PathLike, overwrite: bool) -> None:
    """``FileExistsError`` when ``path`` exists and ``overwrite`` is not set: saving never
    replaces a file silently."""
    if not overwrite and Path(path).exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or save elsewhere")


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], header: Mapping[str, Any], kind: str, overwrite: bool = False
) -> Path:
    """Write ``tensors`` and a JSON-able ``header`` to one safetensors file at ``path``,
    tagged as an ``mm_lens.<kind>`` result of the current ``FORMAT_VERSION``; an existing
    file is replaced only with ``overwrite``."""
    refuse_to_replace(path, overwrite)
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


MANIFEST = "manifest.json"


def open_results_folder(out: str | os.PathLike, manifest: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Claim ``out`` for a run described by ``manifest`` (command, model and data
    fingerprints, settings, versions) and write ``out/manifest.json``.

    A folder that holds finished results, another run's unfinished one, or files mm_lens
    did not write is refused with ``FileExistsError`` saying what is there, unless
    ``overwrite`` (then its checkpoints are removed and everything is recomputed). The same
    run's unfinished folder is taken as is, so its checkpoint resumes."""
    out = Path(out)
    path = out / MANIFEST
    advice = "pass overwrite=True (--overwrite) to recompute, or choose another folder"
    if out.exists() and not overwrite:
        if path.is_file():
            found = json.loads(path.read_text())
            if found.get("complete"):
                raise FileExistsError(f"{out} already holds the finished results of `{found.get('command')}`; {advice}")
            differs = sorted(k for k in set(found) | set(manifest) if k not in ("complete", "versions") and found.get(k) != manifest.get(k))
            if differs:
                raise FileExistsError(f"{out} holds an unfinished run with another {', '.join(differs)}; {advice}")
        elif any(out.iterdir()):
            raise FileExistsError(f"{out} holds files that no mm_lens run wrote ({MANIFEST} is missing); {advice}")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for checkpoint in out.glob("*.checkpoint.safetensors*"):
            checkpoint.unlink()
    _write_manifest(path, {**manifest, "complete": False})
    return out


def close_results_folder(out: str | os.PathLike) -> None:
    """Mark the run in ``out`` finished (its manifest's ``complete``)."""
    path = Path(out) / MANIFEST
    _write_manifest(path, {**json.loads(path.read_text()), "complete": True})


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, default=str) + "\n"

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)
