"""Warn at import when transformers or transformer-lens lies outside the tested range.

mm_lens reaches into both packages' internals, so a release outside the range declared
in pyproject.toml can break it silently. The range is read from the installed package
metadata (pyproject.toml stays the single source of truth); without metadata (a source
tree that was never installed) nothing is checked.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

GUARDED = ("transformers", "transformer-lens")
DIST = "mm_lens"

_warned = False


def _range_text(specifier: SpecifierSet) -> str:
    """``>=5.23,<5.26``: lower bounds first (``SpecifierSet`` sorts ``<`` first)."""

    def order(spec) -> tuple[int, str]:
        rank = 0 if spec.operator.startswith(">") else 2 if spec.operator.startswith("<") else 1
        return rank, spec.version

    return ",".join(str(s) for s in sorted(specifier, key=order))


def tested_ranges(requirements: Iterable[str], packages: Iterable[str] = GUARDED) -> dict[str, SpecifierSet]:
    """``{package: specifier}`` for each of ``packages`` among requirement lines (as
    ``importlib.metadata.requires`` gives them); lines of an extra and unparsable lines are
    skipped, and so is a package without a version bound."""
    wanted = {canonicalize_name(p): p for p in packages}
    ranges: dict[str, SpecifierSet] = {}
    for line in requirements:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        name = canonicalize_name(req.name)
        if name not in wanted or not str(req.specifier):
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        ranges[wanted[name]] = req.specifier
    return ranges


def untested_versions(requirements: Iterable[str], installed: Mapping[str, str | None]) -> list[str]:
    """One message per package of ``installed`` (``{name: version}``, ``None`` = not
    installed) whose version lies outside its range in ``requirements``."""
    installed = {canonicalize_name(k): v for k, v in installed.items()}
    messages = []
    for package, specifier in tested_ranges(requirements, GUARDED).items():
        version = installed.get(canonicalize_name(package))
        if version is None:
            continue
        try:
            ok = specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            continue
        if not ok:
            rng = _range_text(specifier)
            messages.append(
                f"{package} {version} is outside the range mm_lens is tested with ({rng}); "
                f"results may be silently wrong — install a tested version "
                f"(pip install '{package}{rng}')"
            )
    return messages


def installed_versions(packages: Iterable[str] = GUARDED) -> dict[str, str | None]:
    """``{package: installed version}``, ``None`` for a package that is not installed."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def warn_if_untested() -> list[str]:
    """Emit one ``UserWarning`` (once per process) when transformers or transformer-lens
    lies outside the range in mm_lens' installed metadata; returns the messages. Silent
    when the metadata is missing; never raises."""
    global _warned
    if _warned:
        return []
    _warned = True
    try:
        requirements = metadata.requires(DIST) or []
        messages = untested_versions(requirements, installed_versions())
    except Exception:  # a broken environment must not break `import mm_lens`
        return []
    if messages:
        warnings.warn("\n".join(messages), UserWarning, stacklevel=2)
    return messages
