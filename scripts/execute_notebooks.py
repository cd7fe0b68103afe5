"""Execute every notebook in notebooks/ in place, so the committed files show their outputs
(figures inline) on GitHub-style renderers. The tests execute them again on their own copy.

    python scripts/execute_notebooks.py [notebooks/quickstart.ipynb ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"


def execute(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(FOLDER)}}).execute()
    for cell in notebook.cells:  # outputs only: no per-run metadata churn in the diff
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(notebook, path)
    print(f"executed {path.name}")


if __name__ == "__main__":
    for path in [Path(p) for p in sys.argv[1:]] or sorted(FOLDER.glob("*.ipynb")):
        execute(path)
