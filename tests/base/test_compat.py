"""The tested-version check of mm_lens.base.compat: out-of-range transformers / transformer-lens
releases are flagged (pure function, then the one import-time warning), and the
environment the tests run in is itself in range."""

from __future__ import annotations

import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest

from mm_lens.base import compat

# as importlib.metadata.requires gives them
REQUIREMENTS = [
    "torch>=2.4",
    "transformer-lens<4.4,>=4.3",
    "transformers<5.26,>=5.23",
    "packaging>=23",
    'pytest>=8; extra == "dev"',
]
IN_RANGE = {"transformers": "5.24.0", "transformer-lens": "4.3.0"}


def test_versions_in_range_pass():
    for version in ("5.23.0", "5.24.0", "5.25.0", "5.25.1"):
        assert compat.untested_versions(REQUIREMENTS, {**IN_RANGE, "transformers": version}) == []


@pytest.mark.parametrize(
    ("package", "version"),
    [
        ("transformers", "5.26.0"),  # too new
        ("transformers", "5.30.0"),
        ("transformers", "5.26.0.dev0"),  # a source install of the next release
        ("transformers", "5.22.2"),  # too old
        ("transformers", "4.57.6"),
        ("transformer-lens", "4.4.0"),
        ("transformer-lens", "4.2.0"),
    ],
)
def test_versions_out_of_range_are_flagged(package, version):
    messages = compat.untested_versions(REQUIREMENTS, {**IN_RANGE, package: version})
    assert len(messages) == 1
    assert messages[0].startswith(f"{package} {version} is outside the range")


def test_message_names_package_version_and_range():
    [message] = compat.untested_versions(REQUIREMENTS, {**IN_RANGE, "transformers": "5.30.0"})
    assert message == (
        "transformers 5.30.0 is outside the range mm_lens is tested with (>=5.23,<5.26); "
        "results may be silently wrong — install a tested version "
        "(pip install 'transformers>=5.23,<5.26')"
    )
    both = compat.untested_versions(REQUIREMENTS, {"transformers": "6.0.0", "transformer_lens": "5.0.0"})
    assert [m.split(" is outside")[0] for m in both] == ["transformer-lens 5.0.0", "transformers 6.0.0"]
    assert "(>=4.3,<4.4)" in both[0]


def test_missing_packages_extras_and_unbounded_lines_are_ignored():
    assert compat.untested_versions(REQUIREMENTS, {"transformers": None, "transformer-lens": None}) == []
    assert compat.untested_versions(REQUIREMENTS, {}) == []
    # a bound that only applies to an extra, and a package without any bound
    extra_only = ['transformers<5; extra == "old"', "transformer-lens", "not a requirement !!"]
    assert compat.tested_ranges(extra_only) == {}
    assert compat.untested_versions(extra_only, {"transformers": "5.30.0", "transformer-lens": "9.0"}) == []


def _warn(monkeypatch, requires, installed):
    """warn_if_untested on fake metadata, as if first called in this process."""
    monkeypatch.setattr(compat, "_warned", False)
    monkeypatch.setattr(compat.metadata, "requires", requires)
    monkeypatch.setattr(compat, "installed_versions", lambda: installed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = compat.warn_if_untested()
        second = compat.warn_if_untested()
    return first, second, caught


def test_warns_once_per_process(monkeypatch):
    installed = {"transformers": "5.30.0", "transformer-lens": "4.4.1"}
    first, second, caught = _warn(monkeypatch, lambda dist: REQUIREMENTS, installed)
    assert len(caught) == 1 and caught[0].category is UserWarning
    text = str(caught[0].message)
    assert "transformers 5.30.0" in text and "(>=5.23,<5.26)" in text
    assert "transformer-lens 4.4.1" in text and "(>=4.3,<4.4)" in text
    assert len(first) == 2 and second == []


def test_no_warning_in_range_or_without_metadata(monkeypatch):
    *_, caught = _warn(monkeypatch, lambda dist: REQUIREMENTS, IN_RANGE)
    assert caught == []

    def missing(dist):
        raise metadata.PackageNotFoundError(dist)

    first, _, caught = _warn(monkeypatch, missing, {"transformers": "5.30.0"})
    assert first == [] and caught == []
    first, _, caught = _warn(monkeypatch, lambda dist: None, {"transformers": "5.30.0"})
    assert first == [] and caught == []


def test_installed_environment_is_in_the_declared_range():
    installed = compat.installed_versions()
    assert installed["transformers"] is not None and installed["transformer-lens"] is not None
    requirements = metadata.requires("mm_lens")
    assert set(compat.tested_ranges(requirements)) == {"transformers", "transformer-lens"}
    assert compat.untested_versions(requirements, installed) == []


def test_installed_environment_is_in_the_pyproject_range():
    """pyproject.toml is the source of truth (the installed metadata may be stale in an
    editable install that predates a change of range)."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    requirements = pyproject["project"]["dependencies"]
    ranges = compat.tested_ranges(requirements)
    assert set(ranges) == {"transformers", "transformer-lens"}
    assert all(any(s.operator == "<" for s in r) for r in ranges.values()), "an upper bound each"
    assert compat.untested_versions(requirements, compat.installed_versions()) == []


def _import_mm_lens(prelude: str) -> str:
    code = (
        f"{prelude}\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import mm_lens\n"
        "print(repr([str(w.message) for w in caught if 'mm_lens is tested with' in str(w.message)]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


def test_import_of_mm_lens_warns_outside_the_range():
    prelude = (
        "import importlib.metadata as m\n"
        "real = m.requires\n"
        "m.requires = lambda d: ['transformers<1'] if d == 'mm_lens' else real(d)"
    )
    version = metadata.version("transformers")
    warned = eval(_import_mm_lens(prelude))
    assert warned == [
        f"transformers {version} is outside the range mm_lens is tested with (<1); results may be "
        f"silently wrong — install a tested version (pip install 'transformers<1')"
    ]


def test_import_of_mm_lens_is_silent_in_this_environment():
    assert _import_mm_lens("") == "[]"
