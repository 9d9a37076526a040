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
    "data.subset": 300, "data.validation": 200, "data.test_subset": 200,
    "mlsgd.cycles": 1, "mlsgd.epochs": 0.34, "mlsgd.sgd_epochs": 0.34,
    "mlsgd.bn_recalibration": 100, "mlsgd.full_batch_size": 300, "mlsgd.batch_size": 100,
    "mlsgd.uncorrected_cycles": 0, "mlsgd.threads": 1,
}


def _structure(path: Path) -> str:
    """What validate looks at: data shape, levels and transfers (not the training settings)."""
    h = mlsgd_dsl.load(path).model_dump(mode="json")
    return json.dumps({k: h[k] for k in ("data", "levels", "edges", "transfer")}, sort_keys=True)


FILES = sorted(HIERARCHIES.rglob("*.toml"))
# Variants of one experiment share their hierarchy: validating it once per structure keeps the
# suite fast while every file is still loaded (all keys checked) below.
BY_STRUCTURE: dict[str, list[Path]] = {}
for _path in FILES:
    BY_STRUCTURE.setdefault(_structure(_path), []).append(_path)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_thesis_file_has_a_comment_and_loads(path: Path) -> None:
    assert path.read_text().startswith("#"), "say which table it reproduces at the top"
    mlsgd_dsl.load(path)


@pytest.mark.parametrize("paths", list(BY_STRUCTURE.values()), ids=lambda ps: ps[0].stem)
def test_every_hierarchy_structure_validates(paths: list[Path]) -> None:
    report = mlsgd_dsl.validate(mlsgd_dsl.compile(mlsgd_dsl.load(paths[0])))
    assert report.ok, report.table()


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("path", TWINS, ids=lambda p: p.stem)
def test_fashion_mnist_twin_runs_one_short_cycle(path: Path, tmp_path: Path) -> None:
    # 4 channels per stage: the file's structure, transfers and settings as shipped, at a
    # fraction of the shipped widths' cost (the test is about the file, not the network)
    stages = len(mlsgd_dsl.load(path).model["channels"])
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(path, overrides={
        **TINY, "model.channels": [4] * stages}))
    summary = mlsgd_dsl.run(compiled, out_dir=tmp_path / "run", quiet=True)
    assert 0.0 <= summary["val_acc"] <= 1.0
    assert summary["test_acc"] is not None
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(saved["time_to"]) == {f"{t:.2f}" for t in compiled.hierarchy.report.thresholds}
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") >= 2
