"""The plugin registry: installed entry points, broken plugins, duplicates, blocking, autoload,
API versions."""

from __future__ import annotations

import functools
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest

import mlsgd_dsl
from mlsgd_dsl.api import Architecture, NoOptions, TransferRule
from mlsgd_dsl.errors import ConfigError
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.registry import (
    BLOCK_ENV,
    DISABLE_AUTOLOAD_ENV,
    PluginWarning,
    _api_compatible,
    build_registry,
)
from mlsgd_dsl.transfers.identity import bind_identity

pytestmark = pytest.mark.usefixtures("one_thread")

QUICKSTART = Path(__file__).resolve().parents[1] / "hierarchies" / "quickstart.toml"


_PACKAGES = functools.cache(metadata.packages_distributions)


@pytest.fixture(autouse=True)
def _fast_distribution_lookup(monkeypatch) -> None:
    """``_dist_of`` scans every installed distribution per extra plugin: do it once here."""
    monkeypatch.setattr(metadata, "packages_distributions", _PACKAGES)

PLUGIN = """
from mlsgd_dsl.api import NoOptions, TransferRule
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.transfers.identity import bind_identity

MLSGD_DSL_API = "{api}"
EVENTS = []


@hookimpl
def mlsgd_transfer_rules():
    return [TransferRule("testplug.copy", NoOptions, bind_identity, "identity, as a plugin")]


@hookimpl
def mlsgd_epoch_end(run, record):
    EVENTS.append(record)
"""


def plugin_source(api: str = ">=1.0") -> str:
    return PLUGIN.format(api=api)


