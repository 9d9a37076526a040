"""Broken third-party plugins, installed from entry points: each is named in one message
``plugin NAME (DIST VERSION): what went wrong``, and a run goes on without it (the file does not
use it) or stops with that message (it does: exit 2, or exit 1 with a failing row for operators
that are wrong). Plus blocking by name and turning entry-point loading off.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest

from mlsgd_dsl.registry import PluginWarning, build_registry


@pytest.fixture(autouse=True)
def _plugin_warnings_recorded() -> Iterator[list[warnings.WarningMessage]]:
    """Every test here breaks plugins on purpose: keep their PluginWarnings out of the summary.

    (``cli.main`` adds a ``default`` filter for mlsgd_dsl's warnings, which beats pytest's
    ``filterwarnings`` marks; a recording context around the test beats both.)
    """
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record

HEADER = """
import torch
from mlsgd_dsl.api import GroupOperator, NoOptions, TransferRule
from mlsgd_dsl.hookspecs import hookimpl

MLSGD_DSL_API = ">=1.0"


class Copy(GroupOperator):
    '''P = R = Pᵀ = I on tensors of the same shape (a correct rule to break below).'''

    def prolongate(self, coarse):
        return {n: coarse[n].clone() for n in self.spec.fine}

    def restrict(self, fine):
        return {n: fine[n].clone() for n in self.spec.coarse}

    def transpose(self, fine):
        return {n: fine[n].clone() for n in self.spec.coarse}


def rule(name, operator=Copy):
    return TransferRule(name=name, options=NoOptions, bind=lambda spec, options: operator(spec))
"""

PLUGINS = {
    "import_error": "import mlsgd_no_such_module_anywhere\n",
    "hook_raises": HEADER + """
@hookimpl
def mlsgd_transfer_rules():
    raise RuntimeError("boom in the hook")
""",
    "duplicate": HEADER + """
@hookimpl
def mlsgd_transfer_rules():
    return [rule("dup.mine"), rule("identity")]
""",
    "bind_raises": HEADER + """
def explode(spec, options):
    raise KeyError("no such layer")


@hookimpl
def mlsgd_transfer_rules():
    return [TransferRule(name="bad.bind", options=NoOptions, bind=explode)]
""",
    "wrong_shapes": HEADER + """
class ShortP(Copy):
    def prolongate(self, coarse):
        return {n: coarse[n][:-1].clone() for n in self.spec.fine}


class ShortR(Copy):
    def restrict(self, fine):
        return {n: fine[n][:-1].clone() for n in self.spec.coarse}


@hookimpl
def mlsgd_transfer_rules():
    return [rule("bad.shapes", ShortP), rule("bad.r_shapes", ShortR)]
""",
    "wrong_adjoint": HEADER + """
class Doubled(Copy):
    def transpose(self, fine):
        return {n: 2 * fine[n] for n in self.spec.coarse}


@hookimpl
def mlsgd_transfer_rules():
    return [rule("bad.adjoint", Doubled)]
""",
    "prolongate_raises": HEADER + """
class Raises(Copy):
    def prolongate(self, coarse):
        raise ValueError("cannot prolongate today")


@hookimpl
def mlsgd_transfer_rules():
    return [rule("bad.raises", Raises)]
""",
    "good": HEADER + """
@hookimpl
def mlsgd_transfer_rules():
    return [rule("good.copy")]
""",
    "future_api": HEADER.replace('">=1.0"', '">=2.0"') + """
@hookimpl
def mlsgd_transfer_rules():
    return [rule("future.copy")]
