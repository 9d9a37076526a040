"""Beyond the thesis (issue 9, docs/beyond.md): multilevel momentum / Adam and their optimiser
state across prolongation, the delayed correction's switching rule, hierarchies that are graphs
(path agreement, the runner following the chosen path), and every shipped file in
hierarchies/beyond/ validating and running one short cycle on a tiny real Fashion-MNIST subset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _runner_nets import hierarchy_text, trainer

import mlsgd_dsl
from mlsgd_dsl.errors import ConfigError, RunError
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.runner.corrections import LevelCorrection
from mlsgd_dsl.runner.cycle import visit_order
from mlsgd_dsl.runner.delayed import SWITCHED, WAITING, DelayedCorrection
from mlsgd_dsl.runner.level import Visit, train_visit
from mlsgd_dsl.runner.optim import get_first_moment
from mlsgd_dsl.runner.records import read_rows
from mlsgd_dsl.runner.run import Trainer

ROOT = Path(__file__).resolve().parents[1]
BEYOND = ROOT / "hierarchies" / "beyond"
SHIPPED = sorted(BEYOND.glob("*.toml"))
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FAST = {"mlsgd.eval.every": "cycle"}


def epoch_rows(rows):
    return [r for r in rows if r["train_loss"] is not None]


def events(rows, prefix=""):
    return [(r["cycle"], r["level"], r["event"]) for r in rows
            if r["train_loss"] is None and str(r["event"]).startswith(prefix)]


# =========================================================================== 1. optimisers

OPTIMIZERS = {
    "sgd": {"name": "sgd"},
    "momentum": {"name": "sgd", "momentum": 0.9},
    "nesterov": {"name": "sgd", "momentum": 0.9, "nesterov": True},
    "adam": {"name": "adam"},
    "adamw": {"name": "adamw", "weight_decay": 0.01},
}


def _reference_optimizer(params, spec: dict, lr: float) -> torch.optim.Optimizer:
    if spec["name"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.get("momentum", 0.0),
                               nesterov=spec.get("nesterov", False))
    cls = torch.optim.Adam if spec["name"] == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=spec.get("weight_decay", 0.0))


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_the_optimiser_sees_the_corrected_gradient(tmp_path: Path, opt) -> None:
    """The correction vector (and the l2 term) are in ``.grad`` when the level's optimiser
    steps, and the step is that optimiser's update of exactly that gradient."""
    spec = OPTIMIZERS[opt]
    t = trainer(tmp_path, {"mlsgd.optimizer": spec, "mlsgd.lr": 0.05}, double=True)
    lv = t.levels["mid"]
    start = lv.state_copy()
    gen = torch.Generator().manual_seed(1)
    vector = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in lv.params]

    def one_step(vec):
        lv.load_state(start)
        lv.new_optimizer()
        t.generator.manual_seed(7)  # the same batch both times
        seen = []
        step = lv.optimizer.step

        def spy(*a, **k):
            seen.append(([p.detach().clone() for p in lv.params],
                         [p.grad.detach().clone() for p in lv.params]))
            out = step(*a, **k)
            seen[-1] += ([p.detach().clone() for p in lv.params],)
            return out

        lv.optimizer.step = spy
        corr = LevelCorrection(target=None, vector=vec) if vec is not None else None
        train_visit(lv, Visit(epochs=1 / lv.batches_per_epoch, correction=corr), t.driver)
        assert len(seen) == 1
        return seen[0]

    before, g_plain, _ = one_step(None)
    before_c, g_corr, after_c = one_step(vector)
    for a, b in zip(before, before_c):
        assert torch.equal(a, b)
    for gp, gc, v in zip(g_plain, g_corr, vector):  # ∇H_l = ∇F_l + vector
        torch.testing.assert_close(gc - gp, v, rtol=0, atol=1e-12)
    ref = [b.clone().requires_grad_(True) for b in before_c]
    opt_ref = _reference_optimizer(ref, spec, 0.05)
    for r, g in zip(ref, g_corr):
        r.grad = g.clone()
    opt_ref.step()
    for r, a in zip(ref, after_c):
        torch.testing.assert_close(r.detach(), a, rtol=0, atol=1e-12)


