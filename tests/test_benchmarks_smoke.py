"""Every benchmark script runs end to end on its tiny ``--smoke`` configuration.

Each script runs as a user would start it (``python benchmarks/NAME.py --smoke``), single
threaded (``OMP_NUM_THREADS=1``), all at once, each writing its RESULTS section to a
temporary file; the tests check the exit codes and the sections. The full benchmarks are
not tests (see benchmarks/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# "script [arguments]" -> the prefix of the RESULTS sections it writes
SCRIPTS = {
    "time_to_accuracy": "time_to_accuracy/",
    "time_to_accuracy --beyond": "time_to_accuracy/beyond-",
    "overhead": "overhead/",
    "transfer_cost": "transfer_cost/",
    "correction_overhead": "correction_overhead/",
    "memory": "memory/",
    "level_speed --variants channels_last": "level_speed/",
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """All smoke runs started at once (single-threaded each, so two cores run two at a
    time); each test then waits for its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    runs = {}
    for run in SCRIPTS:
        script, *extra = run.split()
        tmp = tmp_path_factory.mktemp(script)
        results = tmp / "RESULTS.md"
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / f"{script}.py"), *extra, "--smoke", "--results",
             str(results), "--workdir", str(tmp / "work")],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[run] = (proc, results)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_smoke(script: str, smoke_runs: dict[str, tuple]) -> None:
    proc, results = smoke_runs[script]
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    text = results.read_text(encoding="utf-8")
    assert f"<!-- BEGIN {SCRIPTS[script]}" in text
    assert "(smoke)" in text
    assert "- command: `" in text and "--smoke" in text
    begins = [line for line in text.splitlines() if line.startswith("<!-- BEGIN ")]
    assert len(begins) == len(set(begins))  # one section per key


def test_results_sections_are_replaced(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCH))
    path = tmp_path / "R.md"
    _common.write_section(path, "a/x", "A", "first-body")
    _common.write_section(path, "b", "B", "second-body")
    _common.write_section(path, "a/x", "A", "third-body")
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert text.count("<!-- BEGIN a/x -->") == 1
    assert "third-body" in text and "first-body" not in text and "second-body" in text
    assert text.index("<!-- BEGIN a/x -->") < text.index("<!-- BEGIN b -->")
