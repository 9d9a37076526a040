"""Every shipped thesis file validates; every Fashion-MNIST twin trains one short cycle on the
real Fashion-MNIST (installed by .ci/run from the Debian package dataset-fashion-mnist)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mlsgd_dsl

ROOT = Path(__file__).resolve().parents[1]
HIERARCHIES = ROOT / "hierarchies"
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
TWINS = sorted((HIERARCHIES / "fashion-mnist").glob("*.toml")) + sorted(
    HIERARCHIES.glob("resolution-fashion-mnist*.toml"))

# A subset small enough for CI: a few hundred real images, one cycle of fractional epochs.
TINY = {
    "data.subset": 400, "data.validation": 200, "data.test_subset": 200,
    "mlsgd.cycles": 1, "mlsgd.epochs": 0.5, "mlsgd.sgd_epochs": 0.5,
    "mlsgd.bn_recalibration": 100, "mlsgd.full_batch_size": 400, "mlsgd.batch_size": 100,
    "mlsgd.uncorrected_cycles": 0, "mlsgd.threads": 1,
}


@pytest.mark.parametrize("path", sorted(HIERARCHIES.rglob("*.toml")), ids=lambda p: p.stem)
def test_every_thesis_file_has_a_comment_and_validates(path: Path) -> None:
    assert path.read_text().startswith("#"), "say which table it reproduces at the top"
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(path))
    report = mlsgd_dsl.validate(compiled)
    assert report.ok, report.table()


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("path", TWINS, ids=lambda p: p.stem)
def test_fashion_mnist_twin_runs_one_short_cycle(path: Path, tmp_path: Path) -> None:
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(path, overrides=TINY))
    summary = mlsgd_dsl.run(compiled, out_dir=tmp_path / "run", quiet=True)
    assert 0.0 <= summary["val_acc"] <= 1.0
    assert summary["test_acc"] is not None
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(saved["time_to"]) == {f"{t:.2f}" for t in compiled.hierarchy.report.thresholds}
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") >= 2
