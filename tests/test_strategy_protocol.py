"""A third-party correction strategy written against the declared protocol alone
(:class:`~mlsgd_dsl.runner.corrections.CorrectionHost`, the strategy methods of
:class:`~mlsgd_dsl.runner.corrections.Correction`) can do what the built-in ``delayed`` does —
measure the restricted finest gradient and the last cycle's angle, switch a correction on,
write event rows — and carries its state across a SIGKILL and ``--resume`` through the
checkpoint: the resumed run repeats the uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlsgd_dsl.runner.checkpoint import load_checkpoint
from mlsgd_dsl.runner.records import read_rows

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "hierarchies" / "quickstart.toml"
CYCLES = 4

# Every host access goes through `Strict`, which refuses any name CorrectionHost does not
# declare: the strategy (and the built-in inner correction it delegates to) use the protocol
# and nothing else.
STRATEGY = '''
import math

import torch
from pydantic import BaseModel, ConfigDict

from mlsgd_dsl.api import CorrectionStrategy
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.runner.corrections import CorrectionHost, DeterministicCorrection

MLSGD_DSL_API = ">=1.1"
DECLARED = {n for n in vars(CorrectionHost) if not n.startswith("_")}


class Strict:
    def __init__(self, host):
        object.__setattr__(self, "_host", host)

    def __getattr__(self, name):
        if name not in DECLARED:
            raise AttributeError(f"{name} is not part of CorrectionHost")
        return getattr(object.__getattribute__(self, "_host"), name)

    def __setattr__(self, name, value):
        raise AttributeError("a strategy does not write into the host")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float = 0.75


def norm(ts):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))


class LateCorrection:
    """Uncorrected until ||P* grad_L F_L||_{L-1} < fraction x its first value, then
    deterministic; measures the angle between each cycle's prolongated coarse step and
    -grad F_L at its start. The first value is state: a resumed run must get it back."""

    name = "thirdparty.late"
    variance_reduction = False
    batchnorm = "batch"

    def __init__(self, fraction):
        self.fraction = fraction
        self.inner = DeterministicCorrection()
        self.switched_at = None
        self.norms = []      # one per measuring cycle
        self.angles = []     # one per completed measuring cycle (None: no coarse step)
        self._start = None   # this cycle's start, for its angle at its end

    def on(self, cycle):
        return self.switched_at is not None and cycle >= self.switched_at

    def needs_fine_gradient(self, cycle):
        return self.on(cycle)

    def sample(self, host):
        return None

    def level_gradient(self, host, level, current):
        return self.inner.level_gradient(Strict(host), level, current)

    def prepare(self, host, level, target):
        host = Strict(host)
        if target is None and not self.on(host.cycle):
            self._measure(host)
        if not self.on(host.cycle):
            return None
        return self.inner.prepare(host, level, target)

    def _measure(self, host):
        finest, path = host.finest, list(host.path)
        fine, coarse = host.level(finest), host.level(path[-2])
        g = [t.detach().clone() for t in host.gradient(finest)]
        tr = host.transfer(path[-2], finest)
        with torch.no_grad():
            pstar = tr.adjoint(dict(zip(fine.names, [t / fine.h for t in g])))
        value = math.sqrt(coarse.h) * norm([pstar[n] for n in coarse.names])
        self.norms.append(value)
        self._start = (path[-2], coarse.version, [p.detach().clone() for p in fine.params], g)
        if value < self.fraction * self.norms[0]:
            self.switched_at = host.cycle
            self._start = None
            host.record(finest, f"late:on ({value:.4g})")
        else:
            host.record(finest, f"late:off ({value:.4g})")

    def end_cycle(self, host, cycle):
        host = Strict(host)
        if self._start is None:
            return
        name, version, w0, g0 = self._start
        self._start = None
        coarse, fine = host.level(name), host.level(host.finest)
        if coarse.version == version:
            self.angles.append(None)
            return
        tr = host.transfer(name, host.finest)
        with torch.no_grad():
            start = tr.restrict(dict(zip(fine.names, w0)))
            up = tr.prolongate({n: p.detach() - start[n]
                                for n, p in zip(coarse.names, coarse.params)})
            d = [up[n] for n in fine.names]
        dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(g0, d))
        self.angles.append(-dot / (norm(g0) * norm(d)))

    def state_dict(self):
        return {"switched_at": self.switched_at, "norms": list(self.norms),
                "angles": list(self.angles)}

    def load_state_dict(self, state):
        self.switched_at = state["switched_at"]
        self.norms = list(state["norms"])
        self.angles = list(state["angles"])

    def describe(self):
        angles = ", ".join("n/a" if a is None else f"{a:.6f}" for a in self.angles)
        return (f"late deterministic, on from cycle {self.switched_at}, "
                f"{len(self.norms)} measurements, angles [{angles}]")


@hookimpl
def mlsgd_corrections():
    return [CorrectionStrategy(name="thirdparty.late", options=Options,
                               create=lambda options: LateCorrection(options.fraction),
                               description="delayed, written against the protocol")]
'''


def _args(hierarchy: Path) -> list[str]:
    return [str(hierarchy), "--set", "data.options.train=300", "--set", "data.options.test=100",
            "--set", "data.validation=100", "--set", f"mlsgd.cycles={CYCLES}",
            "--set", "mlsgd.threads=1", "--set", "report.plot=false",
            "--set", 'mlsgd.correction={strategy = "thirdparty.late", fraction = 0.75}',
            "--quiet", "--no-validate"]


def _cycles_done(run_dir: Path) -> int:
    try:
        return int(load_checkpoint(run_dir / "checkpoint.pt")["cycles_done"])
    except Exception:
        return -1


def _kill_after_a_cycle(args: list[str], out: Path, pythonpath: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.Popen([sys.executable, "-m", "mlsgd_dsl", "run", *args, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _cycles_done(out) < 1:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before its first cycle: "
                            f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            assert time.monotonic() < deadline, "no checkpoint after a cycle in time"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return _cycles_done(out)


@pytest.mark.slow
def test_a_protocol_only_strategy_survives_sigkill_and_resume(run_cli, install_plugin,
                                                              tmp_path: Path) -> None:
    install_plugin(STRATEGY, ep="thirdparty", dist="thirdparty-late", version="1.0")
    hierarchy = tmp_path / "quick.toml"
    hierarchy.write_text(QUICKSTART.read_text(encoding="utf-8"), encoding="utf-8")

    reference = tmp_path / "reference"
    rc, _, err = run_cli(["run", *_args(hierarchy), "--out", reference])
    assert rc == 0, err
    events = [(r["cycle"], r["event"]) for r in read_rows(reference)
              if str(r["event"]).startswith("late:on")]
    assert len(events) == 1 and events[0][0] >= 1  # switched, after the first cycle
    assert len([r for r in read_rows(reference) if str(r["event"]).startswith("late:")]) == \
        events[0][0] + 1  # measured until it switched

    killed = tmp_path / "killed"
    pythonpath = os.pathsep.join([str(tmp_path / "site-packages"), *sys.path])
    done = _kill_after_a_cycle(_args(hierarchy), killed, pythonpath)
    assert 1 <= done < CYCLES
    state = load_checkpoint(killed / "checkpoint.pt")["strategy"]
    assert len(state["norms"]) == done and len(state["angles"]) >= done - 1

    rc, _, err = run_cli(["run", *_args(hierarchy), "--resume", killed])
    assert rc == 0, err
    keys = ("cycle", "level", "visit_epoch", "event", "train_loss", "val_acc", "global_epoch")
    strip = [[{k: r[k] for k in keys} for r in read_rows(d)] for d in (reference, killed)]
    assert strip[0] == strip[1]
    a, b = (load_checkpoint(d / "checkpoint.pt") for d in (reference, killed))
    assert a["strategy"] == b["strategy"] and a["strategy"]["switched_at"] == events[0][0]
    assert all(torch.equal(a["finest"][k], b["finest"][k]) for k in a["finest"])
    summaries = [(d / "summary.json").read_text() for d in (reference, killed)]
    assert '"correction": "late deterministic, on from cycle' in summaries[0]
    assert summaries[0].split('"correction"')[1].split("\n")[0] == \
        summaries[1].split('"correction"')[1].split("\n")[0]
