"""The MLSGD trainer on tiny hierarchies: cycles, safeguards, schedules, optimiser state,
BatchNorm, run folder, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _runner_nets import ResMLP, compiled, trainer

from mlsgd_dsl.errors import RunError
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.runner import bn
from mlsgd_dsl.runner.checkpoint import load_checkpoint
from mlsgd_dsl.runner.cycle import visit_order
from mlsgd_dsl.runner.records import COLUMNS, read_rows
from mlsgd_dsl.runner.run import Trainer, run
from mlsgd_dsl.runner.schedule import Schedule
from mlsgd_dsl.schema import ScheduleSpec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FAST = {"mlsgd.eval.every": "cycle"}


def epoch_rows(rows):
    return [r for r in rows if r["train_loss"] is not None]


# --------------------------------------------------------------------------- cycles


@pytest.mark.parametrize("kind, three, four", [
    ("V", "c m f", "c0 c1 c2 f"),
    ("W", "c m c m f", "c0 c1 c0 c1 c2 c0 c1 c0 c1 c2 f"),
    ("F", "c m c m f", "c0 c1 c0 c1 c2 c0 c1 c2 f"),
])
def test_visit_orders(kind, three, four) -> None:
    assert visit_order(["c", "m", "f"], kind) == three.split()
    assert visit_order(["c0", "c1", "c2", "f"], kind) == four.split()
    assert visit_order(["c", "f"], kind) == ["c", "f"]
    assert visit_order(["f"], kind) == ["f"]


@pytest.mark.parametrize("kind", ["V", "W", "F"])
def test_cycle_trains_levels_in_visit_order(tmp_path: Path, kind) -> None:
    t = trainer(tmp_path, {"mlsgd.cycle": kind, "mlsgd.cycles": 1, "mlsgd.epochs": 0.5,
                           "mlsgd.batch_size": 24})
    t.fit()
    rows = read_rows(tmp_path)
    levels = [r["level"] for r in epoch_rows(rows)]
    short = [{"coarse": "c", "mid": "m", "fine": "f"}[x] for x in levels]
    assert short == visit_order(["c", "m", "f"], kind)
    # half an epoch = half the batches (4 per epoch here)
    assert all(r["visit_epoch"] == 0.5 for r in epoch_rows(rows))
    assert rows[-1]["global_epoch"] == pytest.approx(0.5 * len(short))


def test_v_cycle_end_to_end_run_folder_and_hooks(tmp_path: Path) -> None:
    from _runner_nets import hierarchy_text

    import mlsgd_dsl
    from mlsgd_dsl.registry import build_registry

    calls: dict[str, list] = {"start": [], "epoch": [], "cycle": [], "end": []}

    class Listener:
        @hookimpl
        def mlsgd_run_start(self, run):
            calls["start"].append(run)

        @hookimpl
        def mlsgd_epoch_end(self, run, record):
            calls["epoch"].append(dict(record))

        @hookimpl
        def mlsgd_cycle_end(self, run, cycle):
            calls["cycle"].append(cycle)

        @hookimpl
        def mlsgd_run_end(self, run, summary):
            calls["end"].append(summary)

    reg = build_registry(autoload=False)
    reg.manager.register(Listener())
    h = mlsgd_dsl.loads(hierarchy_text(batchnorm=True), file="tiny.toml", registry=reg,
                        overrides={"mlsgd.cycles": 2, "report.plot": True})
    out = tmp_path / "run"
    summary = run(mlsgd_dsl.compile(h), out_dir=out, quiet=True)

    for name in ("resolved.toml", "resolved.json", "metrics.csv", "metrics.jsonl",
                 "checkpoint.pt", "summary.json", "summary.md", "accuracy.png"):
        assert (out / name).is_file(), name
    resolved = json.loads((out / "resolved.json").read_text())
    assert tomllib.loads((out / "resolved.toml").read_text())["name"] == resolved["name"]
    rows = read_rows(out)
    assert len(calls["start"]) == 1 and calls["cycle"] == [0, 1] and len(calls["end"]) == 1
    assert len(calls["epoch"]) == len(rows)
    assert set(rows[0]) >= set(COLUMNS)
    levels = [r["level"] for r in epoch_rows(rows)]
    assert levels == ["coarse", "mid", "fine"] * 2
    # coarse rows: their own train loss/acc, no validation (the finest is unchanged)
    for r in epoch_rows(rows):
        assert 0 <= r["train_acc"] <= 1 and math.isfinite(r["train_loss"])
        assert (r["val_acc"] is not None) == (r["level"] == "fine")
    # the finest is evaluated right after each prolongation (BatchNorm re-estimated first)
    assert [r["event"] for r in rows if r["event"]] == ["prolongated"] * 2
    assert all(r["val_acc"] is not None for r in rows if r["event"] == "prolongated")
    times = [r["train_time"] for r in rows]
    assert times == sorted(times) and all(r["wall_time"] >= r["train_time"] for r in rows)
    assert summary["cycles"] == 2 and summary["method"] == "mlsgd"
    for key in ("train_acc", "val_acc", "test_acc", "training_time", "run_dir"):
        assert key in summary
    assert json.loads((out / "summary.json").read_text())["cycles"] == 2
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["cycles_done"] == 2 and ck["rows"] == len(rows)
    assert ck["config_hash"] == summary["config_hash"]
    assert set(ck["finest"]) == set(t_names(out))


def t_names(out: Path) -> list[str]:
    return list(load_checkpoint(out / "checkpoint.pt")["finest"])


def test_sgd_baseline_trains_the_finest_only(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.method": "sgd", "mlsgd.sgd_epochs": 1.5,
                           "mlsgd.batch_size": 24,
                           "mlsgd.optimizer": {"momentum": 0.9}})
    assert list(t.levels) == ["fine"]
    opt_ids = []
    original = t.driver.smooth

    def spy(level):
        original(level)
        opt_ids.append(id(t.levels[level].optimizer))

    t.driver.smooth = spy
    summary = t.fit()
    rows = read_rows(tmp_path)
    assert {r["level"] for r in rows} == {"fine"}
    assert [r["visit_epoch"] for r in rows] == [1, 0.5]
    assert rows[-1]["global_epoch"] == pytest.approx(1.5)
    assert summary["cycles"] == 2 and summary["method"] == "sgd"
    assert len(set(opt_ids)) == 1  # one SGD run: momentum carries across checkpoints


def test_time_budget_stops_cleanly(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.cycles": 50, "mlsgd.time_budget": 1e-9})
    summary = t.fit()
    assert summary["stopped"] == "time budget"
    assert summary["cycles"] == 0
    assert (tmp_path / "summary.json").is_file()


# --------------------------------------------------------------------------- safeguards


def test_rejected_angle_step_leaves_the_iterate_unchanged(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.angle": {"mu": 1.0}, "mlsgd.cycles": 1, **FAST},
                double=True)
    w_fine = t.levels["fine"].detached_params()
    t.start()
    t.driver.begin_cycle(0)
    assert t.driver.descend("fine", "mid") and t.driver.descend("mid", "coarse")
    t.driver.smooth("coarse")
    assert all(torch.equal(a, b) for a, b in zip(t.levels["coarse"].params,
                                                 t.driver.state.anchor["coarse"]))
    t.driver.ascend("coarse", "mid")
    t.driver.smooth("mid")
    t.driver.ascend("mid", "fine")
    t.driver.smooth("fine")
    assert all(torch.equal(a, b) for a, b in zip(t.levels["fine"].params, w_fine))
    events = [r["event"] for r in read_rows(tmp_path) if r["event"]]
    assert events == ["rejected:angle"] * 3


def test_accepted_angle_steps_move(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.angle": {"mu": -0.999999, "every": 2}, "mlsgd.cycles": 1,
                           **FAST})
    w_fine = t.levels["fine"].detached_params()
    t.fit()
    assert not all(torch.equal(a, b) for a, b in zip(t.levels["fine"].params, w_fine))
    assert not any(r["event"] == "rejected:angle" for r in read_rows(tmp_path))


@pytest.mark.parametrize("action", ["reject", "stop"])
def test_divergence_on_a_coarse_level(tmp_path: Path, action) -> None:
    t = trainer(tmp_path, {"mlsgd.lr": {"coarse": 1000.0, "mid": 0.1, "fine": 0.1},
                           "mlsgd.epochs": {"coarse": 2, "mid": 1, "fine": 1},
                           "mlsgd.batch_size": 16, "mlsgd.cycles": 1,
                           "mlsgd.divergence": {"action": action}, **FAST})
    t.start()
    t.driver.begin_cycle(0)
    assert t.driver.descend("fine", "mid") and t.driver.descend("mid", "coarse")
    t.driver.smooth("coarse")
    # the level's step is rejected: back at its restricted start point
    assert all(torch.equal(a, b) for a, b in zip(t.levels["coarse"].params,
                                                 t.driver.state.anchor["coarse"]))
    rows = read_rows(tmp_path)
    assert rows[-1]["event"] == "diverged" and rows[-1]["level"] == "coarse"
    if action == "stop":
        assert t.driver.stopped() and "diverged" in t.progress.stop_reason
    else:
        assert not t.driver.stopped()
        t.driver.ascend("coarse", "mid")  # nothing to prolongate
        assert all(torch.equal(a, b) for a, b in zip(t.levels["mid"].params,
                                                     t.driver.state.anchor["mid"]))


def test_divergence_stop_ends_the_run(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.lr": {"coarse": 1000.0, "mid": 0.1, "fine": 0.1},
                           "mlsgd.epochs": {"coarse": 2, "mid": 1, "fine": 1},
                           "mlsgd.batch_size": 16, "mlsgd.cycles": 3,
                           "mlsgd.divergence": {"action": "stop"}, **FAST})
    summary = t.fit()
    assert "diverged" in summary["stopped"]
    assert {r["level"] for r in epoch_rows(read_rows(tmp_path))} == {"coarse"}


def test_nan_on_the_finest_level_is_a_run_error(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.cycles": 3, "mlsgd.epochs": 0.5, **FAST})

    class Poison:
        @hookimpl
        def mlsgd_cycle_end(self, run, cycle):
            if cycle == 0:
                with torch.no_grad():
                    run.model.out.bias.fill_(float("nan"))

    t.c.registry.manager.register(Poison(), name="poison-test")
    try:
        with pytest.raises(RunError) as err:
            t.fit()
    finally:
        t.c.registry.manager.unregister(name="poison-test")
    message = str(err.value)
    assert "cycle 1" in message and "'fine'" in message and "epoch 1" in message
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["cycles_done"] == 1  # the last good checkpoint is kept
    assert all(torch.isfinite(v).all() for v in ck["finest"].values()
               if v.is_floating_point())


# --------------------------------------------------------------------------- schedules


def test_schedule_values() -> None:
    step = Schedule(ScheduleSpec(kind="step", factor=0.5, every=2), 10)
    assert [step.lr(1.0, e) for e in (0, 1.99, 2, 3.5, 4)] == [1, 1, 0.5, 0.5, 0.25]
    cos = Schedule(ScheduleSpec(kind="cosine", min_lr=0.1), 10)
    assert cos.lr(1.0, 0) == pytest.approx(1.0)
    assert cos.lr(1.0, 5) == pytest.approx(0.55)
    assert cos.lr(1.0, 10) == pytest.approx(0.1)
    assert cos.lr(1.0, 12) == pytest.approx(0.1)
    warm = Schedule(ScheduleSpec(kind="cosine", warmup=2), 10)
    assert warm.lr(1.0, 0, 0.5) == pytest.approx(0.25)
    assert warm.lr(1.0, 1) == pytest.approx(0.5)
    assert warm.lr(1.0, 6) == pytest.approx(0.5)
    const = Schedule(ScheduleSpec(kind="constant"), 10)
    assert const.lr(0.3, 7) == 0.3 and const.constant_within(0.3)
    one = Schedule(ScheduleSpec(kind="onecycle"), 10)  # warm-up: 30 % of the run
    assert one.lr(1.0, 0) == pytest.approx(1 / 25)
    assert one.lr(1.0, 1.5) == pytest.approx(1 / 25 + (1 - 1 / 25) * 0.5)
    assert one.lr(1.0, 3) == pytest.approx(1.0)
    assert one.lr(1.0, 10) == pytest.approx(0.0)
    assert not one.constant_within(1.0)


def test_step_schedule_counts_epochs_on_all_levels(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.schedule": {"kind": "step", "factor": 0.5, "every": 1},
                           "mlsgd.cycles": 2, "mlsgd.lr": 0.08, **FAST})
    t.fit()
    lrs = [r["lr"] for r in epoch_rows(read_rows(tmp_path))]
    assert lrs == pytest.approx([0.08 * 0.5 ** k for k in range(6)])


def test_cosine_horizon_is_the_planned_run(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.schedule": {"kind": "cosine"}, "mlsgd.cycle": "W",
                           "mlsgd.cycles": 2, "mlsgd.epochs": {"coarse": 1, "mid": 0.5,
                                                              "fine": 2}})
    assert t.total_epochs == pytest.approx(2 * (1 + 0.5 + 1 + 0.5 + 2))


# --------------------------------------------------------------------------- optimiser state


def _count_optimizers(t) -> list[str]:
    made = []
    for name, lv in t.levels.items():
        original = lv.new_optimizer

        def counted(_name=name, _orig=original):
            made.append(_name)
            return _orig()

        lv.new_optimizer = counted
    return made


@pytest.mark.parametrize("mode, per_cycle", [("reset", 3), ("keep", 0), ("transfer", 0)])
def test_optimizer_state_modes(tmp_path: Path, mode, per_cycle) -> None:
    t = trainer(tmp_path, {"mlsgd.optimizer_state": mode, "mlsgd.cycles": 2,
                           "mlsgd.optimizer": {"momentum": 0.9}, **FAST})
    made = _count_optimizers(t)
    t.fit()
    assert len(made) == 3 + per_cycle  # one per level, then a fresh one per visit with reset
    if mode != "reset":
        ck = load_checkpoint(tmp_path / "checkpoint.pt")
        assert set(ck["optimizers"]) == {"coarse", "mid", "fine"}


def test_optimizer_state_transfer_moves_the_first_moment(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.optimizer_state": "transfer", "mlsgd.cycles": 2,
                           "mlsgd.optimizer": {"momentum": 0.9}, **FAST})
    t.driver.begin_cycle(0)
    for fine, coarse in (("fine", "mid"), ("mid", "coarse")):
        t.driver.descend(fine, coarse)
    t.driver.smooth("coarse")
    t.driver.ascend("coarse", "mid")
    coarse, mid = t.levels["coarse"], t.levels["mid"]
    m_coarse = [coarse.optimizer.state[p]["momentum_buffer"] for p in coarse.params]
    up = t.c.transfer("coarse", "mid").prolongate(dict(zip(coarse.names, m_coarse)))
    for p, n in zip(mid.params, mid.names):
        assert torch.equal(mid.optimizer.state[p]["momentum_buffer"], up[n])
    t.driver.smooth("mid")
    t.driver.ascend("mid", "fine")
    t.driver.smooth("fine")
    t.driver.begin_cycle(1)
    t.driver.descend("fine", "mid")
    fine = t.levels["fine"]
    m_fine = [fine.optimizer.state[p]["momentum_buffer"] for p in fine.params]
    down = t.c.transfer("mid", "fine").restrict(dict(zip(fine.names, m_fine)))
    for p, n in zip(mid.params, mid.names):
        assert torch.equal(mid.optimizer.state[p]["momentum_buffer"], down[n])


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_levels_run(tmp_path: Path, name) -> None:
    t = trainer(tmp_path, {"mlsgd.optimizer": {"name": name}, "mlsgd.lr": 0.01,
                           "mlsgd.optimizer_state": "transfer", "mlsgd.cycles": 2, **FAST})
    t.fit()
    assert isinstance(t.levels["mid"].optimizer,
                      torch.optim.Adam if name == "adam" else torch.optim.AdamW)


# --------------------------------------------------------------------------- initialisation, BN


def test_nested_and_independent_initialisation(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.init": "nested"})
    layers = t.levels["fine"].model.layers
    assert all(torch.equal(layers[0].weight, layer.weight) for layer in layers)
    coarse = t.levels["coarse"].model
    assert torch.equal(coarse.layers[0].weight, layers[0].weight)
    assert torch.equal(coarse.inp.weight, t.levels["fine"].model.inp.weight)
    t2 = trainer(tmp_path / "b", {"mlsgd.init": "independent"})
    layers = t2.levels["fine"].model.layers
    assert not torch.equal(layers[0].weight, layers[1].weight)


def test_bn_recalibration_estimates_the_statistics() -> None:
    torch.manual_seed(0)
    model = ResMLP(1, 4, 3, 1.0, width=5, batchnorm=True)
    x = torch.randn(64, 1, 4, 4) * 3 + 1
    model.bn.running_mean.fill_(7.0)
    model.bn.running_var.fill_(0.01)
    model.eval()
    assert bn.recalibrate(model, x, images=64, batch_size=64,
                          generator=torch.Generator().manual_seed(0))
    assert not model.training  # mode restored
    assert model.bn.momentum == 0.1
    with torch.no_grad():
        z = model.inp(x.flatten(1))
    assert torch.allclose(model.bn.running_mean, z.mean(0), atol=1e-5)
    assert torch.allclose(model.bn.running_var, z.var(0), atol=1e-4)
    assert not bn.recalibrate(ResMLP(1, 4, 3, 1.0), x, images=64, batch_size=8)
    assert not bn.recalibrate(model, x, images=0, batch_size=8)


def test_bn_recalibrated_after_prolongation(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.cycles": 1, **FAST}, batchnorm=True)
    t.driver.begin_cycle(0)
    t.driver.descend("fine", "mid")
    t.driver.descend("mid", "coarse")
    t.driver.smooth("coarse")
    mid_bn = t.levels["mid"].model.bn
    before = mid_bn.running_mean.clone()
    calls = []
    original = bn.recalibrate

    def spy(*a, **k):
        calls.append(k["images"])
        return original(*a, **k)

    bn.recalibrate, saved = spy, bn.recalibrate
    try:
        t.driver.ascend("coarse", "mid")
    finally:
        bn.recalibrate = saved
    assert calls == [64]
    assert not torch.equal(before, mid_bn.running_mean)


# --------------------------------------------------------------------------- resume


def test_resume_continues_without_repeating_or_losing_a_cycle(tmp_path: Path) -> None:
    overrides = {"mlsgd.cycles": 2, "mlsgd.correction": {"strategy": "stochastic",
                                                         "fraction": 0.5},
                 "mlsgd.optimizer": {"momentum": 0.9}, "mlsgd.optimizer_state": "keep"}
    straight = trainer(tmp_path / "a", overrides, augment=True)
    straight.fit()

    class Interrupt:
        @hookimpl
        def mlsgd_cycle_end(self, run, cycle):
            raise KeyboardInterrupt

    broken = trainer(tmp_path / "b", overrides, augment=True)
    broken.c.registry.manager.register(Interrupt(), name="interrupt-test")
    try:
        with pytest.raises(RunError, match="resume"):
            broken.fit()
    finally:
        broken.c.registry.manager.unregister(name="interrupt-test")
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["cycles_done"] == 1

    with pytest.raises(RunError, match="changed"):
        Trainer(compiled({**overrides, "mlsgd.lr": 0.2}, augment=True), resume=tmp_path / "b",
                quiet=True, validate=False)
    resumed = Trainer(compiled(overrides, augment=True), resume=tmp_path / "b", quiet=True,
                      validate=False)
    summary = resumed.fit()
    assert summary["cycles"] == 2
    for a, b in zip(straight.levels["fine"].params, resumed.levels["fine"].params):
        assert torch.equal(a, b)
    rows_a, rows_b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    strip = [{k: r[k] for k in ("cycle", "level", "train_loss", "val_acc", "event")}
             for r in rows_a]
    assert strip == [{k: r[k] for k in ("cycle", "level", "train_loss", "val_acc", "event")}
                     for r in rows_b]
    forced = Trainer(compiled({**overrides, "mlsgd.cycles": 3}, augment=True),
                     resume=tmp_path / "b", quiet=True, validate=False, force=True)
    assert forced.fit()["cycles"] == 3


@pytest.mark.parametrize("every, fine_evals", [("epoch", 2 + 1), ("level", 1 + 1), ("cycle", 1)])
def test_evaluation_points(tmp_path: Path, every, fine_evals) -> None:
    """epoch: every finest epoch + after each prolongation; level: the end of each finest
    visit + after each prolongation; cycle: once per cycle (an event row)."""
    t = trainer(tmp_path, {"mlsgd.eval.every": every, "mlsgd.cycles": 1,
                           "mlsgd.epochs": {"coarse": 1, "mid": 1, "fine": 2}})
    t.fit()
    rows = read_rows(tmp_path)
    evaluated = [r for r in rows if r["val_acc"] is not None]
    assert all(r["level"] == "fine" for r in evaluated)
    assert len(evaluated) == fine_evals


def test_alternating_paths_through_a_level_graph(tmp_path: Path) -> None:
    from _runner_nets import hierarchy_text

    import mlsgd_dsl

    text = hierarchy_text((("fine", 1.0, 4), ("left", 2.0, 2), ("right", 2.0, 2),
                           ("coarse", 4.0, 1)))
    text += "\n".join([
        "[[edges]]", 'coarse = "coarse"', 'fine = "left"',
        "[[edges]]", 'coarse = "coarse"', 'fine = "right"',
        "[[edges]]", 'coarse = "left"', 'fine = "fine"',
        "[[edges]]", 'coarse = "right"', 'fine = "fine"', ""])
    h = mlsgd_dsl.loads(text, file="graph.toml", overrides={
        "mlsgd.path": [["coarse", "left", "fine"], ["coarse", "right", "fine"]],
        "mlsgd.cycles": 2, "mlsgd.epochs": 0.25, "mlsgd.angle": {"mu": -0.99},
        **FAST})
    t = Trainer(mlsgd_dsl.compile(h), out_dir=tmp_path, quiet=True, validate=False)
    assert set(t.levels) == {"coarse", "left", "right", "fine"}
    t.fit()
    levels = [(r["cycle"], r["level"]) for r in epoch_rows(read_rows(tmp_path))]
    assert levels == [(0, "coarse"), (0, "left"), (0, "fine"),
                      (1, "coarse"), (1, "right"), (1, "fine")]