def quiet_registry(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # other installed plugins may be broken
        return build_registry(**kwargs)


def provided(reg, plugin: str):
    return next((p for p in reg.provided if p.plugin == plugin), None)


def uses_rule(reg, rule: str) -> set[str]:
    h = mlsgd_dsl.load(QUICKSTART, overrides={"transfer.default": rule}, registry=reg)
    c = mlsgd_dsl.compile(h)
    return {g.rule for e in c.graph.edges for g in c.edge(*e).full}


# --------------------------------------------------------------------------- entry points


def test_installed_entry_point_plugin_is_listed_and_usable(install_plugin) -> None:
    module = install_plugin(plugin_source())
    reg = quiet_registry()
    mine = provided(reg, "testplug")
    assert mine is not None, [p.plugin for p in reg.provided]
    assert (mine.distribution, mine.version) == ("testplugin", "0.1")
    assert mine.items == {"transfer rules": ["testplug.copy"]}
    entry = reg.get("transfer rules", "testplug.copy")
    assert entry.label() == "plugin testplug (testplugin 0.1)"
    assert "testplug" not in reg.broken
    assert uses_rule(reg, "testplug.copy") == {"depth.constant", "testplug.copy"}
    # event hooks reach it through the same manager
    reg.hook().mlsgd_epoch_end(run=None, record={"epoch": 1})
    assert sys.modules[module].EVENTS == [{"epoch": 1}]


@pytest.mark.parametrize("body", ["raise ImportError('needs foo')", "def broken(:\n",
                                  "raise SystemExit(3)"], ids=["import", "syntax", "exit"])
def test_plugin_that_fails_to_import_is_named_and_the_rest_work(install_plugin, body) -> None:
    install_plugin(body)
    with pytest.warns(PluginWarning, match=r"plugin testplug \(testplugin 0.1\): failed to "
                                           r"import 'mlsgd_testplugin_\d+'"):
        reg = build_registry()
    assert "failed to import" in reg.broken["testplug"]
    assert provided(reg, "testplug") is None
    assert uses_rule(reg, "identity") == {"depth.constant", "identity"}
    with pytest.raises(ConfigError, match=r"transfer.default: no transfer rule named "
                                          r"'testplug.copy'.*Plugins that failed to load: "
                                          r"plugin testplug"):
        uses_rule(reg, "testplug.copy")


def test_plugin_needing_a_newer_api_is_refused_by_name(install_plugin) -> None:
    install_plugin(plugin_source(api=">=2.0"))
    with pytest.warns(PluginWarning, match=r"plugin testplug \(testplugin 0.1\): needs plugin "
                                           r"API >=2.0, this mlsgd-dsl provides 1.1"):
        reg = build_registry()
    assert "testplug.copy" not in reg.names("transfer rules")
    assert reg.manager.get_plugin("testplug") is None


@pytest.mark.parametrize(("need", "refused"), [
    (None, None), (">=1.0", None), ("==1.1", None), ("1.0", None), ("1", None),
    ("==1.0", "needs plugin API ==1.0"),
    (">=2.0", "needs plugin API >=2.0"), (">=1.2", "needs plugin API >=1.2"),
    ("==0.9", "needs plugin API ==0.9"), ("banana", "which is not a version"),
])
def test_api_requirements(need, refused) -> None:
    plugin = type("Plugin", (), {"MLSGD_DSL_API": need})()
    reason = _api_compatible(plugin)
    assert (reason is None) if refused is None else (refused in reason)


# --------------------------------------------------------------------------- misbehaving plugins


class Flaky:
    """Registers a rule, then its second registration hook raises: all or nothing."""

    @hookimpl
    def mlsgd_transfer_rules(self):
        return [TransferRule("flaky.copy", NoOptions, bind_identity)]

    @hookimpl
    def mlsgd_architectures(self):
        raise RuntimeError("kaput")


class Duplicate:
    @hookimpl
    def mlsgd_transfer_rules(self):
        return [TransferRule("identity", NoOptions, bind_identity)]


class DuplicateItself:
    @hookimpl
    def mlsgd_transfer_rules(self):
        return [TransferRule("twice", NoOptions, bind_identity)] * 2


class Nameless:
    @hookimpl
    def mlsgd_architectures(self):
        return [Architecture("", NoOptions, lambda options, context: None)]


class WrongArguments:
    """A valid event hook, then one whose arguments do not match the hookspec."""

    calls: list = []

    @hookimpl
    def mlsgd_cycle_end(self, run, cycle):
        self.calls.append(cycle)

    @hookimpl
    def mlsgd_epoch_end(self, run, rec):
        pass


REGISTER_BUG = ("BUG: registry.build_registry: when pm.register() raises (hookimpl "
                "validation), pluggy has already registered the plugin and its earlier hooks; "
                "the plugin is reported broken but never unregistered")


class Healthy:
    @hookimpl
    def mlsgd_transfer_rules(self):
        return [TransferRule("healthy.copy", NoOptions, bind_identity)]


@pytest.mark.parametrize(("plugin", "message"), [
    (Flaky(), r"plugin flaky: hook mlsgd_architectures raised RuntimeError: kaput"),
    (DuplicateItself(), r"plugin duplicateitself: registers transfer rule 'twice', which "
                        r"itself already provides"),
    (Nameless(), r"plugin nameless: hook mlsgd_architectures returned .* which has no name"),
    pytest.param(WrongArguments(), r"(?s)plugin wrongarguments: cannot be registered: .*'rec'"),
], ids=["hook-raises", "duplicate-within", "no-name", "wrong-arguments"])
def test_misbehaving_plugin_is_left_out_by_name(plugin, message) -> None:
    name = type(plugin).__name__.lower()
    with pytest.warns(PluginWarning, match=message):
        reg = build_registry(extra_plugins=[(name, plugin), ("healthy", Healthy())],
                             autoload=False)
    assert list(reg.broken) == [name]
    assert reg.manager.get_plugin(name) is None
    assert provided(reg, name) is None
    assert "flaky.copy" not in reg.names("transfer rules")  # staged records are dropped too
    assert reg.get("transfer rules", "identity").plugin == "transfers"
    assert provided(reg, "healthy").items == {"transfer rules": ["healthy.copy"]}


def test_plugin_that_cannot_be_registered_gets_no_events() -> None:
    with pytest.warns(PluginWarning, match="cannot be registered"):
        reg = build_registry(extra_plugins=[("wrongarguments", WrongArguments())],
                             autoload=False)
    reg.hook().mlsgd_cycle_end(run=None, cycle=1)
    assert WrongArguments.calls == []


def test_misspelt_hook_is_reported() -> None:
    class Typo:
        @hookimpl
        def mlsgd_transfer_rule(self):
            return [TransferRule("typo.copy", NoOptions, bind_identity)]

    with pytest.warns(PluginWarning, match="typo"):
        build_registry(extra_plugins=[("typo", Typo())], autoload=False)


def test_unknown_name_lists_what_is_installed(registry) -> None:
    with pytest.raises(ConfigError, match=r"^f.toml: a.b: no transfer rule named 'nope' is "
                                          r"installed \(known: .*depth.constant, "
                                          r"depth.linear, identity"):
        registry.get("transfer rules", "nope", file="f.toml", path=("a", "b"))
    assert "none" in registry.names("corrections")
    assert registry.names("transfer rules") == sorted(registry.names("transfer rules"))


# --------------------------------------------------------------------------- blocking, autoload


def test_blocking_a_built_in(registry) -> None:
    reg = build_registry(block=["transfers", " "], autoload=False)
    assert reg.blocked == {"transfers"}
    assert provided(reg, "transfers") is None and reg.names("transfer rules") == []
    assert reg.manager.is_blocked("transfers")
    with pytest.raises(ConfigError, match=r"transfer.default: no transfer rule named "
                                          r"'identity' is installed \(known: none installed\)"):
        mlsgd_dsl.load(QUICKSTART, registry=reg)
    assert "identity" in registry.names("transfer rules")  # other registries are unaffected


def test_blocking_an_entry_point(install_plugin) -> None:
    install_plugin(plugin_source())
    reg = quiet_registry(block=["testplug"])
    assert provided(reg, "testplug") is None and "testplug" not in reg.broken
    assert provided(reg, "transfers") is not None


def test_blocking_from_the_environment(install_plugin, monkeypatch) -> None:
    install_plugin(plugin_source())
    monkeypatch.setenv(BLOCK_ENV, "testplug, data")
    reg = quiet_registry(block=["models"])
    assert reg.blocked == {"testplug", "data", "models"}
    assert {p.plugin for p in reg.provided} >= {"transfers"}
    assert not {"testplug", "data", "models"} & {p.plugin for p in reg.provided}
    assert reg.names("data sources") == []
    assert "ruthotto-resnet" not in reg.names("architectures")


def test_autoload_off(install_plugin, monkeypatch) -> None:
    install_plugin(plugin_source())
    assert provided(quiet_registry(), "testplug") is not None
    assert provided(quiet_registry(autoload=False), "testplug") is None
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    reg = quiet_registry()
    assert provided(reg, "testplug") is None
    assert "identity" in reg.names("transfer rules")  # built-ins are not entry points
    assert provided(quiet_registry(autoload=True), "testplug") is not None