""",
}


def hierarchy(rule: str | None = None) -> str:
    """A two-level depth hierarchy (validates in about a second); ``rule`` moves ``fc.bias``."""
    rules = '"blocks.*.layers.*" = "depth.constant"'
    if rule:
        rules += f', "fc.bias" = "{rule}"'
    return f"""
        name = "isolation"
        [data]
        source = "synthetic"
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
        default = "identity"
        rules = {{ {rules} }}
        [mlsgd]
        correction = "none"
        """


@pytest.fixture
def plugin(install_plugin: Callable[..., str]) -> Callable[[str], str]:
    """``plugin(kind)`` installs PLUGINS[kind] as entry point ``kind`` of dist ``mlsgd_KIND``
    0.1; returns the label every message about it starts with.

    (Underscores, not dashes, in the distribution name: the fixture names the folder
    ``DIST-VERSION.dist-info`` and importlib.metadata reads the name up to the first dash, as
    pip's normalised ``mlsgd_good-0.1.dist-info`` expects.)"""

    def install(kind: str) -> str:
        dist = "mlsgd_" + kind
        install_plugin(PLUGINS[kind], ep=kind, dist=dist, version="0.1")
        return f"plugin {kind} ({dist} 0.1)"

    return install


# --------------------------------------------------------------------------- a plugin that works


def test_an_installed_plugin_is_listed_and_usable(plugin, run_cli, tmp_hierarchy) -> None:
    plugin("good")
    rc, out, _ = run_cli(["plugins"])
    assert rc == 0
    assert "good  [mlsgd_good 0.1]" in out and "transfer rules: good.copy" in out
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy("good.copy"))])
    assert rc == 0, out + err
    assert "fc.bias [good.copy]: adjoint" in out


# --------------------------------------------------------------------------- import error


def test_import_error_is_reported_by_name(plugin) -> None:
    label = plugin("import_error")
    with pytest.warns(PluginWarning) as record:
        reg = build_registry()
    message = reg.broken["import_error"]
    assert message.startswith(f"{label}: failed to import ")
    assert "ModuleNotFoundError" in message and "mlsgd_no_such_module_anywhere" in message
    assert any(str(w.message) == message for w in record)
    assert "identity" in reg.names("transfer rules")  # the others keep working


def test_import_error_does_not_stop_a_file_that_does_not_use_it(plugin, run_cli,
                                                                tmp_hierarchy) -> None:
    label = plugin("import_error")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy())])
    assert rc == 0, out + err
    assert "0 failed" in out
    rc, out, _ = run_cli(["plugins"])
    assert rc == 0 and f"BROKEN {label}: failed to import" in out


def test_import_error_stops_a_file_that_uses_it(plugin, run_cli, tmp_hierarchy) -> None:
    label = plugin("import_error")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy("import_error.rule"))])
    assert rc == 2 and not out
    assert "no transfer rule named 'import_error.rule'" in err
    assert f"{label}: failed to import" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- exceptions in hooks


def test_exception_in_a_registration_hook(plugin, run_cli, tmp_hierarchy) -> None:
    label = plugin("hook_raises")
    reg = build_registry()
    assert reg.broken["hook_raises"] == (f"{label}: hook mlsgd_transfer_rules raised "
                                         "RuntimeError: boom in the hook")
    assert "hook_raises" not in [p.plugin for p in reg.provided]
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy())])
    assert rc == 0, out + err
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy("hook_raises.rule"))])
    assert rc == 2 and f"{label}: hook mlsgd_transfer_rules raised RuntimeError" in err


def test_exception_while_binding_stops_with_the_plugin_named(plugin, run_cli,
                                                             tmp_hierarchy) -> None:
    label = plugin("bind_raises")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy("bad.bind"))])
    assert rc == 2 and not out
    assert (f"{label}: rule 'bad.bind' raised KeyError while binding 'fc.bias' on "
            "coarse -> fine") in err
    assert "transfer.rules.\"fc.bias\"" in err  # the key path of the file that uses it
    assert "Traceback" not in err


def test_exception_in_an_operator_is_a_failing_row(plugin, run_cli, tmp_hierarchy) -> None:
    label = plugin("prolongate_raises")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy("bad.raises"))])
    assert rc == 1, out + err
    row = next(line for line in out.splitlines() if "[bad.raises]: operators" in line)
    assert "fail" in row and f"{label}: raised ValueError: cannot prolongate today" in row


