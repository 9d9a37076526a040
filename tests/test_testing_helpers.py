"""mlsgd_dsl.testing: the public helpers plugin authors test their rules with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlsgd_dsl.api import GroupOperator, NoOptions, TransferBindError, TransferRule
from mlsgd_dsl.errors import ConfigError
from mlsgd_dsl.testing import (
    assert_hierarchy_valid,
    assert_rule_coherent,
    bind_rule,
    check_hierarchy,
    check_rule,
)
from mlsgd_dsl.transfers.identity import IdentityOperator

QUICKSTART = Path(__file__).resolve().parents[1] / "hierarchies" / "quickstart.toml"


def rule(operator: type[GroupOperator], name: str = "test.rule", bind=None) -> TransferRule:
    return TransferRule(name=name, options=NoOptions,
                        bind=bind or (lambda spec, options: operator(spec)))


class Doubled(IdentityOperator):
    """Pᵀ twice what it should be."""

    def transpose(self, fine):
        return {n: 2 * fine[n] for n in self.spec.coarse}


class ShortP(IdentityOperator):
    def prolongate(self, coarse):
        return {n: coarse[n][:-1].clone() for n in self.spec.fine}


class ShortR(IdentityOperator):
    def restrict(self, fine):
        return {n: fine[n][:-1].clone() for n in self.spec.coarse}


class NotALeftInverse(IdentityOperator):
    left_inverse = True  # promised, but R = ½ P

    def restrict(self, fine):
        return {n: fine[n] / 2 for n in self.spec.coarse}


class Squares(IdentityOperator):
    """P x = x + x²: Pᵀ at 0 is the identity (autograd agrees), but P is not linear."""

    def prolongate(self, coarse):
        return {n: coarse[n] + coarse[n] ** 2 for n in self.spec.fine}


def by_check(rows):
    return {r.name.rsplit(": ", 1)[1]: r for r in rows}


# --------------------------------------------------------------------------- built-in rules


def test_three_line_test_of_a_builtin_rule() -> None:
    rows = assert_rule_coherent("depth.constant", coarse={"layers.0.w": (3, 3)},
                                fine={"layers.0.w": (3, 3), "layers.1.w": (3, 3)},
                                h_coarse=2.0, h_fine=1.0)
    assert [r.name.rsplit(": ", 1)[1] for r in rows] == ["bind", "shapes", "R∘P = I",
                                                         "linearity", "adjoint"]
    assert all(r.status == "pass" for r in rows)
    assert rows[0].name == "coarse->fine * [depth.constant]: bind"


def test_rule_without_left_inverse_passes_with_a_note() -> None:
    rows = by_check(check_rule("depth.linear", {"layers.0.w": (2,), "layers.1.w": (2,)},
                               {f"layers.{i}.w": (2,) for i in range(4)}))
    assert rows["R∘P = I"].status == "pass"
    assert "not promised" in rows["R∘P = I"].detail


def test_options_and_hints_reach_the_rule() -> None:
    coarse, fine = {"fc.weight": (10, 4 * 2 * 2)}, {"fc.weight": (10, 4 * 4 * 4)}
    hints = {"fc.weight": {"input_shape": (4, 2, 2)}}
    assert_rule_coherent("resolution", coarse, fine, options={"scale": "auto"},
                         coarse_hints=hints, fine_hints={"fc.weight": {"input_shape": (4, 4, 4)}})
    rows = check_rule("resolution", coarse, fine)  # without the hints it cannot reshape
    assert len(rows) == 1 and rows[0].status == "fail" and rows[0].name.endswith(": bind")
    with pytest.raises(ValueError, match="options of rule 'resolution'"):
        check_rule("resolution", coarse, fine, options={"scale": -1})


def test_bind_rule_returns_the_operator() -> None:
    op = bind_rule("identity", {"b": (3,)}, {"b": (3,)}, h_coarse=2.0)
    assert isinstance(op, GroupOperator)
    assert op.spec.h_coarse == 2.0 and op.spec.coarse_level == "coarse"
    x = {"b": torch.arange(3.0)}
    assert torch.equal(op.prolongate(x)["b"], x["b"])
    with pytest.raises(TransferBindError):
        bind_rule("identity", {"b": (3,)}, {"b": (4,)})


def test_unknown_rule_name() -> None:
    with pytest.raises(ConfigError, match="no transfer rule named 'no.such.rule'"):
        check_rule("no.such.rule", {"b": (3,)}, {"b": (3,)})


# --------------------------------------------------------------------------- broken rules


def test_wrong_adjoint() -> None:
    rows = by_check(check_rule(rule(Doubled), {"b": (3,)}, {"b": (3,)}))
    assert rows["adjoint"].status == "fail"
    assert rows["adjoint"].detail.startswith("rule test.rule: wrong P*: P* vs autograd 1.0e+00")
    assert rows["R∘P = I"].status == "pass"
    with pytest.raises(AssertionError, match=r"rule 'test.rule': 1 check\(s\) failed:\n.*"
                                             r"\[test.rule\]: adjoint: fail: rule test.rule: "
                                             r"wrong P\*"):
        assert_rule_coherent(rule(Doubled), {"b": (3,)}, {"b": (3,)})


def test_wrong_shapes() -> None:
    rows = by_check(check_rule(rule(ShortR), {"b": (3,)}, {"b": (3,)}))
    assert rows["shapes"].status == "fail"
    assert "returns wrong shapes: R gives b: (2,), expected (3,)" in rows["shapes"].detail
    assert "linearity" not in rows
    # wrong P: a failing row (validation.py evaluates autograd's Pᵀ before its shape check)
    rows = check_rule(rule(ShortP), {"b": (3,)}, {"b": (3,)})
    assert rows[-1].status == "fail" and rows[-1].name.rsplit(": ", 1)[1] in {"shapes",
                                                                             "operators"}


def test_broken_left_inverse_promise() -> None:
    rows = by_check(check_rule(rule(NotALeftInverse), {"b": (3,)}, {"b": (3,)}))
    assert rows["R∘P = I"].status == "fail" and "relative error 5.0e-01" in rows["R∘P = I"].detail


def test_nonlinear_prolongation() -> None:
    rows = by_check(check_rule(rule(Squares), {"b": (5,)}, {"b": (5,)}))
    assert rows["linearity"].status == "fail"
    assert "P is not linear" in rows["linearity"].detail


def test_bind_errors_are_rows() -> None:
    def refuse(spec, options):
        raise TransferBindError("only square tensors")

    def crash(spec, options):
        raise ZeroDivisionError("oops")

    (row,) = check_rule(rule(IdentityOperator, bind=refuse), {"b": (3,)}, {"b": (3,)})
    assert row.status == "fail" and row.detail == "rule test.rule: only square tensors"
    (row,) = check_rule(rule(IdentityOperator, bind=crash), {"b": (3,)}, {"b": (3,)})
    assert row.detail == "rule test.rule: raised ZeroDivisionError while binding: oops"
    (row,) = check_rule(rule(IdentityOperator, bind=lambda s, o: None), {"b": (3,)},
                        {"b": (3,)})
    assert "bind returned None, not a GroupOperator" in row.detail


def test_registered_rule_is_labelled_with_its_plugin() -> None:
    (row,) = check_rule("identity", {"b": (3,)}, {"b": (4,)})
    assert row.detail.startswith("plugin transfers (built-in): identity: ")


# --------------------------------------------------------------------------- hierarchies


def test_check_hierarchy_is_validate_on_a_file() -> None:
    report = check_hierarchy(QUICKSTART, {"mlsgd.cycles": 1})
    assert report.ok, report.table()
    names = [r.name for r in report.rows]
    assert "references" in names and any(n.endswith("function preservation") for n in names)
    assert_hierarchy_valid(QUICKSTART)


def test_assert_hierarchy_valid_lists_failing_rows(tmp_hierarchy, install_plugin) -> None:
    text = QUICKSTART.read_text().replace('"blocks.*.layers.*" = "depth.constant"',
                                          '"blocks.*.layers.*" = "depth.constant", '
                                          '"fc.bias" = "doubled"')
    install_plugin("""
        from mlsgd_dsl.api import NoOptions, TransferRule
        from mlsgd_dsl.hookspecs import hookimpl
        from mlsgd_dsl.transfers.identity import IdentityOperator

        class Doubled(IdentityOperator):
            def transpose(self, fine):
                return {n: 2 * fine[n] for n in self.spec.coarse}

        @hookimpl
        def mlsgd_transfer_rules():
            return [TransferRule("doubled", NoOptions, lambda spec, options: Doubled(spec))]
    """, ep="doubler", dist="doubler")
    from mlsgd_dsl.registry import build_registry

    path = tmp_hierarchy(text)
    with pytest.raises(AssertionError, match=r"(?s)2 check\(s\) failed.*plugin doubler \(doubler "
                                             r"0\.1\): wrong P\*") as info:
        assert_hierarchy_valid(path, registry=build_registry())
    assert "mid->fine fc.bias [doubled]: adjoint: fail" in str(info.value)


# --------------------------------------------------------------------------- the guide's code


def test_the_plugin_guide_code_works(tmp_path, monkeypatch) -> None:
    """docs/plugins.md: its `# file:` code blocks, written out, import and pass their tests."""
    import importlib.util
    import re
    import sys

    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```python\n# file: (\S+)\n(.*?)```", guide, flags=re.S)
    assert {name for name, _ in blocks} >= {"mlsgd_pad/plugin.py", "tests/test_pad.py",
                                             "mlsgd_pad/corrections.py"}
    for name, code in blocks:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    (tmp_path / "mlsgd_pad" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        spec = importlib.util.spec_from_file_location("guide_test_pad",
                                                      tmp_path / "tests" / "test_pad.py")
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)
        tests.test_pad_zeros_is_coherent()
        tests.test_pad_zeros_refuses_a_narrower_fine_level()

        from mlsgd_dsl.registry import build_registry

        plugin = importlib.import_module("mlsgd_pad.plugin")
        corrections = importlib.import_module("mlsgd_pad.corrections")
        reg = build_registry(autoload=False, extra_plugins=[("pad", plugin),
                                                            ("pad_corrections", corrections)])
        assert not reg.broken
        assert "pad.zeros" in reg.names("transfer rules")
        strategy = reg.get("corrections", "pad.every-nth").record
        correction = strategy.create(strategy.options(every=3))
        assert [correction.needs_fine_gradient(k) for k in range(4)] == [True, False, False, True]
    finally:
        for module in ("mlsgd_pad", "mlsgd_pad.plugin", "mlsgd_pad.corrections"):
            sys.modules.pop(module, None)
