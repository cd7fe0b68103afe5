"""``HTMLReport``: one self-contained HTML file bundling the text, tables, figures and
circuitsvis views of an analysis. Figures are embedded as base64 PNG, views render from
circuitsvis' bundle inlined once in the page: the file opens offline and references nothing
remote.

Beside ``report.html``, ``save`` writes ``report.json``: the page's parts in order, with
figures saved as PNG files in the folder referenced by name, so ``HTMLReport.rebuild`` (the
``mm-lens report`` command) makes the same page again, with the figures' current files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from mm_lens.presentation.attention_view import AttentionView
from mm_lens.presentation.visualize import CircuitsView, bundle_script

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
td.text { text-align: left; }
figure { margin: 1em 0; }
figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; }
pre, .table-wrap { overflow-x: auto; max-width: 100%; }
"""


_REMOTE = re.compile(r"^\s*(?:https?:|ftp:|//)", re.IGNORECASE)
_REMOTE_IN_CODE = re.compile(
    r"""(?:\bimport\s*(?:[\w*{}\s,]+\bfrom\s*)?|\bimport\s*\(\s*|@import\s+(?:url\(\s*)?|url\(\s*)["']?((?:https?:)?//[^"')\s]+)""",
    re.IGNORECASE,
)


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.remote: list[str] = []
        self._tag: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag = tag
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action", "xlink:href") and value and _REMOTE.match(value):
                self.remote.append(f"<{tag} {name}={value!r}>")

    def handle_endtag(self, tag: str) -> None:
        self._tag = None

    def handle_data(self, data: str) -> None:
        if self._tag in ("script", "style"):
            self.remote.extend(match.group(1) for match in _REMOTE_IN_CODE.finditer(data))


def remote_references(page: str) -> list[str]:
    """Everything in an HTML page that would load from the network: ``src``/``href`` (and the
    like) pointing at http(s) or protocol-relative URLs, ES-module or CSS imports of them."""
    parser = _References()
    parser.feed(page)
    parser.close()
    return parser.remote


def _cell(value: Any) -> str:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _figure_html(png: bytes, caption: str | None) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption or "figure")
    figcaption = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{figcaption}</figure>'