# --------------------------------------------------------------------------- duplicate names


def test_a_name_shared_with_a_builtin_is_refused_until_one_is_blocked(plugin, run_cli,
                                                                      tmp_hierarchy) -> None:
    label = plugin("duplicate")
    reg = build_registry()
    assert "duplicate" not in reg.broken  # the plugin itself loads
    assert "dup.mine" in reg.names("transfer rules")  # its unique names are usable
    assert [e.label() for e in reg.conflicts["transfer rules"]["identity"]] == [
        "plugin transfers (built-in)", label]
    # a file using 'identity' (as the default rule) names both providers and how to pick one
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy())])
    assert rc == 2 and not out
    assert ("transfer.default: transfer rule 'identity' is provided by 2 plugins: plugin "
            f"transfers (built-in) and {label}") in err
    assert "-p no:transfers or -p no:duplicate" in err and "Traceback" not in err
    # picking one: block the other
    rc, out, err = run_cli(["-p", "no:duplicate", "validate", tmp_hierarchy(hierarchy())])
    assert rc == 0, out + err
    rc, out, err = run_cli(["plugins"])
    assert rc == 0 and "identity (CONFLICT)" in out
    assert f"CONFLICT transfer rule 'identity' is provided by 2 plugins: plugin transfers " \
           f"(built-in) and {label}" in out


def test_duplicate_between_two_installed_plugins_whoever_installs_first(
        plugin, install_plugin, run_cli, tmp_hierarchy) -> None:
    # Before: the distribution whose name sorted first won and the other ran under its name.
    # Install order and name order are both varied: neither may decide.
    install_plugin(PLUGINS["good"], ep="good_again", dist="mlsgd_aaa_first", version="0.2")
    label = plugin("good")
    reg = build_registry()
    assert "good.copy" not in reg.items["transfer rules"]
    entries = reg.conflicts["transfer rules"]["good.copy"]
    assert sorted(e.label() for e in entries) == [
        "plugin good (mlsgd_good 0.1)", "plugin good_again (mlsgd_aaa_first 0.2)"]
    assert not reg.broken
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy("good.copy"))])
    assert rc == 2 and "mlsgd_aaa_first 0.2" in err and "mlsgd_good 0.1" in err
    rc, out, err = run_cli(["-p", "no:good_again", "validate",
                            tmp_hierarchy(hierarchy("good.copy"))])
    assert rc == 0, out + err
    row = next(line for line in out.splitlines() if line.startswith("rule good.copy "))
    assert "mlsgd_good 0.1 (plugin good)" in row and label.startswith("plugin good ")


# --------------------------------------------------------------------------- wrong operators


def test_wrong_output_shapes_fail_validation_with_the_plugin_named(plugin, run_cli,
                                                                   tmp_hierarchy) -> None:
    label = plugin("wrong_shapes")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy("bad.r_shapes"))])
    assert rc == 1, out + err
    row = next(line for line in out.splitlines() if "[bad.r_shapes]: shapes" in line)
    assert "fail" in row
    assert f"{label}: returns wrong shapes: R gives fc.bias: (2,), expected (3,)" in row
    # A wrong P: validation.py runs autograd's Pᵀ before its shape check today, so the row may
    # be `operators` (RuntimeError from autograd) rather than `shapes`; either names the plugin.
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy("bad.shapes"))])
    assert rc == 1, out + err
    rows = [line for line in out.splitlines() if "[bad.shapes]:" in line]
    assert rows and all("fail" in r and label in r for r in rows)


