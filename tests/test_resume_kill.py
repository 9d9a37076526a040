"""Crash safety end to end: a real ``mlsgd-dsl run`` killed with SIGKILL resumes with
``--resume`` from its last checkpoint; plus the refusals and fall-backs around it, and event
hooks that raise.

The reference run and the resumed runs go through the CLI in-process (``run_cli``, same code
path as the console script, no interpreter start-up); the run that is killed is a real
subprocess. All of them use one thread, so the resumed run reproduces the uninterrupted one
bit for bit: the checkpoint holds the finest weights, the optimiser states, the Python/torch
RNG states and the runner's batch generator, and every coarse level is rebuilt from the
finest at the start of the next cycle (restriction), so nothing else carries state across a
cycle boundary.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _runner_nets import hierarchy_text

from mlsgd_dsl.runner.checkpoint import load_checkpoint
from mlsgd_dsl.runner.records import read_rows

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "hierarchies" / "quickstart.toml"
CYCLES = 5
# the quickstart, shrunk: 600 training images (6 batches per level and epoch), one thread
SHRINK = ["--set", "data.options.train=600", "--set", "data.options.test=100",
          "--set", "data.validation=100", "--set", f"mlsgd.cycles={CYCLES}",
          "--set", "mlsgd.threads=1", "--set", "report.plot=false", "--quiet",
          "--no-validate"]


def _key(row: dict) -> tuple:
    return (row["cycle"], row["level"], row["visit_epoch"], row["event"])


def _finest(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["finest"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cycles_done(run_dir: Path) -> int:
    try:  # the file is replaced atomically: an open handle always reads a complete copy
        return int(load_checkpoint(run_dir / "checkpoint.pt")["cycles_done"])
    except Exception:
        return -1


@pytest.fixture(scope="module")
def hierarchy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("files") / "quick.toml"
    path.write_text(QUICKSTART.read_text(encoding="utf-8"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, hierarchy: Path) -> Path:
    """The uninterrupted run."""
    from mlsgd_dsl.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", str(hierarchy), "--out", str(out), *SHRINK]) == 0
    return out


def _start_and_kill(hierarchy: Path, out: Path, timeout: float = 120.0) -> int:
    """Start a real run, SIGKILL it right after its first checkpoint of a completed cycle;
    return the number of cycles that checkpoint holds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlsgd_dsl", "run", str(hierarchy),
                             "--out", str(out), *SHRINK],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while _cycles_done(out) < 1:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before its first cycle (exit {proc.returncode}): "
                            f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after a cycle within the time limit")
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return _cycles_done(out)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory, hierarchy: Path) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("killed") / "run"
    done = _start_and_kill(hierarchy, out)
    assert 1 <= done < CYCLES
    return out, done


