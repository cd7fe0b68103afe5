"""Small shared helpers for results objects' ``.table()`` and ``.plot()``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    cells = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(row[1:], widths[1:]))]) for row in cells
    )


def figure_and_axes(ax: Axes | None) -> tuple[Figure, Axes]:
    """A new pyplot-free figure (no display needed) or the figure of ``ax``."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    return fig, fig.add_subplot()