def _state(opt: torch.optim.Optimizer | None, params) -> dict[str, list] | None:
    """Copies of an optimiser's per-parameter state: {key: [tensor per parameter]}."""
    if opt is None:
        return None
    keys = sorted({k for p in params for k in opt.state.get(p, {})})
    return {k: [torch.as_tensor(opt.state[p][k]).clone() if k in opt.state.get(p, {}) else None
                for p in params] for k in keys}


class Recorder:
    """Wraps a trainer's descend / ascend / smooth and records the optimiser state there."""

    def __init__(self, t: Trainer) -> None:
        self.t = t
        self.log: list[dict[str, Any]] = []
        for name in ("descend", "ascend", "smooth"):
            setattr(t.driver, name, self._wrap(name, getattr(t.driver, name)))

    def _snap(self, level: str) -> dict[str, Any]:
        lv = self.t.levels[level]
        m = get_first_moment(lv.optimizer, lv.params) if lv.optimizer is not None else None
        return {"opt": lv.optimizer, "state": _state(lv.optimizer, lv.params),
                "m": [x.clone() for x in m] if m is not None else None,
                "params": [p.detach().clone() for p in lv.params]}

    def _wrap(self, what: str, fn):
        def wrapped(*levels):
            pre = {lv: self._snap(lv) for lv in levels}
            entry = {"what": what, "cycle": self.t.driver.cycle, "levels": levels, "pre": pre}
            result = None
            if what == "smooth":
                entry.update(self._smooth(fn, levels[0]))
            else:
                result = fn(*levels)
            entry["post"] = {lv: self._snap(lv) for lv in levels}
            self.log.append(entry)
            return result

        return wrapped

    def _smooth(self, fn, level: str) -> dict[str, Any]:
        """smooth(level), with the optimiser state snapshotted as the visit starts (after
        smooth() has chosen the optimiser) and whether a new optimiser was made."""
        import mlsgd_dsl.runner.driver as driver_module

        lv = self.t.levels[level]
        seen: dict[str, Any] = {"new_optimizer": False}
        make, visit = lv.new_optimizer, driver_module.train_visit

        def new_optimizer():
            seen["new_optimizer"] = True
            return make()

        def train(level_, visit_, host):
            seen["start"] = self._snap(level)
            return visit(level_, visit_, host)

        lv.new_optimizer, driver_module.train_visit = new_optimizer, train
        try:
            fn(level)
        finally:
            lv.new_optimizer, driver_module.train_visit = make, visit
        return seen

    def visits(self, level: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e["what"] == "smooth" and e["levels"][0] == level]


