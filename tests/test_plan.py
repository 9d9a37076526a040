"""The budget planner (``mlsgd.plan``): time budget → cycles, epochs, schedule horizon."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _runner_nets import compiled, trainer

from mlsgd_dsl.errors import ConfigError
from mlsgd_dsl.runner import plan as planner
from mlsgd_dsl.runner.plan import Plan, level_costs, make_plan
from mlsgd_dsl.runner.run import Trainer

TWO = {"coarse": 1.0, "fine": 4.0}


def test_v_cycles_fill_the_budget() -> None:
    # one V-cycle: 2 coarse epochs (1 s each) + 1 fine epoch (4 s) = 6 s
    p = make_plan(100.0, kind="V", paths=lambda k: ["coarse", "fine"], epoch_seconds=TWO,
                  epochs={"coarse": 2.0, "fine": 1.0}, pass_epochs={"coarse": 2.0, "fine": 1.0},
                  ascend_seconds={})
    # 16 cycles = 96 s, 17 = 102 s: 17 is closer; the epochs shrink by 100/102
    assert p.cycles == 17 and p.scale == pytest.approx(100 / 102)
    assert p.epochs == pytest.approx({"coarse": 2 * 100 / 102, "fine": 100 / 102})
    assert p.planned_seconds == pytest.approx(100.0)


def test_prolongation_overhead_does_not_scale_with_the_epochs() -> None:
    p = make_plan(100.0, kind="V", paths=lambda k: ["coarse", "fine"], epoch_seconds=TWO,
                  epochs={"coarse": 2.0, "fine": 1.0}, pass_epochs={"coarse": 2.0, "fine": 1.0},
                  ascend_seconds={"fine": 0.5, "coarse": 9.0})  # the coarsest: no ascent
    assert p.cycles == 15  # 15 × 6.5 = 97.5 s, 16 × 6.5 = 104 s
    assert p.planned_seconds == pytest.approx(100.0)
    assert p.scale == pytest.approx((100 - 15 * 0.5) / (15 * 6.0))


def test_cascade_plan_counts_the_pass_once() -> None:
    p = make_plan(60.0, kind="cascade", paths=lambda k: ["coarse", "fine"], epoch_seconds=TWO,
                  epochs={"coarse": 1.0, "fine": 1.0}, pass_epochs={"coarse": 10.0, "fine": 1.0},
                  ascend_seconds={})
    # pass: 10 × 1 + 4 = 14 s; then 4 s per finest visit: 12 cycles = 58 s, 13 = 62 s (the
    # closer one on a log scale)
    assert p.cycles == 13 and p.scale == pytest.approx(60 / 62)
    assert p.pass_epochs["coarse"] == pytest.approx(10 * 60 / 62)
    assert p.epochs["fine"] == pytest.approx(60 / 62)


def test_sgd_plan_is_budget_over_epoch_cost() -> None:
    p = make_plan(50.0, kind="V", paths=lambda k: ["fine"], epoch_seconds={"fine": 4.0},
                  epochs={"fine": 1.0}, pass_epochs={"fine": 1.0}, ascend_seconds={},
                  sgd_finest="fine")
    assert p.sgd_epochs == pytest.approx(12.5) and p.cycles == 13


def test_plan_needs_a_budget() -> None:
    with pytest.raises(ConfigError, match="needs time_budget"):
        compiled({"mlsgd.plan": "auto"})


# fake costs: seconds per batch, far above the real ones, so that the run ends well inside
# the budget and the plan, not the clock, decides where it stops
FAKE = {"coarse": 1.0, "mid": 2.0, "fine": 4.0}


@pytest.fixture
def fake_costs(monkeypatch, tmp_path):
    calls: list[str] = []

    def measure(level):
        calls.append(level.name)
        return FAKE[level.name]

    monkeypatch.setattr(planner, "measure_batch_seconds", measure)
    monkeypatch.setenv("MLSGD_DSL_CACHE", str(tmp_path / "cache"))
    return calls


def test_run_follows_the_plan_and_writes_it(tmp_path: Path, fake_costs) -> None:
    out = tmp_path / "run"
    t = trainer(out, {"mlsgd.plan": "auto", "mlsgd.time_budget": 50.0,
                      "mlsgd.schedule": {"kind": "cosine"}, "mlsgd.eval.every": "cycle"})
    # 3 batches per epoch: 3 + 6 + 12 = 21 s per V-cycle; 2 cycles (42 s) are closest to 50
    assert sorted(fake_costs) == ["coarse", "fine", "mid"]
    assert t.n_cycles == 2 and t.budget_plan.scale == pytest.approx(50 / 42)
    assert t.total_epochs == pytest.approx(2 * 3 * 50 / 42) == t.budget_plan.horizon
    assert t.levels["fine"].epochs == pytest.approx(50 / 42)
    summary = t.fit()
    assert summary["cycles"] == 2 and summary["stopped"] is None
    written = json.loads((out / "plan.json").read_text())
    assert written["cycles"] == 2 and written["sources"] == {n: "measured" for n in FAKE}
    cache = json.loads((tmp_path / "cache" / "costs.json").read_text())
    assert sorted(e["batch_seconds"] for e in cache.values()) == [1.0, 2.0, 4.0]

    # the cache answers the next plan; "measure" measures anew
    fake_costs.clear()
    again = trainer(tmp_path / "again", {"mlsgd.plan": "auto", "mlsgd.time_budget": 50.0})
    assert fake_costs == [] and set(again.budget_plan.sources.values()) == {"cache"}
    trainer(tmp_path / "fresh", {"mlsgd.plan": "measure", "mlsgd.time_budget": 50.0})
    assert sorted(fake_costs) == ["coarse", "fine", "mid"]

    # a resumed run keeps its checkpoint's plan, whatever the machine measures now
    fake_costs.clear()
    c = compiled({"mlsgd.plan": "measure", "mlsgd.time_budget": 50.0,
                  "mlsgd.schedule": {"kind": "cosine"}, "mlsgd.eval.every": "cycle"})
    resumed = Trainer(c, resume=out, out_dir=tmp_path / "fork", quiet=True, validate=False,
                      force=True)
    assert fake_costs == [] and resumed.n_cycles == 2
    assert resumed.budget_plan.as_dict() == Plan.from_dict(written).as_dict()


def test_sgd_method_plans_its_epochs(tmp_path: Path, fake_costs) -> None:
    t = trainer(tmp_path, {"mlsgd.method": "sgd", "mlsgd.plan": "auto",
                           "mlsgd.time_budget": 30.0})
    assert fake_costs == ["fine"]
    assert t.sgd_total == pytest.approx(30 / 12) and t.n_cycles == 3


def test_measuring_leaves_the_run_untouched(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLSGD_DSL_CACHE", str(tmp_path / "cache"))
    t = trainer(tmp_path / "run", batchnorm=True)
    before = {n: {k: v.clone() for k, v in lv.model.state_dict().items()}
              for n, lv in t.levels.items()}
    rng = torch.get_rng_state()
    costs, sources = level_costs(t.levels)
    assert set(costs) == set(t.levels) and all(
        math.isfinite(c.batch_seconds) and c.batch_seconds > 0 and c.once_seconds == 0
        for c in costs.values())
    assert set(sources.values()) == {"measured"}
    assert torch.equal(torch.get_rng_state(), rng)
    for n, lv in t.levels.items():
        for k, v in lv.model.state_dict().items():
            assert torch.equal(v, before[n][k]), (n, k)
        assert lv.optimizer is None
