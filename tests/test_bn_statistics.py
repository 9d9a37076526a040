"""What a run reports and hands over carries BatchNorm statistics that match its weights.

After a short visit at a high step the running averages lag the weights: the reproduction below
(the synthetic quickstart network trained as the SGD baseline for three epochs at a constant
step 0.05, momentum 0.9) scores 0.20 on the validation split with them and 0.36 with statistics
re-estimated on training images. The runner re-estimates before every evaluation
(``mlsgd.eval.recalibrate``); training uses batch statistics, so the weights are the same
either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mlsgd_dsl
from mlsgd_dsl.runner import bn
from mlsgd_dsl.runner.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "hierarchies" / "quickstart.toml"

COLLAPSE = {
    "data.options": {"train": 1000, "test": 200, "size": 16, "channels": 1, "seed": 0},
    "data.validation": 500, "mlsgd.method": "sgd", "mlsgd.sgd_epochs": 3.0, "mlsgd.lr": 0.05,
    "mlsgd.batch_size": 50, "mlsgd.schedule": {"kind": "constant"}, "report.plot": False,
    "mlsgd.threads": 1,
}


def _run(tmp_path: Path, name: str, **overrides: Any) -> tuple[dict, list[dict], dict]:
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(QUICKSTART, overrides={**COLLAPSE,
                                                                       **overrides}))
    out = tmp_path / name
    summary = mlsgd_dsl.run(compiled, out_dir=out, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, load_checkpoint(out / "checkpoint.pt", map_location="cpu")


def _score(state: dict, *, images: int = 0) -> float:
    """Validation accuracy of the finest network with ``state``; ``images`` > 0 re-estimates
    the statistics first (all on its own, with another seed than the runner's)."""
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(QUICKSTART, overrides=COLLAPSE))
    model = compiled.model(compiled.finest)
    model.load_state_dict(state)
    data = compiled.data("cpu")[compiled.finest]
    if images:
        bn.recalibrate(model, data.train_x, images=images, batch_size=100,
                       generator=torch.Generator().manual_seed(12345))
    model.eval()
    with torch.no_grad():
        return float((model(data.val_x).argmax(1) == data.val_y).float().mean())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bn")
    running = _run(tmp, "running", **{"mlsgd.eval.recalibrate": 0})
    fresh = _run(tmp, "fresh", **{"mlsgd.eval.compare_running": True})
    return {"running": running, "fresh": fresh}


def test_the_collapse_is_reproduced_and_the_report_is_the_re_estimated_one(
        two_runs: dict[str, Any]) -> None:
    (s_run, _, ck_run), (s_fresh, rows, ck_fresh) = two_runs["running"], two_runs["fresh"]
    # the same weights: the estimate changes only buffers, training uses batch statistics
    params = [n for n in ck_run["finest"] if not n.endswith(("running_mean", "running_var",
                                                             "num_batches_tracked"))]
    for name in params:
        assert torch.equal(ck_run["finest"][name], ck_fresh["finest"][name]), name
    # with the running statistics the weights look far worse than they are
    independent = _score(ck_run["finest"], images=2000)
    assert s_run["val_acc"] == pytest.approx(_score(ck_run["finest"]), abs=1e-6)
    assert independent - s_run["val_acc"] > 0.08
    # the run reports (and checkpoints) the re-estimated network: within one point of an
    # independent re-estimation of the same weights, and exactly what its checkpoint scores
    assert abs(s_fresh["val_acc"] - independent) <= 0.01
    assert s_fresh["val_acc"] == pytest.approx(_score(ck_fresh["finest"]), abs=1e-6)
    # every evaluation row: the running-statistics value is what the other run reported
    evaluated = [r for r in rows if r["val_acc"] is not None]
    assert evaluated and all(r["val_acc_running"] is not None for r in evaluated)
    assert max(r["val_acc"] - r["val_acc_running"] for r in evaluated) > 0.08
    # the cost is reported, and is not training time
    assert s_fresh["bn_estimates"] >= len(evaluated) and s_fresh["bn_time"] > 0
    assert s_fresh["bn_images"] == 2000 and s_run["bn_estimates"] == 0


def test_mlsgd_checkpoints_carry_re_estimated_statistics(tmp_path: Path) -> None:
    overrides = {"mlsgd.method": "mlsgd", "mlsgd.cycles": 1,
                 "mlsgd.epochs": {"fine": 0.5, "mid": 0.5, "coarse": 0.5}}
    summary, _, ck = _run(tmp_path, "mlsgd", **overrides)
    assert summary["bn_estimates"] >= 1
    assert summary["val_acc"] == pytest.approx(_score(ck["finest"]), abs=1e-6)


def test_switched_off_with_batchnorm_is_said(tmp_path: Path, run_cli: Any,
                                             tmp_hierarchy: Any) -> None:
    text = QUICKSTART.read_text().replace("[report]", "[mlsgd.eval]\nrecalibrate = 0\n\n[report]")
    path = tmp_path / "off.toml"
    path.write_text(text)
    code, out, _ = run_cli(["validate", path])
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("batchnorm statistics"))
    assert "warn" in line and "recalibrate = 0" in line
    code, out, _ = run_cli(["validate", QUICKSTART])
    assert "re-estimated on 2,000 training images" in out