def test_wrong_adjoint_fails_validation_with_the_plugin_named(plugin, run_cli,
                                                              tmp_hierarchy) -> None:
    label = plugin("wrong_adjoint")
    rc, out, err = run_cli(["validate", tmp_hierarchy(hierarchy("bad.adjoint"))])
    assert rc == 1, out + err
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines() if "[bad.adjoint]"
            in line}
    adjoint = rows["coarse->fine fc.bias [bad.adjoint]: adjoint"]
    assert "fail" in adjoint and f"{label}: wrong P*: P* vs autograd 1.0e+00" in adjoint
    assert "pass" in rows["coarse->fine fc.bias [bad.adjoint]: R∘P = I"]


def test_plugin_needing_a_newer_api_is_refused(plugin) -> None:
    label = plugin("future_api")
    reg = build_registry()
    assert reg.broken["future_api"] == (f"{label}: needs plugin API >=2.0, this mlsgd-dsl "
                                        "provides 1.1")
    assert "future.copy" not in reg.names("transfer rules")


# --------------------------------------------------------------------------- control


def test_block_by_name_on_the_command_line(plugin, run_cli, tmp_hierarchy) -> None:
    plugin("good")
    label = plugin("import_error")
    rc, out, _ = run_cli(["-p", "no:import_error", "-p", "no:good", "plugins"])
    assert rc == 0
    assert "BROKEN" not in out and label not in out
    assert "blocked: good, import_error" in out
    assert "good.copy" not in out and "transfer rules: identity" in out
    rc, _, err = run_cli(["-p", "no:good", "validate", tmp_hierarchy(hierarchy("good.copy"))])
    assert rc == 2 and "no transfer rule named 'good.copy'" in err
    rc, _, err = run_cli(["-p", "good", "plugins"])
    assert rc == 2 and "expected -p no:NAME" in err


def test_block_by_name_from_the_environment(plugin, run_cli, monkeypatch) -> None:
    plugin("good")
    label = plugin("import_error")
    monkeypatch.setenv("MLSGD_DSL_BLOCK_PLUGINS", "import_error, good")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)  # nothing broken is even imported
        reg = build_registry()
    assert reg.blocked == {"import_error", "good"} and not reg.broken
    rc, out, _ = run_cli(["plugins"])
    assert rc == 0 and label not in out and "blocked: good, import_error" in out


def test_a_builtin_can_be_blocked_too() -> None:
    reg = build_registry(block=["data"])
    assert reg.names("data sources") == []
    assert "identity" in reg.names("transfer rules")


def test_autoload_off(plugin, run_cli, monkeypatch, tmp_hierarchy) -> None:
    plugin("good")
    plugin("import_error")
    on = build_registry()
    assert "good.copy" in on.names("transfer rules") and "import_error" in on.broken
    monkeypatch.setenv("MLSGD_DSL_DISABLE_PLUGIN_AUTOLOAD", "1")
    off = build_registry()
    assert "good.copy" not in off.names("transfer rules") and not off.broken
    assert {p.plugin for p in off.provided} >= {"models", "transfers", "data", "corrections"}
    assert all(p.distribution is None for p in off.provided)  # built-ins only
    rc, out, _ = run_cli(["plugins"])
    assert rc == 0 and "good" not in out and "BROKEN" not in out
    monkeypatch.delenv("MLSGD_DSL_DISABLE_PLUGIN_AUTOLOAD")
    rc, out, _ = run_cli(["--no-plugin-autoload", "plugins"])
    assert rc == 0 and "good.copy" not in out and "BROKEN" not in out
    rc, _, err = run_cli(["--no-plugin-autoload", "validate",
                          tmp_hierarchy(hierarchy("good.copy"))])
    assert rc == 2 and "no transfer rule named 'good.copy'" in err


def test_explicit_plugins_still_load_with_autoload_off(install_plugin) -> None:
    import importlib

    module = install_plugin(PLUGINS["good"], ep="good", dist="mlsgd_good")
    reg = build_registry(autoload=False, extra_plugins=[("mine", importlib.import_module(module))])
    entry = reg.get("transfer rules", "good.copy")
    assert entry.plugin == "mine" and entry.label() == "plugin mine (mlsgd_good 0.1)"