@pytest.mark.slow
def test_sigkilled_run_resumes_every_cycle_exactly_once(run_cli, hierarchy: Path,
                                                        reference: Path, killed, tmp_path):
    run_dir, done = killed
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)  # the other tests resume their own copies
    ck = load_checkpoint(work / "checkpoint.pt")
    assert {"config_hash", "seed", "data_seed", "rng", "generator", "rows"} <= set(ck)

    rc, out, err = run_cli(["run", hierarchy, "--resume", work, *SHRINK])
    assert rc == 0, err
    assert "Traceback" not in err

    rows, expected = read_rows(work), read_rows(reference)
    keys = [_key(r) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate metric rows"
    assert keys == [_key(r) for r in expected]  # every (cycle, level, epoch) once, in order
    epochs = [(r["cycle"], r["level"]) for r in rows if r["train_loss"] is not None]
    assert epochs == [(k, lv) for k in range(CYCLES) for lv in ("coarse", "mid", "fine")]
    # the CSV copy agrees with the JSON lines (header + one line per row)
    assert len((work / "metrics.csv").read_text().splitlines()) == len(rows) + 1
    # deterministic: the same numbers as the run that was never interrupted
    for a, b in zip(rows, expected):
        assert (a["train_loss"], a["val_acc"], a["global_epoch"]) == \
            (b["train_loss"], b["val_acc"], b["global_epoch"])
    assert _same_weights(_finest(work), _finest(reference))
    assert load_checkpoint(work / "checkpoint.pt")["cycles_done"] == CYCLES
    summary = (work / "summary.json").read_text()
    assert f'"cycles": {CYCLES}' in summary


@pytest.mark.slow
def test_resume_refuses_a_changed_hierarchy_unless_forced(run_cli, hierarchy: Path, killed,
                                                          tmp_path):
    run_dir, done = killed
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    changed = tmp_path / "changed.toml"
    changed.write_text(hierarchy.read_text().replace("lr = 0.01", "lr = 0.02"))
    before = (work / "checkpoint.pt").read_bytes()

    rc, out, err = run_cli(["run", changed, "--resume", work, *SHRINK])
    assert rc == 2
    assert "hierarchy changed since this checkpoint" in err and "--force" in err
    assert "Traceback" not in err
    assert (work / "checkpoint.pt").read_bytes() == before  # nothing touched

    rc, out, err = run_cli(["run", changed, "--resume", work, "--force", *SHRINK])
    assert rc == 0, err
    rows = read_rows(work)
    keys = [_key(r) for r in rows]
    assert len(keys) == len(set(keys))
    assert load_checkpoint(work / "checkpoint.pt")["cycles_done"] == CYCLES


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_to_the_previous_one(run_cli, hierarchy: Path,
                                                           reference: Path, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(reference, work)
    assert load_checkpoint(work / "checkpoint.prev.pt")["cycles_done"] == CYCLES - 1
    (work / "checkpoint.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")

    rc, out, err = run_cli(["run", hierarchy, "--resume", work, *SHRINK])
    assert rc == 0, err
    assert "checkpoint is corrupt" in err and "resuming from checkpoint.prev.pt" in err
    assert (work / "checkpoint.pt.corrupt").is_file()  # set aside, not rotated into .prev
    # the last cycle ran again from the previous checkpoint: the same result, no duplicates
    assert [_key(r) for r in read_rows(work)] == [_key(r) for r in read_rows(reference)]
    assert _same_weights(_finest(work), _finest(reference))


def test_both_checkpoints_unreadable_is_a_clear_error(run_cli, hierarchy: Path, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes(b"garbage")
    (work / "checkpoint.prev.pt").write_bytes(b"more garbage")
    rc, out, err = run_cli(["run", hierarchy, "--resume", work, *SHRINK])
    assert rc == 2 and "Traceback" not in err
    assert "neither checkpoint.pt nor checkpoint.prev.pt can be loaded" in err
    rc, out, err = run_cli(["run", hierarchy, "--resume", tmp_path / "absent", *SHRINK])
    assert rc == 2 and "not a run folder" in err


# --------------------------------------------------------------------------- event hooks

FAILING_PLUGIN = """
from mlsgd_dsl.hookspecs import hookimpl

@hookimpl
def {hook}({args}):
    raise ValueError("boom in {hook}")
"""

HOOK_ARGS = {"mlsgd_run_start": "run", "mlsgd_epoch_end": "run, record",
             "mlsgd_cycle_end": "run, cycle", "mlsgd_run_end": "run, summary"}


@pytest.mark.parametrize("hook", list(HOOK_ARGS))
def test_a_raising_event_hook_ends_the_run_with_a_plugin_message(run_cli, install_plugin,
                                                                 tmp_hierarchy, tmp_path,
                                                                 hook):
    install_plugin(FAILING_PLUGIN.format(hook=hook, args=HOOK_ARGS[hook]), ep="noisy",
                   dist="noisy-logger", version="1.2")
    file = tmp_hierarchy(hierarchy_text())
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["run", file, "--out", out, "--quiet", "--no-validate",
                               "--set", "mlsgd.cycles=2"])
    assert rc == 2
    assert "Traceback" not in err
    assert f"plugin noisy (noisy-logger 1.2): hook {hook} raised ValueError: boom in {hook}" \
        in err
    if hook in ("mlsgd_epoch_end", "mlsgd_cycle_end"):
        assert "--resume" in err
    if hook == "mlsgd_cycle_end":
        # the checkpoint of the cycle was written before the hook: resume without the plugin
        assert load_checkpoint(out / "checkpoint.pt")["cycles_done"] == 1
        rc, stdout, err = run_cli(["-p", "no:noisy", "run", file, "--resume", out, "--quiet",
                                   "--no-validate", "--set", "mlsgd.cycles=2"])
        assert rc == 0, err
        assert load_checkpoint(out / "checkpoint.pt")["cycles_done"] == 2
