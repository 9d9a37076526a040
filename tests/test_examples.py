"""Every script in examples/ runs on tiny settings, and examples/own_model trains through the CLI.

The scripts run as a user runs them (a fresh interpreter, one torch thread); each takes
``--tiny`` and ``--out DIR``. A new script in examples/ is picked up automatically; list the
artefacts it must leave in ``ARTEFACTS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
OWN_MODEL = EXAMPLES / "own_model" / "hierarchy.toml"

# what each script must leave under --out (beyond exiting 0)
# what each script must print
PRINTS = {
    "custom_rule.py": ["example.depth-pairs: 5 checks passed", "wrong P*",
                       "P of example.depth-pairs == P of depth.constant"],
    "python_api.py": ["28 passed, 0 warnings, 0 failed", "val acc"],
}
ARTEFACTS = {
    "python_api.py": ["summary.json", "metrics.jsonl", "checkpoint.pt"],
    "custom_rule.py": ["summary.json", "metrics.jsonl"],
    "plot_runs.py": ["plot_runs.png", "mlsgd/summary.json", "sgd/summary.json"],
}
RUN_FOLDER = ["resolved.toml", "resolved.json", "metrics.csv", "metrics.jsonl", "summary.json",
              "summary.md", "checkpoint.pt", "accuracy.png"]
TINY_SET = ["data.options.train=300", "data.options.test=100", "data.validation=100",
            "mlsgd.cycles=1", "mlsgd.batch_size=50"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _run(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _cli(args: list[object], cwd: Path) -> subprocess.CompletedProcess:
    return _run(["-m", "mlsgd_dsl", *map(str, args)], cwd)


def test_examples_exist() -> None:
    assert SCRIPTS, "examples/ holds no scripts"
    assert set(ARTEFACTS) <= {s.name for s in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_script_runs_tiny(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # cwd is a scratch folder: a script must not depend on being started from the project
    proc = _run([str(script), "--tiny", "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script.name} printed nothing"
    assert out.is_dir() and any(out.iterdir()), f"{script.name} left nothing in --out"
    for text in PRINTS.get(script.name, []):
        assert text in proc.stdout, f"{script.name} did not print {text!r}:\n{proc.stdout}"
    for name in ARTEFACTS.get(script.name, []):
        assert (out / name).is_file(), f"{script.name}: no {name} in {sorted(out.rglob('*'))}"
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def fresh_nets() -> object:
    """The in-process CLI imports examples/own_model/nets.py as ``nets``: forget it after."""
    sys.modules.pop("nets", None)
    yield
    sys.modules.pop("nets", None)


def test_own_model_validates(run_cli, fresh_nets, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the file's folder: the import family adds it itself
    rc, out, err = run_cli(["validate", OWN_MODEL])
    assert rc == 0, out + err
    assert "0 failed" in out
    assert "layers.* [depth.constant]: adjoint" in out
    assert "families ['import']" in out


def test_own_model_trains_through_the_cli(tmp_path: Path) -> None:

    run_dir = tmp_path / "run"
    sets = [a for s in TINY_SET for a in ("--set", s)]
    proc = _cli(["run", OWN_MODEL, *sets, "--out", run_dir, "--quiet"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"run folder: {run_dir}" in proc.stdout
    for name in RUN_FOLDER:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["cycles"] == 1 and summary["finest_level"] == "fine"
    assert 0.0 <= summary["val_acc"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["level"] for r in rows} == {"coarse", "mid", "fine"}
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("cycle,level,visit_epoch,epoch,global_epoch,lr,train_loss")
    resolved = json.loads((run_dir / "resolved.json").read_text())
    assert resolved["levels"]["coarse"]["model"]["factory"] == "nets:make"
    assert resolved["levels"]["coarse"]["model"]["kwargs"] == {"width": 12, "layers": 1}


@pytest.mark.parametrize(("override", "message"), [
    ("model.factory=mynets:make",
     "levels.fine.model.factory: cannot import 'mynets': No module named 'mynets'"),
    ("model.factory=nets:build",
     "levels.fine.model.factory: 'nets:build': 'nets' has no attribute 'build'"),
    ("model.factory=nets.make",
     "levels.fine.model.factory: must look like \"package.module:callable\", got 'nets.make'"),
    ("model.factory=nets:ResidualCNN",
     "levels.fine.model.factory: 'nets:ResidualCNN' is not marked as a model factory; "
     "decorate it with @mlsgd_dsl.model_factory"),
    ("levels.coarse.model.kwargs.layers=0",
     "levels.coarse.model.factory: 'nets:make' raised ValueError: layers must be at least 1"),
    ("levels.mid.model.kwargs.layers=3",
     "'layers.#.weight' has 3 layers on level 'mid' and 4 on 'fine'; factor 2 needs 6"),
], ids=["no-module", "no-attribute", "not-a-path", "not-marked", "factory-raises",
         "depth-mismatch"])
def test_own_model_mistakes_read_as_documented(override: str, message: str, run_cli,
                                               fresh_nets) -> None:
    """The messages docs/own-model.md shows: one line on stderr, exit code 2."""
    rc, out, err = run_cli(["validate", OWN_MODEL, "--set", override])
    assert rc == 2, out + err
    assert message in err
    assert "Traceback" not in err
    assert message in (ROOT / "docs" / "own-model.md").read_text(encoding="utf-8")
