"""Runs you can trust (issue 16): the run folder rules, forks, portable resume.

Every refusal is one line on stderr, exit code 2, and leaves every earlier run's files exactly
as they were. The property test at the end crosses folder states (absent, empty, partial, a run
of this hierarchy, of another network, with changed settings, corrupted, a user's folder, a
file) with ``--out`` / ``--resume`` / ``--force`` / ``--overwrite``.

The runs are tiny (the ``_runner_nets`` residual MLP on 8×8 synthetic images, one cycle), so
each costs well under a second in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from _runner_nets import hierarchy_text

from mlsgd_dsl.runner import rundir

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
FAST = ["--quiet", "--no-validate", "--set", "mlsgd.cycles=1"]


def cli(*args: object) -> tuple[int, str, str]:
    """``mlsgd_dsl.cli.main`` in-process: (exit code, stdout, stderr)."""
    from mlsgd_dsl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlsgd-dsl: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` → hash of its bytes (folders as markers)."""
    if not folder.exists():
        return {"<absent>": ""}
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """This hierarchy, the same network with another learning rate, another network."""
    folder = tmp_path_factory.mktemp("hierarchies")
    this = folder / "tiny.toml"
    this.write_text(hierarchy_text(), encoding="utf-8")
    changed = folder / "tiny-lr.toml"
    changed.write_text(hierarchy_text().replace("lr = 0.1", "lr = 0.05"), encoding="utf-8")
    other = folder / "other.toml"
    other.write_text(hierarchy_text(width=8), encoding="utf-8")
    return {"this": this, "changed": changed, "other": other}


@pytest.fixture(scope="module")
def made_runs(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]
              ) -> dict[str, Path]:
    """A finished one-cycle run of ``tiny.toml`` and one of ``other.toml`` (copied per test)."""
    base = tmp_path_factory.mktemp("made")
    out = {}
    for key in ("this", "other"):
        rc, _, err = cli("run", files[key], "--out", base / key, *FAST)
        assert rc == 0, err
        out[key] = base / key
    return out


# --------------------------------------------------------------------------- finding 1


def test_out_holding_a_run_is_refused_and_left_as_it_was(files, made_runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(made_runs["this"], run)
    before = snapshot(run)
    rc, _, err = cli("run", files["this"], "--out", run, *FAST)
    one_line_error(rc, err, f"{run}: already holds a run", f"--resume {run}", "--overwrite")
    assert snapshot(run) == before
    rc, out, err = cli("run", files["other"], "--out", run, "--overwrite", *FAST)
    assert rc == 0, err
    assert snapshot(run) != before and '"width": 8' in (run / "resolved.json").read_text()


@pytest.mark.parametrize("where", ["user-folder", "current-directory"])
def test_a_folder_that_holds_no_run_is_never_written(files, tmp_path, monkeypatch,
                                                     where: str) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    target = folder
    if where == "current-directory":  # `--out .` in a project
        monkeypatch.chdir(folder)
        target = Path(".")
    for extra in ([], ["--overwrite"]):
        rc, _, err = cli("run", files["this"], "--out", target, *FAST, *extra)
        one_line_error(rc, err, "is not empty and holds no run (notes.txt)")
    assert snapshot(folder) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}


# --------------------------------------------------------------------------- finding 2


