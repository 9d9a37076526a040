"""``torchrun --nproc-per-node 2 -m mlsgd_dsl run`` with gloo on the CPU equals one process
with the same global batch.

Why the comparisons hold and what their tolerances mean:

* Every rank draws the same batch permutations and augmentations (same seeded generator,
  augmentation applied to the global batch before slicing), DDP averages the slices'
  gradients, BatchNorm uses the global batch's statistics (``GlobalBatchNorm`` on CPUs), full
  gradients are summed chunk by chunk over the ranks. In exact arithmetic the two runs are
  the same computation; in floating point only the order of a few sums differs.
* float32, the quickstart (BatchNorm, TV normalisation, flip + crop augmentation on): at the
  quickstart's own lr 0.05 the first steps are so unstable that *one process* run with 1 and
  with 2 threads (also just a different summation order) already differs by ~1e-2 after one
  cycle; at lr 0.01 that threads-vs-threads difference is ~4e-8 (relative, all weights), and
  so is the torchrun-vs-one-process difference. The test uses lr 0.01 and checks each weight
  to ``rtol = 1e-5, atol = 1e-6`` (the atol is for the conv biases in front of a BatchNorm:
  their gradient is zero in exact arithmetic, their values are rounding noise).
* float64 (two cycles, with the correction paths: variance reduction / SVRG, full gradients
  split over the ranks, the angle condition on a sample, the time-budget agreement): the two
  runs agree to ~1e-16; checked to 1e-10. In float32 the rounding differences grow: variance
  reduction subtracts two nearly equal gradients (~1e-5 after one cycle), and even the
  uncorrected quickstart reaches ~1e-4 in its second cycle. In float64 the same runs stay at
  ~1e-16, so the drift comes from rounding, not from a different computation. That is why the
  correction paths and the second cycle are checked in float64.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mlsgd_dsl.runner.checkpoint import load_checkpoint
from mlsgd_dsl.runner.records import read_rows

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
QUICKSTART = ROOT / "hierarchies" / "quickstart.toml"
SHRINK = {"data.options.train": 400, "data.options.test": 100, "data.validation": 100,
          "mlsgd.cycles": 1, "mlsgd.lr": 0.01, "mlsgd.optimizer.momentum": 0.0,
          "mlsgd.threads": 1, "report.plot": False}

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo")


def _torchrun(args: list[str], cwd: Path, timeout: float = 240.0) -> subprocess.CompletedProcess:
    launcher = shutil.which("torchrun")
    cmd = [launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _sets(overrides: dict[str, Any]) -> list[str]:
    out = []
    for key, value in overrides.items():
        text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        out += ["--set", f"{key}={text}"]
    return out


def _assert_weights_close(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(a[name], b[name]), name


def _epoch_keys(rows: list[dict]) -> list[tuple]:
    return [(r["cycle"], r["level"], r["visit_epoch"], r["event"]) for r in rows]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(run_cli, tmp_path: Path) -> None:
    single, multi = tmp_path / "single", tmp_path / "ddp"
    common = ["run", str(QUICKSTART), *_sets(SHRINK), "--quiet", "--no-validate"]
    rc, _, err = run_cli([*common, "--out", single])
    assert rc == 0, err

    proc = _torchrun(["-m", "mlsgd_dsl", *common, "--out", str(multi)], cwd=tmp_path)
    assert proc.stdout.count("run folder:") == 1  # rank 0 reports, the other is silent

    ck = load_checkpoint(multi / "checkpoint.pt")
    assert ck["world_size"] == 2 and ck["cycles_done"] == 1
    _assert_weights_close(load_checkpoint(single / "checkpoint.pt")["finest"], ck["finest"],
                          rtol=1e-5, atol=1e-6)
    # one writer: every row once, the same rows as one process, same numbers to rounding
    rows, expected = read_rows(multi), read_rows(single)
    assert _epoch_keys(rows) == _epoch_keys(expected)
    for a, b in zip(rows, expected):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            if b[key] is None:
                assert a[key] is None
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for name in ("summary.json", "summary.md", "metrics.csv", "resolved.toml"):
        assert (multi / name).is_file(), name
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["test_acc"] == pytest.approx(
        json.loads((single / "summary.json").read_text())["test_acc"], abs=1e-9)


# --------------------------------------------------------------------------- float64

# 200 images in batches of 51 (slices of 25 and 26: the loss weights matter), gradient passes in
# chunks of 80 (rank 0 takes two, rank 1 one)
CORRECTED = {**SHRINK, "data.options.train": 300, "mlsgd.batch_size": 51, "mlsgd.cycles": 2,
             "mlsgd.full_batch_size": 80,
             "mlsgd.time_budget": 3600.0,
             "mlsgd.correction": {"strategy": "deterministic", "variance_reduction": True},
             "mlsgd.angle": {"mu": -0.9, "gradient": "stochastic", "fraction": 0.5,
                             "every": 2}}

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_distributed import train_float64
train_float64(sys.argv[1])
"""


