"""Every module the project's code imports is its own, the standard library's, or declared.

A fresh virtual environment has only what ``pyproject.toml`` declares (the README's first
command installs the package with its ``test`` extra and the plugins under ``plugins/``), so an
import of an undeclared distribution passes on a machine where it happens to be installed and
fails for a newcomer. This test reads every ``import`` under ``mlsgd_dsl/``, ``tests/``,
``examples/``, ``benchmarks/`` and ``plugins/`` and maps it to the distribution that provides
it (``importlib.metadata.packages_distributions``).
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("mlsgd_dsl", "tests", "examples", "benchmarks", "plugins")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(pyproject: Path) -> set[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_normalise(re.split(r"[<>=!~;\[ @]", r, maxsplit=1)[0]) for r in reqs}


def _own_modules() -> set[str]:
    own = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    own |= {p.parent.name for p in ROOT.glob("plugins/*/*/__init__.py")}
    for folder in SCANNED:  # modules next to the scripts and tests (conftest, _common, ...)
        own |= {p.stem for p in (ROOT / folder).rglob("*.py")}
    return own


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _declared_for(path: Path, declared_root: set[str]) -> set[str]:
    """The project's declarations, plus a plugin's own when ``path`` lies inside that plugin."""
    rel = path.relative_to(ROOT).parts
    if rel[0] == "plugins" and len(rel) > 2 and (ROOT / "plugins" / rel[1] / "pyproject.toml"
                                                 ).is_file():
        return declared_root | _requirements(ROOT / "plugins" / rel[1] / "pyproject.toml")
    return declared_root


def undeclared_imports() -> list[str]:
    declared = _requirements(ROOT / "pyproject.toml")
    own = _own_modules()
    providers = packages_distributions()
    missing = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if any(part.startswith(".") or part in ("build", "__pycache__")
                   for part in path.relative_to(ROOT).parts):
                continue
            allowed = _declared_for(path, declared)
            for top in sorted(_imports(ast.parse(path.read_text(), str(path)))):
                if top in sys.stdlib_module_names or top in own or top == "__future__":
                    continue
                dists = {_normalise(d) for d in providers.get(top, [top])}
                if not dists & allowed:
                    missing.append(f"{path.relative_to(ROOT)}: {top} "
                                   f"(from {', '.join(sorted(dists))})")
    return missing


def test_every_import_is_declared() -> None:
    missing = undeclared_imports()
    assert not missing, ("imports of distributions pyproject.toml does not declare "
                         "(a fresh venv lacks them):\n  " + "\n  ".join(missing))


def test_the_check_catches_an_undeclared_import(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The scanner itself: a file importing a distribution nobody declared is reported."""
    fake = tmp_path / "proj"
    (fake / "tests").mkdir(parents=True)
    (fake / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["torch>=2"]\n'
        '[project.optional-dependencies]\ntest = ["pytest"]\n')
    (fake / "tests" / "test_a.py").write_text(
        "import json\nimport torch\nimport pytest\nimport not_declared_anywhere.sub\n"
        "from . import local\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    assert undeclared_imports() == [
        "tests/test_a.py: not_declared_anywhere (from not-declared-anywhere)"]