def test_default_folders_are_claimed_atomically(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = rundir.default_base("tiny")
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(rundir.create_unique(base)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_dir() for p in got)
    assert sorted(p.name for p in got)[0] == base.name


@pytest.mark.slow
def test_two_runs_started_together_without_out_both_survive(files, tmp_path) -> None:
    """Two real processes, same hierarchy, same second: each ends in its own folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH",
                                                                                  "")])}
    cmd = [sys.executable, "-m", "mlsgd_dsl", "run", str(files["this"]), *FAST]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0 and "Traceback" not in err, err
    folders = [out.split("run folder: ")[1].splitlines()[0] for out, _ in results]
    assert len(set(folders)) == 2, folders
    for folder in folders:
        assert folder.startswith("runs/tiny-")
        assert (tmp_path / folder / "summary.json").is_file()
        assert (tmp_path / folder / "metrics.jsonl").read_text().count("\n") >= 3


# --------------------------------------------------------------------------- finding 5


def test_out_naming_a_file(files, tmp_path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("x")
    one_line_error(*cli("run", files["this"], "--out", target, *FAST)[::2],
                   "is a file, not a folder")
    one_line_error(*cli("run", files["this"], "--out", target / "run", *FAST)[::2],
                   "is a file")
    assert target.read_text() == "x" and list(tmp_path.iterdir()) == [target]


def test_resume_into_another_folder_forks_and_leaves_the_original(files, made_runs,
                                                                  tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(made_runs["this"], a)
    before = snapshot(a)
    rc, out, err = cli("run", files["this"], "--resume", a, "--out", b, *FAST,
                       "--set", "mlsgd.cycles=2", "--force")
    assert rc == 0, err
    assert f"run folder: {b}" in out
    assert snapshot(a) == before
    from mlsgd_dsl.runner.checkpoint import load_checkpoint
    from mlsgd_dsl.runner.records import read_rows

    assert load_checkpoint(b / "checkpoint.pt")["cycles_done"] == 2
    assert {r["cycle"] for r in read_rows(b)} == {0, 1}  # A's rows, then the new cycle


def test_a_refused_fork_leaves_nothing_behind(files, made_runs, tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(made_runs["this"], a)
    rc, _, err = cli("run", files["this"], "--resume", a, "--out", b, *FAST,
                     "--set", "mlsgd.cycles=2")
    one_line_error(rc, err, "the hierarchy changed since this checkpoint")
    assert not b.exists()


@pytest.mark.parametrize("force", [False, True])
def test_resuming_another_hierarchys_network_is_one_line(files, made_runs, tmp_path,
                                                         force: bool) -> None:
    run = tmp_path / "run"
    shutil.copytree(made_runs["this"], run)
    before = snapshot(run)
    rc, _, err = cli("run", files["other"], "--resume", run, *FAST,
                     *(["--force"] if force else []))
    line = one_line_error(rc, err, "holds a different network", "never a different network")
    assert "--force to continue" not in line  # forcing cannot help: not offered
    assert snapshot(run) == before


# --------------------------------------------------------------------------- finding 3


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copy(TESTS / "_runner_nets.py", root / "projnets.py")
    text = hierarchy_text().replace('factory = "_runner_nets:ResMLP"',
                                    'factory = "projnets:ResMLP"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith("search_path"))
    (root / "h.toml").write_text(text + "\n", encoding="utf-8")
    return root / "h.toml"


def test_a_moved_project_resumes(tmp_path, monkeypatch) -> None:
    import mlsgd_dsl

    first = _project(tmp_path / "first")
    rc, _, err = cli("run", first, "--out", tmp_path / "first" / "runs" / "r", *FAST)
    assert rc == 0, err
    hash_before = mlsgd_dsl.compile(mlsgd_dsl.load(first)).config_hash()
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "first", moved)
    monkeypatch.chdir(tmp_path)  # another current directory too
    try:
        compiled = mlsgd_dsl.compile(mlsgd_dsl.load(moved / "h.toml"))
        assert compiled.config_hash() == hash_before
        assert str(moved) in compiled.resolved()["levels"]["fine"]["model"]["search_path"][0]
        # the finished run, resumed from its new place: accepted (same hash), nothing to do
        rc, out, err = cli("run", moved / "h.toml", "--resume", moved / "runs" / "r", *FAST)
        assert rc == 0 and "final validation accuracy" in out, err
        # an edited factory module is a different configuration
        source = moved / "projnets.py"
        source.write_text(source.read_text() + "\n# edited\n")
        edited = mlsgd_dsl.compile(mlsgd_dsl.load(moved / "h.toml")).config_hash()
        assert edited != hash_before
    finally:
        sys.modules.pop("projnets", None)


# --------------------------------------------------------------------------- property test

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

STATES = ["absent", "empty", "partial", "this", "other", "corrupted", "corrupted-both", "user",
          "file"]


def _make_state(state: str, path: Path, made: dict[str, Path], files: dict[str, Path]) -> None:
    if state == "absent":
        return
    if state == "file":
        path.write_text("a file")
        return
    if state in ("this", "other", "corrupted", "corrupted-both", "partial"):
        shutil.copytree(made["other" if state == "other" else "this"], path)
        if state == "partial":  # killed before its first checkpoint
            for name in ("checkpoint.pt", "checkpoint.prev.pt", "summary.json", "summary.md"):
                (path / name).unlink(missing_ok=True)
        if state.startswith("corrupted"):
            (path / "checkpoint.pt").write_bytes(b"\0garbage")
            if state == "corrupted-both":
                (path / "checkpoint.prev.pt").write_bytes(b"\0garbage")
        return
    path.mkdir()
    if state == "user":
        (path / "data.csv").write_text("1,2\n")


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    return {
        "hierarchy": draw(st.sampled_from(["this", "changed"])),
        "first": draw(st.sampled_from(STATES)),
        "second": draw(st.sampled_from(["absent", "empty", "this", "user", "file"])),
        "mode": draw(st.sampled_from(["out", "resume", "resume-out"])),
        "force": draw(st.booleans()),
        "overwrite": draw(st.booleans()),
    }


@contextlib.contextmanager
def _scratch(root: Path) -> Iterator[Path]:
    folder = root / f"case{next(_COUNTER)}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_COUNTER = iter(range(10**9))


@settings(max_examples=int(os.environ.get("RUN_FOLDER_EXAMPLES", "30")), derandomize=True,
          database=None, deadline=timedelta(seconds=60),
          suppress_health_check=[HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(case=scenarios())
def test_folder_states_never_give_a_traceback_or_lose_a_run(case: dict, files, made_runs,
                                                            tmp_path) -> None:
    with _scratch(tmp_path) as scratch:
        first, second = scratch / "A", scratch / "B"
        _make_state(case["first"], first, made_runs, files)
        _make_state(case["second"], second, made_runs, files)
        before = {"A": snapshot(first), "B": snapshot(second)}
        args: list[object] = ["run", files[case["hierarchy"]], *FAST]
        if case["mode"] == "out":
            args += ["--out", first]
        elif case["mode"] == "resume":
            args += ["--resume", first]
        else:
            args += ["--resume", first, "--out", second]
        if case["force"]:
            args.append("--force")
        if case["overwrite"]:
            args.append("--overwrite")
        rc, out, err = cli(*args)

        assert "Traceback" not in err, (case, err)
        assert rc in (0, 2), (case, rc, err)
        if rc == 2:
            assert err.strip().splitlines()[-1].startswith("mlsgd-dsl: error: "), (case, err)
            assert len(err.strip().splitlines()) <= 2, (case, err)  # + a fallback warning

        # which folder this command was allowed to change
        written = {"out": "A", "resume": "A", "resume-out": "B"}[case["mode"]]
        for key, path in (("A", first), ("B", second)):
            if key == written and (rc == 0 or case["mode"] == "resume"):
                continue  # the run folder itself (resumed in place: asked for)
            assert snapshot(path) == before[key], (case, key, err)

        runs_here = {"this", "other", "corrupted", "corrupted-both", "partial"}
        target_state = case["first"] if case["mode"] == "out" else case["second"]
        if case["mode"] in ("out", "resume-out"):
            if target_state in ("user", "file"):
                assert rc == 2, case
            if target_state in runs_here and not case["overwrite"]:
                assert rc == 2, case
        target_free = case["mode"] == "resume" or case["second"] in ("absent", "empty") or (
            case["second"] == "this" and case["overwrite"])
        if case["mode"] != "out" and target_free and not (
                case["mode"] == "resume" and case["overwrite"]):
            if case["first"] in ("absent", "empty", "user", "file", "partial", "other",
                                 "corrupted-both"):
                assert rc == 2, case  # nothing (valid) to resume
            if case["first"] == "other":
                assert "different network" in err, (case, err)
