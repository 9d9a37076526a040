"""Cycle kinds beyond V/W/F: the one-way cascade and full multigrid (``mlsgd.cycle``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _runner_nets import compiled, trainer

from mlsgd_dsl.errors import ConfigError
from mlsgd_dsl.runner.cycle import cycle, is_pass, run_cycle, shape, visit_order
from mlsgd_dsl.runner.records import read_rows

PASS = {"coarse": 1.0, "mid": 0.5, "fine": 0.25}
SMALL = {"mlsgd.eval.every": "cycle", "mlsgd.batch_size": 24}  # 4 batches per epoch


def epoch_levels(rows) -> list[tuple[str, float]]:
    return [(r["level"], r["visit_epoch"]) for r in rows if r["train_loss"] is not None]


@pytest.mark.parametrize("kind, cycles", [
    ("cascade", ["c m f", "f", "f"]),
    ("fmg", ["c m f", "c m f", "c m f"]),
    ("V", ["c m f"] * 3),
])
def test_visit_orders_by_cycle(kind, cycles) -> None:
    for k, expected in enumerate(cycles):
        assert visit_order(["c", "m", "f"], kind, k) == expected.split()
    assert [is_pass(kind, k) for k in range(3)] == [kind != "V", False, False]


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown cycle kind"):
        shape("X", 0)
    with pytest.raises(ValueError, match="unknown cycle kind"):
        run_cycle(None, ["f"], "cascade-typo", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown cycle shape"):
        cycle(None, ["f"], "cascade")  # type: ignore[arg-type]


def test_cascade_pass_then_the_finest_alone(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.cycle": "cascade", "mlsgd.cycles": 3,
                           "mlsgd.cascade_epochs": PASS, "mlsgd.epochs": 0.5, **SMALL})
    # the schedule's horizon is the planned run: the pass, then two half-epoch finest visits
    assert t.total_epochs == pytest.approx(1.0 + 0.5 + 0.25 + 2 * 0.5)
    summary = t.fit()
    visits = epoch_levels(read_rows(tmp_path))
    assert visits == [("coarse", 1.0), ("mid", 0.5), ("fine", 0.25), ("fine", 0.5),
                      ("fine", 0.5)]
    assert summary["cycles"] == 3 and summary["cycle_kind"] == "cascade"
    assert summary["global_epochs"] == pytest.approx(t.total_epochs)


def test_fmg_pass_then_v_cycles(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.cycle": "fmg", "mlsgd.cycles": 2,
                           "mlsgd.cascade_epochs": PASS, "mlsgd.epochs": 0.5, **SMALL})
    assert t.total_epochs == pytest.approx(1.75 + 3 * 0.5)
    t.fit()
    visits = epoch_levels(read_rows(tmp_path))
    assert visits == [("coarse", 1.0), ("mid", 0.5), ("fine", 0.25),
                      ("coarse", 0.5), ("mid", 0.5), ("fine", 0.5)]


def test_cascade_is_nested_iteration(tmp_path: Path) -> None:
    """With nested initialisation (and R∘P = I) each level of the pass starts from P of the
    trained coarser level: progressive growth, not a correction added to a fresh network."""
    t = trainer(tmp_path, {"mlsgd.cycle": "cascade", "mlsgd.cycles": 1, **SMALL},
                double=True)
    starts: dict[str, dict[str, torch.Tensor]] = {}
    smooth = t.driver.smooth

    def recording(level: str) -> None:
        starts[level] = {k: v.clone() for k, v in t.levels[level].model.state_dict().items()}
        smooth(level)
        if level != "fine":
            trained[level] = {k: v.clone()
                              for k, v in t.levels[level].model.state_dict().items()}

    trained: dict[str, dict[str, torch.Tensor]] = {}
    t.driver.smooth = recording
    t.fit()
    for coarse, fine in (("coarse", "mid"), ("mid", "fine")):
        expected = t.c.transfer(coarse, fine).prolongate(trained[coarse])
        for name, value in starts[fine].items():
            torch.testing.assert_close(value, expected[name].to(value.dtype),
                                       rtol=1e-10, atol=1e-12, msg=name)


def test_cascade_moves_the_optimizer_state_by_default(tmp_path: Path) -> None:
    c = compiled({"mlsgd.cycle": "cascade"})
    assert c.hierarchy.mlsgd.optimizer_state == "transfer"
    assert compiled({"mlsgd.cycle": "fmg"}).hierarchy.mlsgd.optimizer_state == "reset"
    explicit = compiled({"mlsgd.cycle": "cascade", "mlsgd.optimizer_state": "reset"})
    assert explicit.hierarchy.mlsgd.optimizer_state == "reset"
    # the finest level's momentum survives from one visit to the next
    t = trainer(tmp_path, {"mlsgd.cycle": "cascade", "mlsgd.cycles": 2,
                           "mlsgd.optimizer": {"momentum": 0.9}, **SMALL})
    made: list[str] = []
    fine = t.levels["fine"]
    original = fine.new_optimizer

    def counted():
        made.append("fine")
        return original()

    fine.new_optimizer = counted
    t.fit()
    assert made == ["fine"]  # once, when the pass prolongated the momentum into it


def test_cascade_epochs_outside_a_cascade_are_flagged(tmp_path: Path, capsys) -> None:
    from _runner_nets import hierarchy_text

    import mlsgd_dsl
    from mlsgd_dsl.cli import main

    with pytest.raises(ConfigError, match="lacks level"):
        compiled({"mlsgd.cycle": "cascade", "mlsgd.cascade_epochs": {"coarse": 2.0}})
    # legal (a sweep over the cycle kind keeps one file), but validate says it is unused
    report = mlsgd_dsl.validate(compiled({"mlsgd.cascade_epochs": 2.0}))
    rows = [r for r in report.rows if r.name == "cycle kind"]
    assert [r.status for r in rows] == ["warn"] and "unused" in rows[0].detail
    assert not [r for r in mlsgd_dsl.validate(compiled({"mlsgd.cycle": "fmg",
                                                         "mlsgd.cascade_epochs": 2.0})).rows
                if r.name == "cycle kind"]
    f = tmp_path / "h.toml"
    f.write_text(hierarchy_text().replace("[mlsgd]\n", "[mlsgd]\ncascade_epochs = 2\n"))
    assert main(["validate", str(f)]) == 0
    assert "cascade_epochs is set but cycle = 'V'" in capsys.readouterr().out


def test_plan_and_cycle_kind_errors_name_the_key(tmp_path: Path, capsys) -> None:
    from _runner_nets import hierarchy_text

    from mlsgd_dsl.cli import main

    f = tmp_path / "h.toml"
    f.write_text(hierarchy_text().replace("[mlsgd]\n", '[mlsgd]\ncycle = "cascad"\n'))
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "h.toml" in err and "mlsgd.cycle" in err and "Traceback" not in err
    f.write_text(hierarchy_text().replace("[mlsgd]\n", '[mlsgd]\nplan = "auto"\n'))
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "h.toml" in err and "needs time_budget" in err
