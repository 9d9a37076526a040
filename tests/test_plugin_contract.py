"""The published plugin contract holds: what a plugin author found when trying it from
docs/plugins.md alone, one test per finding (each failed before the contract was enforced).

Plugins are installed as distributions with an entry point (``install_plugin``), as a user's
``pip install`` would, and exercised through the CLI in-process.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable

import pytest
import torch

import mlsgd_dsl
from mlsgd_dsl import registry as registry_module
from mlsgd_dsl.api import NoOptions, TransferRule
from mlsgd_dsl.errors import PluginFailure
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.registry import PluginWarning, _api_compatible, build_registry
from mlsgd_dsl.testing import check_rule
from mlsgd_dsl.transfers.identity import bind_identity

HEADER = """
import torch
from pydantic import BaseModel, ConfigDict
from mlsgd_dsl.api import (CorrectionStrategy, DataSource, GroupOperator, NoOptions,
                           TransferRule)
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.data.synthetic import SYNTHETIC

MLSGD_DSL_API = ">=1.0"


class Copy(GroupOperator):
    def prolongate(self, coarse):
        return {n: coarse[n].clone() for n in self.spec.fine}

    def restrict(self, fine):
        return {n: fine[n].clone() for n in self.spec.coarse}

    def transpose(self, fine):
        return {n: fine[n].clone() for n in self.spec.coarse}


class Squares(Copy):
    def prolongate(self, coarse):
        return {n: coarse[n] ** 2 for n in self.spec.fine}


class Doubles(Copy):
    '''P doubles its input in place (and returns it).'''

    def prolongate(self, coarse):
        return {n: coarse[n].mul_(2) for n in self.spec.fine}


def rule(name, operator):
    return TransferRule(name=name, options=NoOptions, bind=lambda spec, options: operator(spec))
"""

PLUGINS = {
    "bind_none": HEADER + """
@hookimpl
def mlsgd_transfer_rules():
    return [TransferRule(name="c.none", options=NoOptions, bind=lambda spec, options: None)]
""",
    "create_none": HEADER + """
@hookimpl
def mlsgd_corrections():
    return [CorrectionStrategy(name="c.nothing", options=NoOptions,
                               create=lambda options: None)]
""",
    "load_wrong": HEADER + """
@hookimpl
def mlsgd_data_sources():
    return [DataSource(name="c.tuple", options=SYNTHETIC.options, shape=SYNTHETIC.shape,
                       load=lambda options, context: (1, 2))]
""",
    "operators": HEADER + """
@hookimpl
def mlsgd_transfer_rules():
    return [rule("c.squares", Squares), rule("c.inplace", Doubles)]
