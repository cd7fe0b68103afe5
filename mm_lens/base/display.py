"""Small shared helpers for results objects' ``.table()`` and ``.plot()``: every figure of
mm_lens is made here, without pyplot."""

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


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure of ``width`` x ``height`` inches with constrained layout: nothing
    shown or kept by pyplot's global state; Jupyter displays it when returned, reports embed it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_and_axes(ax: Axes | None, size: tuple[float, float] = (6, 4)) -> tuple[Figure, Axes]:
    """A new figure of ``size`` with one axes (``new_figure``), or the figure of ``ax``."""
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(*size)
    return fig, fig.add_subplot()
