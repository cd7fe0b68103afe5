"""What a person sees: each command's report opened in headless Chromium on the shipped
organism. Every figure loads, nothing spills past the page's width, the page opens with
sentences written from measured numbers, and the screenshot is not blank.

Set ``MM_LENS_SCREENSHOTS=folder`` to keep the screenshots (one PNG per report) to look at.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mm_lens.cli import app

COMMANDS = {
    "neurons": ["--limit", "6", "--evaluation-samples", "2", "--seeds", "0", "--doses", "0.01,0.2", "--dose-samples", "2"],
    "miner": ["--limit", "4"],
    "logit-lens": [],
    "patch": ["--domain", "driving"],
}
WIDTH = 1280


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """Each command's ``report.html``, run once on the shipped organism."""
    root = tmp_path_factory.mktemp("reports")
    out = {}
    for command, extra in COMMANDS.items():
        result = CliRunner().invoke(app, [command, "--out", str(root / command), *extra])
        assert result.exit_code == 0, result.output
        out[command] = root / command / "report.html"
    return out


def _screenshot(driver, page: Path) -> tuple[np.ndarray, dict]:
    """The whole page at ``WIDTH`` pixels wide, and what the page says of its layout."""
    driver.set_window_size(WIDTH, 1000)
    driver.get(page.resolve().as_uri())
    layout = driver.execute_script(
        """
        const images = Array.from(document.images);
        return {
          images: images.length,
          broken: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt || i.src.slice(0, 40)),
          scrollWidth: document.documentElement.scrollWidth,
          innerWidth: window.innerWidth,
          height: document.documentElement.scrollHeight,
          opening: (document.querySelector('p') || {}).textContent || '',
        };
        """
    )
    driver.set_window_size(WIDTH, min(int(layout["height"]) + 120, 16000))
    picture = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    return np.asarray(picture), layout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_report_renders_in_a_browser(browser, reports, command):
    pixels, layout = _screenshot(browser, reports[command])
    keep = os.environ.get("MM_LENS_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(Path(keep) / f"{command}.png")
    pixels = pixels.astype(np.float64).mean(-1)  # grey levels
    assert layout["images"] >= 1, f"{command}: the report shows no figure"
    assert layout["broken"] == [], f"{command}: figures that did not load: {layout['broken']}"
    assert layout["scrollWidth"] <= layout["innerWidth"] + 1, (
        f"{command}: the page is {layout['scrollWidth']} px wide in a {layout['innerWidth']} px window"
    )
    assert any(ch.isdigit() for ch in layout["opening"]), f"{command}: the report does not open with measured numbers: {layout['opening']!r}"
    assert pixels.std() > 20, f"{command}: the screenshot is nearly uniform (sd {pixels.std():.1f})"
    # figures take real space: a good part of the page is not background white
    assert (pixels < 235).mean() > 0.05, f"{command}: under 5% of the page is drawn"
