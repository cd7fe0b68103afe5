"""The documentation site builds with ``mkdocs build --strict`` (a broken link between pages, a
page missing from the nav or a reference to a missing object fails it), and its API reference,
generated from the docstrings by mkdocstrings, covers every public module."""

from __future__ import annotations

import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mm_lens

ROOT = Path(__file__).parents[1]
REFERENCE = ROOT / "docs" / "reference"
# one module per architecture and one tiny builder each: adapters, layouts and checks,
# documented in docs/models.md; their packages are in the reference
SKIP_PREFIX = ("mm_lens.model.architectures.", "mm_lens.model.tiny.")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent, capture_output=True, text=True, timeout=300,
    )


def test_site_builds_strictly(tmp_path):
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "site" / "reference" / "neurons" / "index.html").read_text()
    assert "lape_select" in page and "NeuronStats" in page  # rendered from the docstrings


def test_every_public_module_is_in_the_api_reference():
    documented = {
        line.split()[1]
        for page in REFERENCE.glob("*.md")
        for line in page.read_text().splitlines()
        if re.match(r":::\s+\S", line)
    }
    modules = [
        info.name
        for info in pkgutil.walk_packages(mm_lens.__path__, "mm_lens.")
        if not info.name.startswith(SKIP_PREFIX) and not info.name.rpartition(".")[2].startswith("_")
    ]
    missing = [name for name in modules if name not in documented]
    assert not missing, f"add a '::: module' line to a page of docs/reference/: {missing}"


def test_a_broken_reference_fails_the_strict_build(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    config = (ROOT / "mkdocs.yml").read_text()
    # the copy imports mm_lens from this source tree, not from the temporary folder
    config = re.sub(r"paths: \[\.\]", f"paths: [{ROOT.as_posix()!r}]", config)
    assert str(ROOT) in config
    (tmp_path / "mkdocs.yml").write_text(config)
    with (tmp_path / "docs" / "reference" / "base.md").open("a") as page:
        page.write("\n::: mm_lens.does_not_exist\n")
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "mm_lens.does_not_exist" in result.stdout + result.stderr