def _close(a, b, atol=1e-12) -> bool:
    return all(torch.allclose(x, y, rtol=0, atol=atol) for x, y in zip(a, b))


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_transfer_moves_the_first_moment_with_p_and_r(tmp_path: Path, opt) -> None:
    """After each prolongation the fine level's first moment is P of the coarse level's
    (where the fine optimiser already has state: for Adam from its second visit on); after each
    restriction the coarse level's is R of the fine level's; the rest of the state (Adam's
    second moment, step count) stays the level's own."""
    t = trainer(tmp_path, {"mlsgd.optimizer_state": "transfer", "mlsgd.cycles": 3,
                           "mlsgd.optimizer": OPTIMIZERS[opt],
                           "mlsgd.lr": 0.05 if opt == "momentum" else 0.01, **FAST},
                double=True)
    rec = Recorder(t)
    t.fit()
    checked_up = checked_down = 0
    for e in rec.log:
        if e["what"] == "ascend":
            coarse, fine = e["levels"]
            m_c = e["post"][coarse]["m"]
            m_f = e["post"][fine]["m"]
            if m_c is None:
                continue
            if m_f is None:  # Adam: a fresh fine optimiser has no second moment to pair with
                assert opt == "adam" and e["pre"][fine]["state"] in (None, {})
                continue
            cl = t.levels[coarse]
            up = t.c.transfer(coarse, fine).prolongate(dict(zip(cl.names, m_c)))
            assert _close(m_f, [up[n] for n in t.levels[fine].names])
            if opt == "adam":  # the second moment is the fine level's own, untouched
                assert _close(e["post"][fine]["state"]["exp_avg_sq"],
                              e["pre"][fine]["state"]["exp_avg_sq"])
            checked_up += 1
        elif e["what"] == "descend":
            fine, coarse = e["levels"]
            m_f = e["post"][fine]["m"]
            m_c = e["post"][coarse]["m"]
            if m_f is None or m_c is None:
                continue
            fl = t.levels[fine]
            down = t.c.transfer(coarse, fine).restrict(dict(zip(fl.names, m_f)))
            assert _close(m_c, [down[n] for n in t.levels[coarse].names])
            checked_down += 1
    # every ascent and (after cycle 0) every descent carried the moment
    assert checked_up == (6 if opt == "momentum" else 4)
    assert checked_down == 4
    # what the fine level's visit starts from is that prolongated moment
    for e in rec.visits("fine")[1:]:
        ascent = [a for a in rec.log if a["what"] == "ascend" and a["cycle"] == e["cycle"]
                  and a["levels"][1] == "fine"][-1]
        assert _close(e["start"]["m"], ascent["post"]["fine"]["m"])


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_keep_continues_each_levels_own_state(tmp_path: Path, opt) -> None:
    t = trainer(tmp_path, {"mlsgd.optimizer_state": "keep", "mlsgd.cycles": 3,
                           "mlsgd.optimizer": OPTIMIZERS[opt], "mlsgd.lr": 0.01, **FAST})
    rec = Recorder(t)
    t.fit()
    for level in ("coarse", "mid", "fine"):
        visits = rec.visits(level)
        assert len(visits) == 3
        assert len({id(v["start"]["opt"]) for v in visits}) == 1  # one optimiser per level
        assert not visits[0]["start"]["state"]  # the first visit starts fresh
        for prev, nxt in zip(visits, visits[1:]):
            # neither restriction nor prolongation touches it: state at the start of a visit
            # = state at the end of the level's previous visit (moments, Adam's step count)
            a, b = prev["post"][level]["state"], nxt["start"]["state"]
            assert a.keys() == b.keys() and a
            for key in a:
                assert _close(a[key], b[key], atol=0)


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_reset_starts_every_visit_fresh(tmp_path: Path, opt) -> None:
    t = trainer(tmp_path, {"mlsgd.optimizer_state": "reset", "mlsgd.cycles": 2,
                           "mlsgd.optimizer": OPTIMIZERS[opt], "mlsgd.lr": 0.01, **FAST})
    rec = Recorder(t)
    t.fit()
    smooths = [e for e in rec.log if e["what"] == "smooth"]
    assert len(smooths) == 6
    for e in smooths:
        assert e["new_optimizer"] and not e["start"]["state"]
        assert e["post"][e["levels"][0]]["state"]  # and the visit did build some
    assert len({id(e["start"]["opt"]) for e in smooths}) == 6


def test_beyond_optimizer_files_resolve(tmp_path: Path) -> None:
    mom = mlsgd_dsl.load(BEYOND / "fmnist-depth-momentum.toml").mlsgd
    assert (mom.optimizer.name, mom.optimizer.momentum, mom.optimizer_state) == \
        ("sgd", 0.9, "transfer")
    adam = mlsgd_dsl.load(BEYOND / "fmnist-depth-adam.toml").mlsgd
    assert (adam.optimizer.name, adam.optimizer_state) == ("adam", "keep")
    base = mlsgd_dsl.load(ROOT / "hierarchies" / "fashion-mnist" / "depth.toml")
    assert mlsgd_dsl.load(BEYOND / "fmnist-depth-adam.toml").levels == base.levels


# =========================================================================== 2. delayed


def _delayed(tmp_path: Path, options: dict, cycles: int = 3, extra: dict | None = None,
             **kw) -> Trainer:
    corr = {"strategy": "delayed", "inner": "deterministic", **options}
    return trainer(tmp_path, {"mlsgd.correction": corr, "mlsgd.cycles": cycles,
                              "mlsgd.epochs": 0.5, "mlsgd.batch_size": 24, **FAST,
                              **(extra or {})}, **kw)


