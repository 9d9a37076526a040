"""``mlsgd_dsl.validate``: the shipped files pass; broken plugins and incoherent graphs show up
as fail / warn rows that name the culprit."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import mlsgd_dsl
from mlsgd_dsl.api import Check, CheckRow, NoOptions, TransferRule
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.loader import read_toml
from mlsgd_dsl.registry import build_registry
from mlsgd_dsl.transfers.identity import IdentityOperator, bind_identity

pytestmark = pytest.mark.usefixtures("one_thread")

HIERARCHIES = Path(__file__).resolve().parents[1] / "hierarchies"
SHIPPED = sorted(HIERARCHIES.rglob("*.toml"))
#: Files that define their levels themselves (the others only change training settings).
STANDALONE = [p for p in SHIPPED
              if "extends" not in read_toml(p.read_text(encoding="utf-8"), str(p))]

TWO_LEVELS = """
name = "two"
[data]
options = { train = 20, test = 10, size = 8 }
[model]
family = "ruthotto-resnet"
channels = [2]
[levels.fine]
model = { layers = 2 }
[levels.coarse]
h = 2.0
model = { layers = 1 }
[transfer]
rules = { "blocks.*.layers.*" = "depth.constant" }
"""

DIAMOND = """
name = "diamond"
[data]
options = { train = 20, test = 10, size = 8 }
[model]
family = "ruthotto-resnet"
channels = [2]
[levels.fine]
model = { layers = 8 }
[levels.a]
h = 2.0
model = { layers = 4 }
[levels.b]
h = 2.0
model = { layers = 4 }
[levels.coarse]
h = 4.0
model = { layers = 2 }
[transfer]
rules = { "blocks.*.layers.*" = "depth.constant" }
[[edges]]
coarse = "coarse"
fine = "a"
transfer = { rules = { "blocks.*.layers.*" = "RULE" } }
[[edges]]
coarse = "coarse"
fine = "b"
[[edges]]
coarse = "a"
fine = "fine"
[[edges]]
coarse = "b"
fine = "fine"
[mlsgd]
path = ["coarse", "a", "fine"]
"""


class DoubleTranspose(IdentityOperator):
    def transpose(self, fine):
        return {n: 2 * t for n, t in super().transpose(fine).items()}


class FlatRestriction(IdentityOperator):
    def restrict(self, fine):
        return {n: t.flatten() for n, t in super().restrict(fine).items()}


class Crashes(IdentityOperator):
    def prolongate(self, coarse):
        raise RuntimeError("boom")


class LossyButPromising(IdentityOperator):
    left_inverse = True

    def restrict(self, fine):
        return {n: 0.5 * t for n, t in super().restrict(fine).items()}

    def transpose(self, fine):
        return super().restrict(fine)


def rule(name: str, operator: type[IdentityOperator]) -> TransferRule:
    def bind(spec, options):
        bind_identity(spec, options)  # the identity rule's own checks
        return operator(spec)

    return TransferRule(name, NoOptions, bind)


class BadRules:
    @hookimpl
    def mlsgd_transfer_rules(self) -> list[TransferRule]:
        return [rule("bad.transpose", DoubleTranspose), rule("bad.shapes", FlatRestriction),
                rule("bad.crash", Crashes), rule("bad.left_inverse", LossyButPromising)]


class ExtraChecks:
    @hookimpl
    def mlsgd_checks(self) -> list[Check]:
        def crash(compiled):
            raise ValueError("no luck")

        return [Check("extra.levels", lambda c: [
                    CheckRow("extra: level count", "warn", f"{len(c.levels)} levels"),
                    CheckRow("extra: finest", "pass", c.finest)]),
                Check("extra.crash", crash)]


@pytest.fixture(scope="module")
def bad_registry():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plugin itself registers cleanly
        return build_registry(extra_plugins=[("badrules", BadRules())], autoload=False)


def report_for(text: str, registry=None, **overrides) -> mlsgd_dsl.Report:
    h = mlsgd_dsl.loads(text, overrides=overrides or None, registry=registry)
    return mlsgd_dsl.validate(mlsgd_dsl.compile(h))


def rows(report: mlsgd_dsl.Report, suffix: str) -> list[CheckRow]:
    return [r for r in report.rows if r.name.endswith(suffix)]


# --------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(HIERARCHIES)) for p in SHIPPED])
def test_shipped_file_loads(path) -> None:
    assert mlsgd_dsl.load(path).levels


@pytest.mark.parametrize("path", STANDALONE, ids=[p.name for p in STANDALONE])
def test_shipped_file_validates(path) -> None:
    report = mlsgd_dsl.validate(mlsgd_dsl.compile(mlsgd_dsl.load(path)))
    assert report.ok, report.table()
    assert not [r for r in report.rows if r.status == "fail"]
    names = [r.name for r in report.rows]
    assert names[:2] == ["references", "graph"]
    for kind in ("coverage", "cost", "shapes", "R∘P = I", "linearity", "adjoint",
                 "function preservation"):
        assert any(n.endswith(kind) for n in names), kind


def test_quickstart_rows() -> None:
    report = mlsgd_dsl.validate(mlsgd_dsl.compile(mlsgd_dsl.load(HIERARCHIES /
                                                                 "quickstart.toml")))
    built_in = [r for r in report.rows if r.name in ("references", "graph")
                or r.name.startswith(("coarse->mid", "mid->fine"))]
    assert len(built_in) == 24 and {r.status for r in built_in} == {"pass"}
    [adjoint] = rows(report, "mid->fine blocks.*.layers.* [depth.constant]: adjoint")
    assert adjoint.detail.startswith("P* vs autograd 0.0e+00")
    table = report.table()
    assert table.splitlines()[0].split() == ["check", "status", "detail"]
    counts = report.counts()
    assert table.endswith(f"{counts['pass']} passed, {counts['warn']} warnings, 0 failed")
    assert sum(counts.values()) == len(report.rows)


def test_validation_is_deterministic_per_seed() -> None:
    c = mlsgd_dsl.compile(mlsgd_dsl.loads(TWO_LEVELS))
    assert mlsgd_dsl.validate(c, seed=3).rows == mlsgd_dsl.validate(c, seed=3).rows


# --------------------------------------------------------------------------- broken plugins


def test_wrong_transpose_fails_the_adjoint_row_naming_the_plugin(bad_registry) -> None:
    report = report_for(TWO_LEVELS, bad_registry, **{'transfer.rules."fc.*"': "bad.transpose"})
    assert not report.ok
    [row] = rows(report, "coarse->fine fc.* [bad.transpose]: adjoint")
    assert row.status == "fail"
    assert "plugin badrules" in row.detail and "wrong P*" in row.detail
    [rp] = rows(report, "coarse->fine fc.* [bad.transpose]: R∘P = I")
    assert rp.status == "pass"  # only the transpose is wrong
    assert [r.status for r in rows(report, "[depth.constant]: adjoint")] == ["pass"]


def test_wrong_output_shapes_fail_naming_the_plugin(bad_registry) -> None:
    report = report_for(TWO_LEVELS, bad_registry, **{'transfer.rules."fc.*"': "bad.shapes"})
    [row] = rows(report, "coarse->fine fc.* [bad.shapes]: shapes")
    assert row.status == "fail"
    assert "plugin badrules" in row.detail
    assert "R gives fc.weight: (" in row.detail and "expected (10, 128)" in row.detail
    assert not report.ok


def test_raising_operator_fails_naming_the_plugin(bad_registry) -> None:
    report = report_for(TWO_LEVELS, bad_registry, **{'transfer.rules."fc.*"': "bad.crash"})
    [row] = rows(report, "coarse->fine fc.* [bad.crash]: operators")
    assert row.status == "fail"
    assert "plugin badrules" in row.detail and "RuntimeError: boom" in row.detail
    [fp] = rows(report, "coarse->fine: function preservation")
    assert fp.status == "fail" and "boom" in fp.detail


def test_broken_left_inverse_promise_fails(bad_registry) -> None:
    report = report_for(TWO_LEVELS, bad_registry,
                        **{'transfer.rules."fc.*"': "bad.left_inverse"})
    [row] = rows(report, "[bad.left_inverse]: R∘P = I")
    assert row.status == "fail" and row.detail.startswith("relative error 5.0e-01")


def test_rule_without_left_inverse_is_not_held_to_it() -> None:
    report = report_for(TWO_LEVELS, **{'transfer.rules."blocks.*.layers.*"': "depth.linear"})
    [row] = rows(report, "[depth.linear]: R∘P = I")
    assert row.status == "pass" and row.detail.startswith("not promised")
    assert report.ok


# --------------------------------------------------------------------------- graphs


def test_paths_that_commute_pass() -> None:
    report = report_for(DIAMOND.replace("RULE", "depth.constant"))
    [row] = rows(report, "paths coarse->fine")
    assert row.status == "pass" and row.detail.startswith("2 paths")


def test_paths_that_do_not_commute_warn() -> None:
    report = report_for(DIAMOND.replace("RULE", "depth.linear"))
    [row] = rows(report, "paths coarse->fine")
    assert row.status == "warn" and "do not commute" in row.detail
    assert report.ok  # a warning, not a failure


def test_identical_levels_cost_the_same_and_preserve_the_function() -> None:
    text = TWO_LEVELS.replace("h = 2.0\nmodel = { layers = 1 }", "model = { layers = 2 }")
    report = report_for(text.replace('rules = { "blocks.*.layers.*" = "depth.constant" }', ""))
    [cost] = rows(report, "coarse->fine: cost")
    assert cost.status == "warn"
    [fp] = rows(report, "coarse->fine: function preservation")
    assert fp.status == "pass" and fp.detail.startswith("relative output gap 0.00e+00")


def test_function_preservation_gap_shrinks_with_the_time_step() -> None:
    # constant interpolation halves h: the gap is the O(h) error of two half steps vs one
    gaps = []
    for h in (1.0, 0.01):
        report = report_for(TWO_LEVELS, **{"levels.fine.model.h": h,
                                           "levels.coarse.model.h": 2 * h})
        [row] = rows(report, "coarse->fine: function preservation")
        gaps.append(float(row.detail.split()[3]))
    assert gaps[1] < 1e-2 and gaps[1] < gaps[0] / 20


# --------------------------------------------------------------------------- plugin checks


def test_plugin_checks_contribute_rows() -> None:
    registry = build_registry(extra_plugins=[("extras", ExtraChecks())], autoload=False,
                              block=["checks"])  # only this plugin's checks come last
    report = report_for(TWO_LEVELS, registry)
    names = [r.name for r in report.rows]
    assert names[-3:] == ["extra.crash", "extra: level count", "extra: finest"]
    crash, count, finest = report.rows[-3:]
    assert crash.status == "fail" and "plugin extras" in crash.detail
    assert "ValueError: no luck" in crash.detail
    assert (count.status, count.detail) == ("warn", "2 levels")
    assert (finest.status, finest.detail) == ("pass", "fine")
    assert not report.ok


def test_float64_inputs_do_not_leak_into_the_default_dtype() -> None:
    report_for(TWO_LEVELS)
    assert torch.get_default_dtype() == torch.float32
