"""The architecture rules of docs/architecture.md: imports only downward through the layers,
pure cores free of heavy libraries (both import-linter contracts in pyproject.toml), and no
private name crossing a module boundary (an ``ast`` scan, which import-linter cannot express)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "mm_lens"
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """``lint-imports`` on the config (pyproject.toml) in ``cwd``, in a fresh interpreter, so
    that the package analysed is the one found first on ``pythonpath``."""
    env = dict(os.environ, COLUMNS="200")  # no line wrapping in the report
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "0 broken" in output, output


LAYERS = "Layers: each folder imports only the folders below it BROKEN"
PURE = "Pure cores import only torch, einops, jaxtyping and the stdlib BROKEN"


@pytest.mark.parametrize(
    "module, line, expected",
    [
        # an upward import: base may not import analysis
        ("base/io.py", "import mm_lens.analysis.lens", [LAYERS, "mm_lens.base.io -> mm_lens.analysis.lens"]),
        # upward through the package's public face (mm_lens/__init__.py imports model)
        ("base/display.py", "import mm_lens", [LAYERS, "mm_lens.base is not allowed to import mm_lens.model"]),
        # a heavy library in a pure core
        ("neurons/miner.py", "import transformers", [PURE, "mm_lens.neurons.miner -> transformers"]),
        # ... or reached through another mm_lens module
        ("base/modality.py", "import mm_lens.base.io", [PURE, "mm_lens.base.io -> safetensors"]),
        # a new top-level module must be given a layer
        ("extras.py", "", [LAYERS, "not listed as layers:\n\n- mm_lens.extras"]),
    ],
)
def test_import_contracts_catch_a_broken_rule(tmp_path, module, line, expected):
    """A copy of the package with one rule broken fails ``lint-imports``, naming the import."""
    shutil.copytree(PACKAGE, tmp_path / "mm_lens", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "mm_lens" / module
    target.write_text((target.read_text() if target.exists() else "") + f"\n{line}\n")
    result = lint_imports(tmp_path, pythonpath=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for text in expected:
        assert text in output, output


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_crossings(root: Path, package: str = "mm_lens") -> list[str]:
    """``file:line: module uses private name`` for every private name of one module of
    ``package`` (under ``root``) used by another: ``from mm_lens.x import _y`` (also relative),
    and ``x._y`` / ``mm_lens.x._y`` on an imported module. A private module (``_y.py``) is a
    private name of its package: only modules inside that package may import it."""
    files = {_module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}
    found = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        modules: dict[str, str] = {}  # local name -> the mm_lens module it is bound to

        def check(node: ast.AST, owner: str, private: str) -> None:
            inside = name == owner or (f"{owner}.{private}" in files and name.startswith(f"{owner}."))
            if not inside:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {name} uses {owner}.{private}")

        def check_path(node: ast.AST, dotted: str) -> None:
            parts = dotted.split(".")
            for i, part in enumerate(parts[1:], start=1):
                if _is_private(part):
                    check(node, ".".join(parts[:i]), part)
                    return

        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    source = ".".join(here[: len(here) - node.level + 1] + ([source] if source else []))
                if source.split(".")[0] != package:
                    continue
                check_path(node, source)
                for alias in node.names:
                    if _is_private(alias.name):
                        check(node, source, alias.name)
                    if f"{source}.{alias.name}" in files:
                        modules[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        check_path(node, alias.name)
                        modules[alias.asname or package] = alias.name if alias.asname else package
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                owner = ".".join([modules[value.id], *reversed(chain)])
                if owner in files:
                    check(node, owner, node.attr)
    return found


def test_no_private_name_crosses_a_module_boundary():
    crossings = private_crossings(ROOT)
    assert not crossings, "make these names public (drop the underscore) or keep them in their module:\n" + "\n".join(
        crossings
    )


def test_private_name_scan_catches_each_form(tmp_path):
    package = tmp_path / "mm_lens"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from ._helpers import helper\n")  # inside its package: fine
    (package / "sub" / "_helpers.py").write_text("def helper(): ...\ndef _own(): ...\nx = _own()\n")
    (package / "sub" / "core.py").write_text(
        "from mm_lens.sub._helpers import helper\nfrom mm_lens.sub import _helpers\ndef _secret(): ...\n"
    )
    (package / "user.py").write_text(
        "import mm_lens.sub.core\n"
        "import mm_lens.sub.core as core_alias\n"
        "from mm_lens.sub import core\n"
        "from mm_lens.sub.core import _secret, __doc__\n"
        "from .sub.core import _secret as again\n"
        "import mm_lens.sub._helpers\n"
        "from mm_lens.sub._helpers import helper\n"
        "core._secret(); core_alias._secret(); mm_lens.sub.core._secret(); core.__doc__\n"
    )
    found = [line.split(": ", 1)[1] for line in private_crossings(tmp_path)]
    assert found == [
        "mm_lens.user uses mm_lens.sub.core._secret",  # from mm_lens.sub.core import _secret
        "mm_lens.user uses mm_lens.sub.core._secret",  # from .sub.core import _secret
        "mm_lens.user uses mm_lens.sub._helpers",  # import mm_lens.sub._helpers
        "mm_lens.user uses mm_lens.sub._helpers",  # from mm_lens.sub._helpers import helper
        "mm_lens.user uses mm_lens.sub.core._secret",  # core._secret
        "mm_lens.user uses mm_lens.sub.core._secret",  # core_alias._secret
        "mm_lens.user uses mm_lens.sub.core._secret",  # mm_lens.sub.core._secret
    ], found