def _corrected_cycles(t: Trainer) -> list[int]:
    """Cycles whose coarse levels got a correction (recorded from the strategy's prepare)."""
    seen: list[int] = []
    inner = t.strategy.inner
    original = inner.prepare

    def prepare(host, level, target):
        if target is not None and host.cycle not in seen:
            seen.append(host.cycle)
        return original(host, level, target)

    inner.prepare = prepare
    return seen


@pytest.mark.parametrize("options, message", [
    ({}, "set at least one switching condition"),
    ({"after_cycle": 1, "fraction": 0.5}, "fraction: only for inner"),
    ({"after_cycle": -1}, "after_cycle"),
    ({"angle_below": 2.0}, "angle_below"),
])
def test_delayed_options_are_checked(tmp_path: Path, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _delayed(tmp_path, options)


def test_delayed_after_cycle(tmp_path: Path) -> None:
    t = _delayed(tmp_path, {"after_cycle": 2}, cycles=4)
    assert isinstance(t.strategy, DelayedCorrection)
    corrected = _corrected_cycles(t)
    summary = t.fit()
    assert corrected == [2, 3]
    assert t.strategy.switched_at == 2
    rows = read_rows(tmp_path)
    assert events(rows, SWITCHED) == [(2, "fine", f"{SWITCHED} (after cycle 2)")]
    assert events(rows, WAITING) == []  # nothing measured: no check rows
    assert summary["correction"] == "delayed deterministic, on from cycle 2 (after cycle 2)"


def test_uncorrected_cycles_still_come_first(tmp_path: Path) -> None:
    t = _delayed(tmp_path, {"after_cycle": 0}, cycles=3,
                 extra={"mlsgd.uncorrected_cycles": 1})
    corrected = _corrected_cycles(t)
    t.fit()
    assert corrected == [1, 2] and t.strategy.switched_at == 1


def _restricted_norm_by_hand(t: Trainer, g: list[torch.Tensor]) -> float:
    """‖P*∇_L F_L‖_mid for depth.constant from fine (h 1, 4 layers) to mid (h 2, 2 layers):
    P* = (h_fine/h_mid)·Pᵀ, Pᵀ sums each pair of fine layers; identity elsewhere."""
    fine, mid = t.levels["fine"], t.levels["mid"]
    gd = {n: x.detach() for n, x in zip(fine.names, g)}
    out = []
    for n in mid.names:
        if n.startswith("layers."):
            _, i, rest = n.split(".", 2)
            i = int(i)
            pt = gd[f"layers.{2 * i}.{rest}"] + gd[f"layers.{2 * i + 1}.{rest}"]
        else:
            pt = gd[n]
        out.append((fine.h / mid.h) * pt / fine.h)
    return math.sqrt(mid.h) * float(torch.sqrt(sum((x.double() ** 2).sum() for x in out)))


def test_delayed_gradient_norm_is_the_restricted_norm(tmp_path: Path) -> None:
    t = _delayed(tmp_path / "a", {"gradient_norm_below": 1e-12}, cycles=3)
    expected0 = _restricted_norm_by_hand(t, t.driver.gradient("fine"))
    t.fit()
    values = [t.strategy.measurements[k]["gradient_norm"] for k in range(3)]
    assert values[0] == pytest.approx(expected0, rel=1e-6)
    assert t.strategy.switched_at is None
    rows = read_rows(tmp_path / "a")
    waiting = events(rows, WAITING)
    assert [c for c, _, _ in waiting] == [0, 1, 2]
    assert f"gradient norm {values[0]:.3g} >= 1e-12" in waiting[0][2]

    # the same run with a threshold between the measured values switches at the first cycle
    # whose norm is below it, and records why
    threshold = sorted(values)[1] * (1 + 1e-6)
    first = next(k for k, v in enumerate(values) if v < threshold)
    t2 = _delayed(tmp_path / "b", {"gradient_norm_below": threshold}, cycles=3)
    corrected = _corrected_cycles(t2)
    t2.fit()
    assert t2.strategy.switched_at == first
    assert corrected == list(range(first, 3))
    assert [t2.strategy.measurements[k]["gradient_norm"] for k in range(first + 1)] == \
        pytest.approx(values[:first + 1], rel=1e-9)
    switched = events(read_rows(tmp_path / "b"), SWITCHED)
    assert switched == [(first, "fine", f"{SWITCHED} (gradient norm {values[first]:.3g} < "
                                        f"{threshold:.3g})")]
    assert len(events(read_rows(tmp_path / "b"), WAITING)) == first


def test_delayed_angle_is_the_prolongated_coarse_step(tmp_path: Path) -> None:
    t = _delayed(tmp_path / "a", {"angle_below": -0.999}, cycles=3, double=True)
    starts: dict[int, tuple] = {}
    ascend = t.driver.ascend
    begin = t.driver.begin_cycle

    def begin_cycle(k):
        fine = t.levels["fine"]
        starts[k] = ([p.detach().clone() for p in fine.params],)
        return begin(k)

    def ascend_spy(coarse, fine):
        before = [p.detach().clone() for p in t.levels[fine].params]
        ascend(coarse, fine)
        if fine == "fine":
            after = [p.detach() for p in t.levels[fine].params]
            starts[t.driver.cycle] += ([a - b for a, b in zip(after, before)],)

    t.driver.begin_cycle, t.driver.ascend = begin_cycle, ascend_spy
    t.fit()
    m = t.strategy.measurements
    assert m[0]["cos"] is None  # nothing to measure before the first cycle
    for k in (1, 2):
        w0, step = starts[k - 1]
        fine = t.levels["fine"]
        # gradient of F_L at w_{L,k-1,0}: load it into a copy of the finest model
        snap = t.driver.snapshot("fine")
        with torch.no_grad():
            for p, w in zip([p for p in snap.parameters() if p.requires_grad], w0):
                p.copy_(w)
        g = [x.detach() for x in t.driver.gradient("fine", model=snap)]
        cos = -sum(float((a * b).sum()) for a, b in zip(g, step)) / (
            math.sqrt(sum(float((a * a).sum()) for a in g))
            * math.sqrt(sum(float((b * b).sum()) for b in step)))
        assert m[k]["cos"] == pytest.approx(cos, rel=1e-6, abs=1e-9), k
        del fine
    waiting = events(read_rows(tmp_path / "a"), WAITING)
    assert waiting[0][2] == f"{WAITING} (cos n/a)"

    # a bound above the measured cosine switches in cycle 1 (the first that can measure)
    bound = min(1.0, m[1]["cos"] + 0.05)
    t2 = _delayed(tmp_path / "b", {"angle_below": bound}, cycles=3, double=True)
    corrected = _corrected_cycles(t2)
    t2.fit()
    assert t2.strategy.switched_at == 1 and corrected == [1, 2]
    assert events(read_rows(tmp_path / "b"), SWITCHED) == [
        (1, "fine", f"{SWITCHED} (cos {m[1]['cos']:.3g} < {bound:.3g})")]


def test_delayed_first_condition_wins_and_several_are_reported(tmp_path: Path) -> None:
    t = _delayed(tmp_path, {"after_cycle": 1, "gradient_norm_below": 1e6}, cycles=2)
    t.fit()
    assert t.strategy.switched_at == 0
    (row,) = events(read_rows(tmp_path), SWITCHED)
    assert row[0] == 0 and "gradient norm" in row[2] and "after cycle" not in row[2]


def test_delayed_stochastic_inner_shares_the_sample(tmp_path: Path) -> None:
    """The switching cycle's measurement is the gradient the correction then uses (cache)."""
    corr = {"strategy": "delayed", "inner": "stochastic", "fraction": 0.5,
            "gradient_norm_below": 1e6, "variance_reduction": True}
    t = trainer(tmp_path, {"mlsgd.correction": corr, "mlsgd.cycles": 1, "mlsgd.epochs": 0.5,
                           **FAST})
    calls = []
    objective = t.levels["fine"].objective
    original = objective.gradient

    def counted(*a, **k):
        calls.append(k.get("indices") is not None)
        return original(*a, **k)

    objective.gradient = counted
    t.fit()
    assert t.strategy.switched_at == 0 and t.strategy.variance_reduction
    assert calls == [True]  # one pass on the sample: measurement = SVRG anchor gradient


def test_delayed_switch_survives_a_resume(tmp_path: Path) -> None:
    overrides = {"mlsgd.correction": {"strategy": "delayed", "inner": "deterministic",
                                      "gradient_norm_below": 1e6},
                 "mlsgd.cycles": 3, "mlsgd.epochs": 0.5, **FAST}

    class Interrupt:
        @hookimpl
        def mlsgd_cycle_end(self, run, cycle):
            if cycle == 0:
                raise KeyboardInterrupt

    broken = trainer(tmp_path, overrides)
    broken.c.registry.manager.register(Interrupt(), name="interrupt-delayed")
    try:
        with pytest.raises(RunError, match="resume"):
            broken.fit()
    finally:
        broken.c.registry.manager.unregister(name="interrupt-delayed")
    from _runner_nets import compiled

    resumed = Trainer(compiled(overrides), resume=tmp_path, quiet=True, validate=False)
    corrected = _corrected_cycles(resumed)
    resumed.fit()
    assert corrected == [1, 2]
    assert resumed.strategy.switched_at == 0
    assert [c for c, _, _ in events(read_rows(tmp_path), SWITCHED)] == [0]


# =========================================================================== 3. graphs


def _graph_file() -> Path:
    return BEYOND / "fmnist-depth-resolution.toml"


def _random_params(c, level: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    node = c.nodes[level]
    return {n: torch.randn(tuple(node.shapes[n]), generator=g, dtype=torch.float64)
            for n in node.parameters}


def _rel(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in a))
    den = math.sqrt(sum(float((b[n] ** 2).sum()) for n in b))
    return num / den


def test_depth_resolution_graph_and_its_two_paths_commute() -> None:
    c = mlsgd_dsl.compile(mlsgd_dsl.load(_graph_file()))
    assert sorted(c.graph.edges) == [("both", "lowres"), ("both", "shallow"),
                                     ("lowres", "fine"), ("shallow", "fine")]
    assert c.levels[0] == "both" and c.finest == "fine"
    rules = {e: sorted({g.rule for g in c.edge(*e).params}) for e in c.graph.edges}
    assert rules[("shallow", "fine")] == rules[("both", "lowres")] == \
        ["depth.constant", "identity"]
    assert rules[("lowres", "fine")] == rules[("both", "shallow")] == \
        ["identity", "kernel_basis", "resolution"]
    paths = sorted(c.all_paths("both", "fine"))
    assert paths == [["both", "lowres", "fine"], ["both", "shallow", "fine"]]
    a, b = (c.transfer("both", "fine", via=p) for p in paths)
    x = _random_params(c, "both", 0)
    y = _random_params(c, "fine", 1)
    assert _rel(a.prolongate(x), b.prolongate(x)) < 1e-14      # P
    assert _rel(a.restrict(y), b.restrict(y)) < 1e-14          # R
    assert _rel(a.adjoint(y), b.adjoint(y)) < 1e-14            # P*
    report = mlsgd_dsl.validate(c)
    (row,) = [r for r in report.rows if r.name == "paths both->fine"]
    assert row.status == "pass" and "2 paths" in row.detail, row


def test_paths_that_do_not_commute_are_reported() -> None:
    """depth.linear on one depth edge, depth.constant on the other: the composed P differ,
    and validate says by how much (a warning, not a failure)."""
    text = _graph_file().read_text()
    text = text.replace(
        'coarse = "shallow"\nfine = "fine"\ntransfer = { default = "identity", rules = '
        '{ "blocks.*.layers.*" = "depth.constant" } }',
        'coarse = "shallow"\nfine = "fine"\ntransfer = { default = "identity", rules = '
        '{ "blocks.*.layers.*" = "depth.linear" } }')
    assert "depth.linear" in text
    c = mlsgd_dsl.compile(mlsgd_dsl.loads(text, file="linear.toml"))
    (row,) = [r for r in mlsgd_dsl.validate(c).rows if r.name == "paths both->fine"]
    assert row.status == "warn" and "do not commute" in row.detail
    worst = float(row.detail.split("difference of P ")[1].split()[0])
    assert 0.01 < worst < 1


DIAMOND_EDGES = "\n".join([
    "[[edges]]", 'coarse = "coarse"', 'fine = "left"',
    "[[edges]]", 'coarse = "coarse"', 'fine = "right"',
    "[[edges]]", 'coarse = "left"', 'fine = "fine"',
    'transfer = { default = "identity", rules = { "layers.*" = { rule = "depth.linear", '
    'restriction = "injection" } } }',
    "[[edges]]", 'coarse = "right"', 'fine = "fine"', ""])


def _diamond(tmp_path: Path, overrides: dict) -> Trainer:
    text = hierarchy_text((("fine", 1.0, 4), ("left", 2.0, 2), ("right", 2.0, 2),
                           ("coarse", 4.0, 1))) + DIAMOND_EDGES
    h = mlsgd_dsl.loads(text, file="diamond.toml", overrides={
        "mlsgd.path": [["coarse", "left", "fine"], ["coarse", "right", "fine"]], **overrides})
    return Trainer(mlsgd_dsl.compile(h), out_dir=tmp_path, quiet=True, validate=False)


def test_runner_follows_the_alternating_path_and_composes_r_along_it(tmp_path: Path) -> None:
    """On a diamond whose two paths do NOT commute, each cycle descends and ascends along its
    own path: the coarsest level starts from R composed along that path, and the finest level
    moves by P composed along it."""
    t = _diamond(tmp_path, {"mlsgd.cycles": 4, "mlsgd.epochs": 0.5, "mlsgd.batch_size": 24,
                            "mlsgd.optimizer": {"momentum": 0.9},
                            "mlsgd.optimizer_state": "transfer", "mlsgd.init": "independent",
                            **FAST})
    calls: list[tuple] = []
    checks: list[int] = []
    descend, ascend = t.driver.descend, t.driver.ascend
    fine_at_start: dict[int, dict] = {}
    begin = t.driver.begin_cycle

    def begin_cycle(k):
        fine_at_start[k] = {n: v.clone() for n, v in t.levels["fine"].model.state_dict().items()}
        return begin(k)

    def descend_spy(fine, coarse):
        calls.append((t.driver.cycle, "down", fine, coarse))
        ok = descend(fine, coarse)
        if coarse == "coarse":  # R_{coarse<-fine} along this cycle's path, on w_{L,k,0}
            k = t.driver.cycle
            path = t.c.path(k)
            other = [p for p in t.c.all_paths("coarse", "fine") if p != path][0]
            mine = t.c.transfer("coarse", "fine", via=path).restrict(fine_at_start[k])
            theirs = t.c.transfer("coarse", "fine", via=other).restrict(fine_at_start[k])
            got = t.levels["coarse"].model.state_dict()
            assert all(torch.allclose(got[n], mine[n], atol=1e-6) for n in mine)
            assert not all(torch.allclose(got[n], theirs[n], atol=1e-6) for n in theirs)
            checks.append(t.driver.cycle)
        return ok

    def ascend_spy(coarse, fine):
        calls.append((t.driver.cycle, "up", coarse, fine))
        return ascend(coarse, fine)

    t.driver.begin_cycle, t.driver.descend, t.driver.ascend = begin_cycle, descend_spy, ascend_spy
    t.fit()
    assert checks == [0, 1, 2, 3]
    for k in range(4):
        mid = "left" if k % 2 == 0 else "right"
        assert [c[1:] for c in calls if c[0] == k] == [
            ("down", "fine", mid), ("down", mid, "coarse"),
            ("up", "coarse", mid), ("up", mid, "fine")]
    levels = [(r["cycle"], r["level"]) for r in epoch_rows(read_rows(tmp_path))]
    assert levels == [(k, lv) for k in range(4)
                      for lv in ("coarse", "left" if k % 2 == 0 else "right", "fine")]


# =========================================================================== 4. shipped files

# Small enough for CI: a few hundred real images, quarter epochs, one cycle (two for the files
# whose point needs two: alternation, the delayed switch), a quarter of the channels (the
# validate test above checks each file as shipped; here the mechanics run, 16x cheaper).
TINY = {
    "data.subset": 200, "data.validation": 100, "data.test_subset": 100,
    "mlsgd.cycles": 1, "mlsgd.epochs": 0.25, "mlsgd.batch_size": 50,
    "mlsgd.bn_recalibration": 50, "mlsgd.full_batch_size": 200, "mlsgd.threads": 1,
    "mlsgd.eval.every": "cycle", "report.plot": False,
}
PER_FILE = {
    "fmnist-depth-delayed": {"mlsgd.cycles": 2, "mlsgd.correction.after_cycle": 1},
    "fmnist-depth-resolution-alternate": {"mlsgd.cycles": 2},
    # the pass, then a cycle of the finest level alone (cascade) or a V-cycle (fmg)
    "fmnist-depth-cascade": {"mlsgd.cycles": 2, "mlsgd.cascade_epochs": 0.25},
    "fmnist-resolution-cascade": {"mlsgd.cycles": 2, "mlsgd.cascade_epochs": 0.25},
    "fmnist-depth-fmg": {"mlsgd.cycles": 2, "mlsgd.cascade_epochs": 0.25},
    "fmnist-vit-depth": {"model.dim": 8, "model.heads": 2},
    "fmnist-vit-resolution": {"model.dim": 8, "model.heads": 2},
    "fmnist-resnet-depth": {"model.width": 4},
}


@pytest.fixture(scope="module")
def tiny_fashion_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 600 training and 200 test images of the real Fashion-MNIST, as uncompressed
    IDX files (reading the full gzipped set costs more than training on the subset)."""
    from mlsgd_dsl.data.idx import FILES, read_idx

    folder = tmp_path_factory.mktemp("fashion-mnist")
    src = FMNIST.parent
    for stem, (magic, dims) in FILES.items():
        data = read_idx(src / f"{stem}.gz", magic, dims)[:600 if stem.startswith("train")
                                                          else 200]
        header = magic.to_bytes(4, "big") + b"".join(
            int(d).to_bytes(4, "big") for d in data.shape)
        (folder / stem).write_bytes(header + data.numpy().tobytes())
    return folder


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_validates(path: Path) -> None:
    assert path.read_text().startswith("#")
    report = mlsgd_dsl.validate(mlsgd_dsl.compile(mlsgd_dsl.load(path)))
    assert report.ok and report.counts()["warn"] == 0, report.table()


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_runs_a_short_cycle(path: Path, tmp_path: Path,
                                        tiny_fashion_mnist: Path) -> None:
    channels = mlsgd_dsl.load(path).model.get("channels")
    overrides = {**TINY, "data.options.root": str(tiny_fashion_mnist),
                 **PER_FILE.get(path.stem, {})}
    if channels is not None:
        overrides["model.channels"] = [max(2, c // 4) for c in channels]
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(path, overrides=overrides))
    summary = mlsgd_dsl.run(compiled, out_dir=tmp_path, quiet=True, validate=False)
    assert 0.0 <= summary["val_acc"] <= 1.0 and summary["cycles"] == overrides["mlsgd.cycles"]
    rows = read_rows(tmp_path)
    levels = [(r["cycle"], r["level"]) for r in epoch_rows(rows)]
    paths, kind = compiled.paths, compiled.hierarchy.mlsgd.cycle
    assert levels == [(k, lv) for k in range(overrides["mlsgd.cycles"])
                      for lv in visit_order(paths[k % len(paths)], kind, k)]
    if path.stem == "fmnist-depth-delayed":
        assert [c for c, _, _ in events(rows, SWITCHED)] == [1]
        assert events(rows, SWITCHED)[0][2].startswith(f"{SWITCHED} (after cycle 1")
        assert summary["correction"].startswith("delayed stochastic (0.03125), on from cycle 1")
    assert json.loads((tmp_path / "summary.json").read_text())["name"] == compiled.hierarchy.name