""",
}

FILE = """
name = "contract"
[data]
source = "{source}"
options = {{ train = 64, test = 32, size = 8, channels = 1, classes = 3 }}
validation = 16
[model]
family = "ruthotto-resnet"
channels = [2]
[levels.fine]
model = {{ layers = 2 }}
[levels.coarse]
h = 2.0
model = {{ layers = 1 }}
[transfer]
rules = {{ "blocks.*.layers.*" = "depth.constant", "fc.bias" = "{rule}" }}
[mlsgd]
correction = "{strategy}"
"""


def hierarchy(rule: str = "identity", strategy: str = "none", source: str = "synthetic"
              ) -> str:
    return FILE.format(rule=rule, strategy=strategy, source=source)


@pytest.fixture
def plugin(install_plugin: Callable[..., str]) -> Callable[[str], str]:
    def install(kind: str) -> str:
        install_plugin(PLUGINS[kind], ep=kind, dist=f"mlsgd_{kind}", version="0.1")
        return f"plugin {kind} (mlsgd_{kind} 0.1)"

    return install


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- return values


def test_bind_returning_none_is_one_line_naming_the_plugin(plugin, run_cli,
                                                           tmp_hierarchy) -> None:
    # Before: AttributeError traceback from validation.py.
    label = plugin("bind_none")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy(rule="c.none"))])
    line = one_line(err)
    assert rc == 2 and not out
    assert 'transfer.rules."fc.bias": ' in line
    assert f"{label}: rule 'c.none': bind returned None, not a GroupOperator" in line
    # the same check in mlsgd_dsl.testing
    [row] = check_rule(TransferRule("c.none", NoOptions, lambda spec, options: None),
                       {"b": (3,)}, {"b": (3,)})
    assert row.status == "fail" and "bind returned None, not a GroupOperator" in row.detail


def test_create_returning_none_fails_validate_not_run(plugin, run_cli, tmp_hierarchy) -> None:
    # Before: validate passed and the run crashed.
    label = plugin("create_none")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy(strategy="c.nothing"))])
    line = one_line(err)
    assert rc == 2 and not out
    assert line.endswith(f"mlsgd.correction: {label}: strategy 'c.nothing': create returned "
                         "None, not a correction strategy")


def test_load_returning_the_wrong_kind_names_the_source(plugin, tmp_hierarchy) -> None:
    label = plugin("load_wrong")
    registry_module.set_default_registry(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        compiled = mlsgd_dsl.compile(mlsgd_dsl.load(tmp_hierarchy(hierarchy(source="c.tuple"))))
    expected = (f"data.source: {label}: data source 'c.tuple': load returned tuple, not "
                "mlsgd_dsl.api.RawData")
    with pytest.raises(PluginFailure, match=re.escape(expected)):
        compiled.data()


def test_nonlinear_p_is_reported_as_nonlinear_not_as_wrong_adjoint(plugin, run_cli,
                                                                    tmp_hierarchy) -> None:
    label = plugin("operators")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy(rule="c.squares"))])
    assert rc == 1, out + err
    rows = [line for line in out.splitlines() if "[c.squares]" in line]
    linearity = next(r for r in rows if "[c.squares]: linearity" in r)
    assert "fail" in linearity and f"{label}: P is not linear" in linearity
    assert not any("wrong P*" in r for r in rows), rows


def test_in_place_p_is_named_as_such_not_blamed_on_the_transpose(plugin, run_cli,
                                                                  tmp_hierarchy) -> None:
    label = plugin("operators")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy(rule="c.inplace"))])
    assert rc == 1, out + err
    rows = [line for line in out.splitlines() if "[c.inplace]" in line]
    inputs = next(r for r in rows if "[c.inplace]: inputs" in r)
    assert "fail" in inputs and f"{label}: P modifies its input in place (fc.bias changed)" \
        in inputs
    assert not any("transpose" in r or "wrong P*" in r for r in rows), rows


# --------------------------------------------------------------------------- registration


def test_specname_tryfirst_and_trylast_are_honoured() -> None:
    # Before: registration called getattr(plugin, hook_name)() in registration order.
    calls: list[str] = []

    class Named:
        @hookimpl(specname="mlsgd_transfer_rules")
        def my_rules(self):
            calls.append("named")
            return [TransferRule("c.named", NoOptions, bind_identity)]

    class Late:
        @hookimpl(trylast=True)
        def mlsgd_transfer_rules(self):
            calls.append("late")
            return [TransferRule("c.late", NoOptions, bind_identity)]

    reg = build_registry(autoload=False, extra_plugins=[("late", Late()), ("named", Named())])
    assert {"c.named", "c.late"} <= set(reg.names("transfer rules"))
    assert calls == ["named", "late"]  # trylast: called after the plugin registered later


def test_a_registration_hook_cannot_be_a_wrapper() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def mlsgd_transfer_rules(self):
            return (yield)

    with pytest.warns(PluginWarning, match="plugin wrapper: cannot be registered: "
                                           "mlsgd_transfer_rules is a registration hook"):
        reg = build_registry(autoload=False, extra_plugins=[("wrapper", Wrapper())])
    assert reg.manager.get_plugin("wrapper") is None


@pytest.mark.parametrize(("core", "need", "ok"), [
    ("1.1", "==1.0", False),  # before: taken like >=1.0
    ("1.1", ">=1.0", True),
    ("1.0", ">=1.0,<2", True),  # before: "not a version"
    ("2.0", ">=1.0,<2", False),
    ("1.1", "1.0", True),  # a bare version is the compatible release ~=1.0
    ("2.0", "1.0", False),
])
def test_api_version_is_a_pep440_specifier(monkeypatch, core, need, ok) -> None:
    monkeypatch.setattr(registry_module, "API_VERSION", core)
    reason = _api_compatible(type("Plugin", (), {"MLSGD_DSL_API": need})())
    assert (reason is None) == ok, reason


# --------------------------------------------------------------------------- strict types


@pytest.mark.parametrize(("override", "path"), [
    ("mlsgd.cycles=true", "mlsgd.cycles"),
    ("mlsgd.batch_size=true", "mlsgd.batch_size"),
    ("data.subset=true", "data.subset"),
    ('mlsgd.cycles="1"', "mlsgd.cycles"),
    ('mlsgd.seed="3"', "mlsgd.seed"),
    ("data.options.train=true", "data.options.train"),  # a plugin's options alike
    ('data.options.size="8"', "data.options.size"),
    ("mlsgd.cycles=1.0", "mlsgd.cycles"),
])
def test_coercions_the_user_did_not_mean_are_refused(override, path) -> None:
    with pytest.raises(mlsgd_dsl.errors.ConfigError, match=rf"^<string>: {path}: input should "
                                                           r"be a valid integer"):
        mlsgd_dsl.loads(hierarchy(), overrides=[override])


def test_an_integer_is_still_a_float() -> None:
    h = mlsgd_dsl.loads(hierarchy(), overrides=["mlsgd.lr=1", "mlsgd.epochs=2"])
    assert h.mlsgd.lr == 1.0 and isinstance(h.mlsgd.lr, float)


def test_unknown_key_lists_the_valid_keys() -> None:
    with pytest.raises(mlsgd_dsl.errors.ConfigError,
                       match=r"^<string>: data.options.foo: unknown key; valid keys: seed, "
                             r"train, test, classes, channels, size, noise$"):
        mlsgd_dsl.loads(hierarchy(), overrides=["data.options.foo=1"])
    with pytest.raises(mlsgd_dsl.errors.ConfigError,
                       match=r"^<string>: report.foo: unknown key; valid keys: thresholds, "
                             r"checkpoint, plot, tensorboard$"):
        mlsgd_dsl.loads(hierarchy(), overrides=["report.foo=1"])


# --------------------------------------------------------------------------- plugin options


def test_plugins_verbose_and_schema_show_plugin_options(run_cli) -> None:
    rc, out, err = run_cli(["plugins", "--verbose"])
    assert rc == 0, err
    assert "noise (number, default 0.1, >= 0, <= 1)" in out  # the synthetic source's options
    assert "factor (integer, default 2, >= 1)" in out  # depth.constant's
    rc, out, err = run_cli(["schema"])
    schema = json.loads(out)
    text = json.dumps(schema)
    for key in ("noise", "kernel_basis", "restriction", "after_cycle"):
        assert f'"{key}"' in text, key


def test_schema_checks_a_plugins_options() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from mlsgd_dsl.schema import json_schema

    schema = json_schema(registry_module.default_registry())
    good = {"name": "x", "data": {"source": "synthetic", "options": {"noise": 0.2}},
            "levels": {"fine": {"model": {"family": "ruthotto-resnet", "channels": [2],
                                          "layers": 1}}}}
    jsonschema.validate(good, schema)
    bad = json.loads(json.dumps(good))
    bad["data"]["options"]["noise"] = "loud"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(good))
    bad["levels"]["fine"]["model"]["layerz"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_in_place_check_leaves_correct_rules_alone() -> None:
    rows = check_rule("identity", {"b": (3,)}, {"b": (3,)})
    assert all(r.status == "pass" for r in rows) and torch.get_default_dtype() == torch.float32


def test_testing_runs_the_same_return_value_checks() -> None:
    from mlsgd_dsl.api import CorrectionStrategy, DataSource
    from mlsgd_dsl.data.synthetic import SYNTHETIC
    from mlsgd_dsl.testing import check_data_source, check_strategy

    [row] = check_strategy(CorrectionStrategy("c.nothing", NoOptions, lambda options: None))
    assert row.status == "fail" and row.detail == ("correction c.nothing: create returned None, "
                                                   "not a correction strategy")
    assert [r.status for r in check_strategy("stochastic", {"fraction": 0.5})] == ["pass"]
    wrong = DataSource("c.tuple", SYNTHETIC.options, lambda options, context: (1, 2),
                       SYNTHETIC.shape)
    rows = check_data_source(wrong, {"train": 8, "test": 8})
    assert [r.status for r in rows] == ["pass", "fail"]
    assert "load returned tuple, not mlsgd_dsl.api.RawData" in rows[1].detail
    rows = check_data_source("synthetic", {"train": 8, "test": 8, "size": 8})
    assert [r.status for r in rows] == ["pass", "pass"], rows
