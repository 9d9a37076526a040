"""Shared fixtures: the plugin registry, hierarchy files written on the fly, the CLI in-process."""

from __future__ import annotations

import itertools
import re
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from mlsgd_dsl import registry as registry_module
from mlsgd_dsl.tomlio import dumps


@pytest.fixture(autouse=True)
def _restore_default_registry(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Plugin environment variables start unset; the process-wide registry, which the CLI
    replaces (maybe with blocked plugins), is restored after each test."""
    for name in (registry_module.BLOCK_ENV, registry_module.DISABLE_AUTOLOAD_ENV):
        monkeypatch.delenv(name, raising=False)
    saved = registry_module._default
    yield
    registry_module.set_default_registry(saved)


@pytest.fixture(autouse=True)
def _private_cost_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: Any) -> None:
    """The budget planner's cost cache in a folder of this test session, never the user's."""
    monkeypatch.setenv("MLSGD_DSL_CACHE", str(tmp_path_factory.getbasetemp() / "cost-cache"))


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """One intra-op thread: on small tensors it is faster, and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def registry() -> registry_module.Registry:
    """The process-wide registry (built-ins and entry points)."""
    return registry_module.default_registry()


# --------------------------------------------------------------------------- TOML files


@pytest.fixture
def tmp_hierarchy(tmp_path: Path) -> Callable[..., Path]:
    """``tmp_hierarchy(text | bytes | dict, name="h.toml") -> Path`` (dicts become TOML)."""

    def write(content: str | bytes | Mapping[str, Any], name: str = "h.toml") -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(textwrap.dedent(content), encoding="utf-8")
        else:
            path.write_text(dumps(content), encoding="utf-8")
        return path

    return write


# --------------------------------------------------------------------------- CLI & plugins


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``run_cli([...]) -> (exit code, stdout, stderr)``, ``mlsgd_dsl.cli.main`` in-process."""
    from mlsgd_dsl.cli import main

    def run(args: list[Any]) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --version, --help, usage errors
            rc = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return rc, out, err

    return run


_counter = itertools.count()


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """``install_plugin(source, ep="testplug") -> module name``: an installed distribution.

    Writes the module and a ``testplugin-0.1.dist-info`` (METADATA, entry_points.txt in group
    ``mlsgd_dsl``) into a folder on ``sys.path``, as ``pip install`` would. Each call makes a
    new module (``mlsgd_testplugin_N``); give each call its own ``ep`` and ``dist``.
    """
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def install(source: str, ep: str = "testplug", dist: str = "testplugin",
                version: str = "0.1") -> str:
        module = f"mlsgd_testplugin_{next(_counter)}"
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        info = site / f"{re.sub(r'[-_.]+', '_', dist)}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[mlsgd_dsl]\n{ep} = {module}\n",
                                               encoding="utf-8")
        (info / "top_level.txt").write_text(f"{module}\n", encoding="utf-8")
        modules.append(module)
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture(scope="session", autouse=True)
def _single_thread_torch() -> Any:
    """Every test runs torch on one intra-op thread: the tensors here are small, where threads
    cost more than they give, and results are reproducible bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
