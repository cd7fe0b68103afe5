"""HTMLReport writes one self-contained file that references nothing remote."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from circuitsvis.tokens import colored_tokens

from mm_lens.presentation.report import HTMLReport, remote_references
from mm_lens.presentation.visualize import CircuitsView


def small_figure():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


def tokens_view(title: str) -> CircuitsView:
    return CircuitsView("ColoredTokens", {"tokens": ["a", "cat"], "values": [0.5, -1.0]}, title=title)


def test_report_is_one_file_without_remote_references(tmp_path):
    report = HTMLReport("Domain neurons")
    report.add_heading("Views").add_view(tokens_view("first")).add_view(tokens_view("second"))
    report.add_view(colored_tokens(["x", "y"], [1.0, 2.0]))  # circuitsvis' own object
    report.add_figure(small_figure(), caption="a line")
    path = report.save(tmp_path / "out" / "report.html")
    page = path.read_text(encoding="utf-8")
    assert remote_references(page) == []
    assert "data:image/png;base64," in page and "<figcaption>a line</figcaption>" in page
    assert page.count("CircuitsVis.render(") == 3
    assert page.count("var CircuitsVis=") == 2  # once for our views, once inside RenderedHTML's local source


def test_remote_references_finds_cdn_scripts():
    page = (
        '<script src="https://unpkg.com/x.js"></script><link href="//cdn.net/a.css">'
        '<script type="module">import { render } from "https://unpkg.com/circuitsvis/dist/cdn/esm.js";</script>'
    )
    assert len(remote_references(page)) == 3
    assert remote_references('<img src="data:image/png;base64,AAA"><a href="#x">x</a>') == []


def test_text_is_escaped():
    page = HTMLReport("<T>").add_text("a <b>bold</b> & claim").to_html()
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; claim" in page and "<b>bold</b>" not in page
    assert "<title>&lt;T&gt;</title>" in page


def test_table_from_dicts_uses_their_keys_as_columns():
    page = HTMLReport("r").add_table([{"layer": 0, "entropy": 1.234567}, {"layer": 1, "note": "<x>"}]).to_html()
    assert "<th>layer</th><th>entropy</th><th>note</th>" in page
    assert ">1.235<" in page and "&lt;x&gt;" in page


def test_table_from_header_and_rows():
    page = HTMLReport("r").add_table([[0, "text"], [1, "image"]], header=["layer", "modality"]).to_html()
    assert "<th>layer</th><th>modality</th>" in page and ">image<" in page
    with pytest.raises(ValueError, match="one per header column"):
        HTMLReport("r").add_table([[0]], header=["a", "b"])
    with pytest.raises(ValueError, match="pass header="):
        HTMLReport("r").add_table([[0]])


def test_raw_html_and_views_keep_their_order():
    report = HTMLReport("r").add_html("<hr id='first'>").add_view(tokens_view("v")).add_heading("end", level=3)
    page = report.to_html()
    assert page.index("id='first'") < page.index("CircuitsVis.render(") < page.index("<h3>end</h3>")
    with pytest.raises(TypeError, match="add_html"):
        report.add_view("<div></div>")


def test_rebuild_makes_the_same_page_and_reads_the_figures_again(tmp_path):
    report = HTMLReport("Run").add_text("measured: 0.8 nats, 6× random").add_table([{"layer": 0, "entropy": 1.5}])
    report.add_figure(small_figure(), caption="kept as a file", save_as=tmp_path / "line.png")
    report.add_figure(small_figure(), caption="embedded only")
    report.add_view(tokens_view("view"))
    page = report.save(tmp_path / "report.html").read_text()
    assert HTMLReport.rebuild(tmp_path / "report.html").to_html() == page
    (tmp_path / "line.png").unlink()
    with pytest.raises(FileNotFoundError, match="line.png is gone; rerun the analysis"):
        HTMLReport.rebuild(tmp_path / "report.html")