def train_float64(out_dir: str) -> None:
    """The quickstart with corrections, in float64 (run here and under torchrun)."""
    import mlsgd_dsl
    from mlsgd_dsl.runner.run import Trainer

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        h = mlsgd_dsl.loads(QUICKSTART.read_text(), file="quickstart.toml",
                            overrides=CORRECTED)
        compiled = mlsgd_dsl.compile(h)
        data = compiled.data("cpu")  # cached: the trainer gets these float64 copies
        for name, d in list(data.items()):
            data[name] = dataclasses.replace(d, train_x=d.train_x.double(),
                                             val_x=d.val_x.double(),
                                             test_x=d.test_x.double())
        Trainer(compiled, out_dir=out_dir, quiet=True, validate=False).fit()
    finally:
        torch.set_default_dtype(before)


@pytest.mark.slow
def test_corrections_under_torchrun_equal_one_process_in_float64(tmp_path: Path) -> None:
    single, multi = tmp_path / "single", tmp_path / "ddp"
    train_float64(str(single))
    script = tmp_path / "train64.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    _torchrun([str(script), str(multi)], cwd=tmp_path)

    a = load_checkpoint(single / "checkpoint.pt")["finest"]
    b = load_checkpoint(multi / "checkpoint.pt")["finest"]
    assert a["fc.weight"].dtype == torch.float64
    _assert_weights_close(a, b, rtol=1e-10, atol=1e-12)
    assert _epoch_keys(read_rows(multi)) == _epoch_keys(read_rows(single))


# --------------------------------------------------------------------------- helpers


def test_shards_cover_the_batch_once() -> None:
    from mlsgd_dsl.runner.distributed import shard_slice

    for n in (1, 7, 100, 101):
        for world in (1, 2, 3, 8):
            parts = [shard_slice(n, r, world) for r in range(world)]
            covered = [i for p in parts for i in range(n)[p]]
            assert covered == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_one_process_is_not_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from mlsgd_dsl.runner import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup(torch.device("cpu")) is False
    assert distributed.world_size() == 1 and distributed.is_main()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert distributed.wrap(model, torch.device("cpu")) is model
    assert distributed.prepare_model(model, torch.device("cpu")) is model
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.all_reduce_floats([1.5, torch.tensor(2)]) == [1.5, 2.0]


def test_global_batchnorm_is_batchnorm_in_one_process() -> None:
    """The converted layer shares its tensors and, without a process group (or inside
    ``local_batchnorm``), is plain BatchNorm."""
    from torch import nn

    from mlsgd_dsl.runner.distributed import GlobalBatchNorm, local_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    weight = model[1].weight
    converted = GlobalBatchNorm.convert(model)
    assert isinstance(converted[1], GlobalBatchNorm) and converted[1].weight is weight
    assert list(dict(converted.state_dict())) == list(dict(model.state_dict()))
    reference = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    reference.load_state_dict(converted.state_dict())
    x = torch.randn(5, 2, 4, 4)
    with local_batchnorm(converted):
        assert converted[1].synchronise is False
        assert torch.equal(converted(x), reference(x))
    assert converted[1].synchronise is True
    assert torch.equal(converted[1].running_mean, reference[1].running_mean)
