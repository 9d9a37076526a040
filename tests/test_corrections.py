"""Gradient corrections: first-order coherence (thesis 3.2.2, eq. (3.1)), the step each strategy
takes, and that no strategy computes a gradient it does not need."""

from __future__ import annotations

import math
from pathlib import Path

import pydantic
import pytest
import torch
from _runner_nets import trainer

from mlsgd_dsl.runner.corrections import (
    DeterministicCorrection,
    StochasticCorrection,
    StochasticOptions,
)
from mlsgd_dsl.runner.level import Visit, train_visit
from mlsgd_dsl.runner.objective import norm

TOL = 1e-10


def full_grad(t, level, sample=None):
    lv = t.levels[level]
    return lv.objective.gradient(lv.data.train_x, lv.data.train_y, batch_size=1000,
                                 indices=None if sample is None else sample.indices)


def level_norm(t, level, values) -> float:
    """‖v‖_l = √h_l ‖v‖."""
    return math.sqrt(t.levels[level].h) * norm(values)


def coherent_target(t, coarse, fine="fine", sample=None):
    """Level gradient P*_{coarse←fine} ∇_fine F_fine(w_fine) (composed along the path)."""
    g = full_grad(t, fine, sample)
    hf = t.levels[fine].h
    adj = t.c.transfer(coarse, fine).adjoint(dict(zip(t.levels[fine].names,
                                                      [x / hf for x in g])))
    return [adj[n] for n in t.levels[coarse].names]


def corrected_level_gradient(t, level, sample=None):
    """∇_l H_l at the level's current weights: (∇F_l + correction vector) / h_l."""
    g = full_grad(t, level, sample)
    vec = t.driver.state.corr[level].vector
    return [(a + v) / t.levels[level].h for a, v in zip(g, vec)]


def descend_all(t, cycle=0):
    t.driver.begin_cycle(cycle)
    assert t.driver.descend("fine", "mid")
    assert t.driver.descend("mid", "coarse")


@pytest.mark.parametrize("correction", [
    "deterministic",
    {"strategy": "stochastic", "fraction": 1.0},
])
def test_first_order_coherence_composed_over_three_levels(tmp_path: Path, correction) -> None:
    t = trainer(tmp_path, {"mlsgd.correction": correction, "mlsgd.step_regularization": 5.0},
                double=True)
    descend_all(t)
    for level in ("mid", "coarse"):
        expected = coherent_target(t, level)
        got = corrected_level_gradient(t, level)
        assert level_norm(t, level, expected) > 1e-3  # not trivially zero
        diff = [a - b for a, b in zip(got, expected)]
        assert level_norm(t, level, diff) < TOL, level
        # the target handed to the level is the Euclidean Pᵀ∇H = h_l·P*∇_{l+1}H
        target = [x * t.levels[level].h for x in expected]
        assert norm([a - b for a, b in zip(t.driver.state.corr[level].target, target)]) < TOL


def test_stochastic_correction_is_coherent_on_its_sample(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.correction": {"strategy": "stochastic", "fraction": 0.25}},
                double=True)
    descend_all(t)
    sample = t.driver.sample(0.25)
    assert len(sample.indices) == round(0.25 * len(t.levels["fine"].data.train_x))
    for level in ("mid", "coarse"):
        expected = coherent_target(t, level, sample=sample)
        got = corrected_level_gradient(t, level, sample=sample)
        assert level_norm(t, level, [a - b for a, b in zip(got, expected)]) < TOL
        # ... and only in expectation on all the data
        full = coherent_target(t, level)
        assert level_norm(t, level, [a - b for a, b in zip(got, full)]) > 1e-6


def _one_step(t, level, batch_fraction_epochs):
    lv = t.levels[level]
    lv.new_optimizer()
    before = lv.detached_params()
    visit = Visit(epochs=batch_fraction_epochs, correction=t.driver.state.corr[level],
                  anchor=t.driver.state.anchor[level], lam=t.driver.lam(level))
    result = train_visit(lv, visit, t.driver)
    assert result.steps >= 1
    return before, lv.detached_params()