class HTMLReport:
    """Collects sections and writes them as one HTML file (``save``)."""

    def __init__(self, title: str):
        self.title = title
        self._parts: list[str] = []
        self._files: dict[int, tuple[Path, str | None]] = {}  # part index -> (PNG file, caption)
        self._needs_circuitsvis = False

    def add_heading(self, text: str, level: int = 2) -> HTMLReport:
        """A section heading (``<h2>`` by default)."""
        if not 1 <= level <= 6:
            raise ValueError(f"heading level must be 1 to 6, got {level}")
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def add_text(self, text: str) -> HTMLReport:
        """A paragraph; ``text`` is escaped (blank lines start new paragraphs)."""
        for paragraph in str(text).split("\n\n"):
            self._parts.append(f"<p>{html.escape(paragraph).replace(chr(10), '<br>')}</p>")
        return self

    def add_preformatted(self, text: str) -> HTMLReport:
        """Plain text kept as laid out (a text table), escaped."""
        self._parts.append(f"<pre>{html.escape(str(text))}</pre>")
        return self

    def add_table(
        self,
        rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]],
        header: Sequence[str] | None = None,
        caption: str | None = None,
    ) -> HTMLReport:
        """A table from a list of dicts (columns = their keys, in first-seen order) or from
        ``header`` plus rows of values."""
        rows = list(rows)
        if rows and isinstance(rows[0], Mapping):
            if header is None:
                header = list(dict.fromkeys(key for row in rows for key in row))
            body = [[row.get(key, "") for key in header] for row in rows]  # type: ignore[union-attr]
        else:
            if header is None:
                raise ValueError("rows are sequences of values: pass header= with one name per column")
            body = [list(row) for row in rows]
            bad = [i for i, row in enumerate(body) if len(row) != len(header)]
            if bad:
                raise ValueError(f"rows {bad} do not have {len(header)} values (one per header column)")
        out = ['<div class="table-wrap"><table>']
        if caption:
            out.append(f"<caption>{html.escape(caption)}</caption>")
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
        for row in body:
            cells = []
            for value in row:
                css = "" if isinstance(value, (int, float)) else ' class="text"'
                cells.append(f"<td{css}>{html.escape(_cell(value))}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table></div>")
        self._parts.append("\n".join(out))
        return self

    def add_figure(self, fig: Any, caption: str | None = None, dpi: int = 100, save_as: str | Path | None = None) -> HTMLReport:
        """A matplotlib figure, embedded as a base64 PNG; with ``save_as`` also written to
        that PNG file (which ``rebuild`` reads again)."""
        if save_as is not None:
            fig.savefig(save_as, format="png", dpi=dpi, bbox_inches="tight")
            return self.add_image(Path(save_as), caption)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        return self.add_image(buffer.getvalue(), caption)

    def add_image(self, png: bytes | str | Path, caption: str | None = None) -> HTMLReport:
        """A PNG image (bytes or a file), embedded as base64."""
        if not isinstance(png, bytes):
            self._files[len(self._parts)] = (Path(png).resolve(), caption)
        self._parts.append(_figure_html(png if isinstance(png, bytes) else Path(png).read_bytes(), caption))
        return self

    def add_view(self, view: Any) -> HTMLReport:
        """A circuitsvis view: a ``mm_lens.presentation.visualize.CircuitsView`` (the bundle is inlined once
        per report) or circuitsvis' own ``RenderedHTML`` (its local, inlined source is used); or
        a multimodal ``mm_lens.presentation.attention_view.AttentionView`` (self-contained)."""
        if isinstance(view, CircuitsView):
            self._needs_circuitsvis = True
            self._parts.append(view.body_html())
        elif isinstance(view, AttentionView):
            self._parts.append(view.to_html())
        elif hasattr(view, "local_src"):
            self._parts.append(re.sub(r"^//# sourceMappingURL=.*$", "", view.local_src, flags=re.MULTILINE))
        else:
            raise TypeError(
                f"add_view takes a CircuitsView (mm_lens.presentation.visualize), an AttentionView or a circuitsvis RenderedHTML, got "
                f"{type(view).__name__}; use add_html for other HTML (it must not load remote scripts)"
            )
        return self

    def add_html(self, raw: str) -> HTMLReport:
        """Raw HTML, inserted as is."""
        self._parts.append(raw)
        return self

    def to_html(self) -> str:
        """The whole page as a string."""
        head = [
            '<meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title>",
            f"<style>{_STYLE}</style>",
        ]
        if self._needs_circuitsvis:
            head.append(bundle_script())
        body = [f"<h1>{html.escape(self.title)}</h1>", *self._parts]
        return "<!DOCTYPE html>\n<html>\n<head>\n" + "\n".join(head) + "\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"

    def save(self, path: str | Path) -> Path:
        """Write the report to ``path`` (one file, no external resources) and its parts to
        ``path`` with suffix ``.json`` (figures in that folder by file name)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        folder = path.parent.resolve()
        parts: list[dict[str, Any]] = []
        for i, part in enumerate(self._parts):
            file, caption = self._files.get(i, (None, None))
            if file is not None and file.parent == folder:
                parts.append({"image": file.name, "caption": caption})
            else:
                parts.append({"html": part})
        recipe = {"title": self.title, "circuitsvis": self._needs_circuitsvis, "parts": parts}
        path.with_suffix(".json").write_text(json.dumps(recipe, indent=1), encoding="utf-8")
        return path

    @classmethod
    def rebuild(cls, path: str | Path) -> HTMLReport:
        """The report saved at ``path`` (its ``.json`` parts), with every figure read again
        from its PNG file; a figure file that is gone is an error naming it."""
        path = Path(path)
        recipe = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        report = cls(recipe["title"])
        report._needs_circuitsvis = recipe["circuitsvis"]
        for part in recipe["parts"]:
            if "image" in part:
                file = path.parent / part["image"]
                if not file.is_file():
                    raise FileNotFoundError(f"the report's figure {file} is gone; rerun the analysis to make it again")
                report.add_image(file, part["caption"])
            else:
                report._parts.append(part["html"])
        return report
