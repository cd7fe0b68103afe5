"""Every notebook in notebooks/ runs top to bottom on the shipped organism, draws each figure
it promises inline, uses the public API only, and is committed with its outputs."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
FIGURE = "figure"  # tag of a code cell whose output is a figure


def _figure_cells(notebook) -> list:
    return [c for c in notebook.cells if c.cell_type == "code" and FIGURE in c.get("metadata", {}).get("tags", [])]


def _has_picture(cell) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_draws_every_figure_inline(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    figures = _figure_cells(notebook)
    assert figures, f"{path.name} tags no figure cell"
    assert all(_has_picture(cell) for cell in figures), [c.source[:60] for c in figures if not _has_picture(c)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_executed_with_public_imports_and_interpretation(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "run scripts/execute_notebooks.py and commit the outputs"
    assert all(_has_picture(c) for c in _figure_cells(notebook)), "a figure cell was committed without its picture"
    source = "\n".join(c.source for c in code)
    assert "matplotlib.use" not in source  # figures render inline
    private = re.findall(r"^\s*(?:from|import) (mm_lens\.[\w.]+)", source, flags=re.MULTILINE)
    assert not private, f"use `from mm_lens import ...`, not {private}"
    for cell, after in zip(notebook.cells, notebook.cells[1:] + [None]):
        if cell in code and cell.get("outputs"):
            assert after is not None and after.cell_type == "markdown", f"no interpretation after: {cell.source[:60]!r}"


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