@pytest.mark.parametrize("correction", [
    {"strategy": "deterministic", "variance_reduction": True},
    {"strategy": "stochastic", "fraction": 0.5, "variance_reduction": True},
])
def test_variance_reduced_first_step_is_the_coherent_direction(tmp_path: Path,
                                                               correction) -> None:
    """(3.21) at w_{l,0}: g(w_0,ξ) − g(w_0,ξ) + P*∇H = P*∇H on any mini-batch."""
    t = trainer(tmp_path, {"mlsgd.correction": correction}, double=True)
    descend_all(t)
    lr = t.levels["coarse"].lr
    nb = t.levels["coarse"].batches_per_epoch
    assert nb >= 2  # a real mini-batch, not the full gradient
    before, after = _one_step(t, "coarse", 1 / nb)
    target = t.driver.state.corr["coarse"].target
    sample = None if t.strategy.sample(t.driver) is None else t.driver.sample(0.5)
    expected = coherent_target(t, "coarse", sample=sample)
    h = t.levels["coarse"].h
    assert norm([a - b for a, b in zip(target, [x * h for x in expected])]) < TOL
    step = [a - b for a, b in zip(after, before)]
    assert norm([s + lr * g for s, g in zip(step, target)]) < TOL


def test_plain_correction_full_batch_steps_with_step_regularisation(tmp_path: Path) -> None:
    """Two full-batch steps: ∇H = ∇F(w) + (target − ∇F(w_0)) + λ h (w − w_0)."""
    lam = 5.0
    t = trainer(tmp_path, {"mlsgd.correction": "deterministic",
                           "mlsgd.step_regularization": lam,
                           "mlsgd.batch_size": 96}, double=True)
    descend_all(t)
    lv = t.levels["coarse"]
    assert lv.batches_per_epoch == 1
    w0 = [p.clone() for p in t.driver.state.anchor["coarse"]]
    target = t.driver.state.corr["coarse"].target
    before, w1 = _one_step(t, "coarse", 1.0)
    assert norm([b - a for a, b in zip(w0, before)]) == 0
    assert norm([a - b + lv.lr * g for a, b, g in zip(w1, w0, target)]) < TOL
    # second step by hand
    g1 = full_grad(t, "coarse")
    g0 = full_grad_at(t, "coarse", w0)
    expected = [w - lv.lr * (a + tg - b + lam * lv.h * (w - z))
                for w, a, tg, b, z in zip(w1, g1, target, g0, w0)]
    _, w2 = _one_step(t, "coarse", 1.0)  # a fresh SGD (no momentum): the same rule
    assert norm([a - b for a, b in zip(w2, expected)]) < 1e-9


def full_grad_at(t, level, weights):
    lv = t.levels[level]
    saved = lv.detached_params()
    lv.set_params(weights)
    try:
        return full_grad(t, level)
    finally:
        lv.set_params(saved)


def _count_gradients(t) -> dict[str, int]:
    counts = {n: 0 for n in t.levels}
    for name, lv in t.levels.items():
        original = lv.objective.gradient

        def counted(*a, _name=name, _orig=original, **k):
            counts[_name] += 1
            return _orig(*a, **k)

        lv.objective.gradient = counted
    return counts


@pytest.mark.parametrize("overrides, expected", [
    ({"mlsgd.correction": "none"}, {"fine": 0, "mid": 0, "coarse": 0}),
    # the angle condition's ∇F_L(w_{L,k,0}) is shared with the correction's
    ({"mlsgd.correction": "deterministic", "mlsgd.angle": {"mu": -1.0 + 1e-9}},
     {"fine": 1, "mid": 1, "coarse": 1}),
    ({"mlsgd.correction": {"strategy": "deterministic", "variance_reduction": True}},
     {"fine": 1, "mid": 0, "coarse": 0}),
    ({"mlsgd.correction": {"strategy": "stochastic", "fraction": 0.25},
      "mlsgd.angle": {"mu": -0.5, "gradient": "stochastic", "fraction": 0.25}},
     {"fine": 1, "mid": 1, "coarse": 1}),
])
def test_each_strategy_computes_only_what_it_needs(tmp_path: Path, overrides, expected) -> None:
    t = trainer(tmp_path, {**overrides, "mlsgd.cycles": 1,
                           "mlsgd.epochs": 0.25, "mlsgd.eval.every": "cycle"})
    counts = _count_gradients(t)
    t.fit()
    assert counts == expected


@pytest.mark.parametrize("svrg_finest", [True, False])
def test_svrg_on_the_finest_level(tmp_path: Path, svrg_finest) -> None:
    t = trainer(tmp_path, {"mlsgd.correction": {"strategy": "deterministic",
                                                "variance_reduction": True,
                                                "svrg_finest": svrg_finest}}, double=True)
    t.driver.begin_cycle(0)
    fine = t.driver.state.corr["fine"]
    if not svrg_finest:
        assert fine is None
        return
    assert fine.snapshot is not None and fine.snapshot is not t.levels["fine"].model
    g = full_grad(t, "fine")
    assert norm([a - b for a, b in zip(fine.target, g)]) < TOL
    # at w_{L,k,0} the SVRG step is the full gradient, whatever the batch
    before, after = _one_step(t, "fine", 1 / t.levels["fine"].batches_per_epoch)
    lr = t.levels["fine"].lr
    assert norm([b - a + lr * x for a, b, x in zip(before, after, g)]) < TOL


def test_uncorrected_first_cycle(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.correction": "deterministic", "mlsgd.uncorrected_cycles": 1,
                           "mlsgd.cycles": 2, "mlsgd.epochs": 0.25,
                           "mlsgd.eval.every": "cycle"})
    counts = _count_gradients(t)
    t.driver.begin_cycle(0)
    assert t.driver.state.strategy.name == "none" and t.driver.state.corr["fine"] is None
    assert t.driver.descend("fine", "mid") and t.driver.state.corr["mid"] is None
    assert sum(counts.values()) == 0
    t.driver.begin_cycle(1)
    assert t.driver.state.strategy.name == "deterministic"
    assert t.driver.descend("fine", "mid") and t.driver.state.corr["mid"].vector is not None
    assert counts == {"fine": 1, "mid": 1, "coarse": 0}


def test_plugin_records_and_options(registry) -> None:
    names = registry.names("corrections")
    assert {"none", "deterministic", "stochastic"} <= set(names)
    entry = registry.get("corrections", "stochastic")
    opts = entry.record.options.model_validate({"fraction": 0.125, "variance_reduction": True})
    strategy = entry.record.create(opts)
    assert isinstance(strategy, StochasticCorrection)
    assert strategy.fraction == 0.125 and strategy.variance_reduction
    assert strategy.needs_fine_gradient(0)
    with pytest.raises(pydantic.ValidationError):
        StochasticOptions.model_validate({"fraction": 0.1, "bogus": 1})
    det = registry.get("corrections", "deterministic").record
    assert isinstance(det.create(det.options()), DeterministicCorrection)
    none = registry.get("corrections", "none").record.create(None)
    assert not none.needs_fine_gradient(0)
    assert none.prepare(None, "fine", None) is None


def test_early_stop_refuses_descent(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.early_stop": {"eta": 1e6}, "mlsgd.cycles": 1,
                           "mlsgd.epochs": 0.25, "mlsgd.eval.every": "cycle"})
    summary = t.fit()
    from mlsgd_dsl.runner.records import read_rows

    rows = read_rows(tmp_path)
    assert [r["event"] for r in rows if r["event"]][0] == "early_stop:mid"
    assert {r["level"] for r in rows} == {"fine"}
    assert summary["cycles"] == 1


def test_early_stop_epsilon_and_pass(tmp_path: Path) -> None:
    t = trainer(tmp_path, {"mlsgd.early_stop": {"eta": 0.0, "epsilon": 0.0}}, double=True)
    t.driver.begin_cycle(0)
    assert t.driver.descend("fine", "mid")
    t2 = trainer(tmp_path / "b", {"mlsgd.early_stop": {"epsilon": 1e9}}, double=True)
    t2.driver.begin_cycle(0)
    assert not t2.driver.descend("fine", "mid")


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_gradient_passes_leave_batchnorm_statistics_alone(tmp_path: Path, mode) -> None:
    """Full-gradient passes are deterministic and do not touch BatchNorm statistics; with
    "batch" they differentiate through the chunk statistics (as the training steps do)."""
    t = trainer(tmp_path, {"mlsgd.correction": {"strategy": "deterministic",
                                                "batchnorm": mode}}, batchnorm=True)
    assert t.driver.batchnorm == mode
    lv = t.levels["fine"]
    before = {k: v.clone() for k, v in lv.model.state_dict().items()}
    g1 = t.driver.gradient("fine")
    t.driver.state.grad_cache.clear()
    g2 = t.driver.gradient("fine")
    after = lv.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert g1 is not g2 and norm([a - b for a, b in zip(g1, g2)]) == 0
    other = lv.objective.gradient(lv.data.train_x, lv.data.train_y, batch_size=40,
                                  batchnorm="running" if mode == "batch" else "batch")
    assert norm([a - b for a, b in zip(g1, other)]) > 1e-4
