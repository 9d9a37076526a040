"""The runner's parts: process-wide settings entered and restored around a run, the event hooks'
read-only view and their dispatch through pluggy, checkpoint formats."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from _runner_nets import compiled, hierarchy_text, trainer

import mlsgd_dsl
from mlsgd_dsl.api import Check, CheckRow
from mlsgd_dsl.errors import ConfigError, PluginFailure, RunError
from mlsgd_dsl.hookspecs import hookimpl
from mlsgd_dsl.registry import build_registry
from mlsgd_dsl.runner.checkpoint import load_checkpoint, save_checkpoint
from mlsgd_dsl.runner.events import RunView
from mlsgd_dsl.runner.process import flush_denormal_enabled
from mlsgd_dsl.runner.run import Trainer, run

FAST = {"mlsgd.eval.every": "cycle", "mlsgd.cycles": 1, "mlsgd.epochs": 0.25}


def _global_state() -> tuple:
    return (torch.get_num_threads(), flush_denormal_enabled(),
            torch.get_rng_state().clone(), random.getstate())


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3]


@pytest.fixture
def caller_state():
    """A caller whose settings differ from every run's: 2 threads, denormals kept, seed 1234."""
    torch.set_num_threads(2)
    torch.set_flush_denormal(False)
    torch.manual_seed(1234)
    random.seed(1234)
    yield _global_state()
    torch.set_num_threads(1)  # the suite's setting (conftest)


def test_constructing_a_trainer_changes_nothing_global(tmp_path: Path, caller_state) -> None:
    t = trainer(tmp_path, {**FAST, "mlsgd.threads": 1})
    assert _same(_global_state(), caller_state)
    t.fit()
    assert _same(_global_state(), caller_state)


def test_a_failed_validation_changes_nothing_global(tmp_path: Path, caller_state) -> None:
    failing = Check(name="always fails", run=lambda c: [CheckRow("always", "fail", "by design")])

    class Plugin:
        @hookimpl
        def mlsgd_checks(self):
            return [failing]

    reg = build_registry(autoload=False, extra_plugins=[("failing-check", Plugin())])
    h = mlsgd_dsl.loads(hierarchy_text(), file="tiny.toml", registry=reg, overrides=FAST)
    with pytest.raises(ConfigError, match="fails validation"):
        run(mlsgd_dsl.compile(h), out_dir=tmp_path, quiet=True)
    assert _same(_global_state(), caller_state)


def test_a_refused_resume_changes_nothing_global(tmp_path: Path, caller_state) -> None:
    with pytest.raises(RunError, match="not a run folder"):
        Trainer(compiled(FAST), resume=tmp_path / "absent", quiet=True, validate=False)
    assert _same(_global_state(), caller_state)


def test_a_run_continues_its_own_random_streams(tmp_path: Path) -> None:
    """Between construction and fit() the caller's generators may move: the run's do not."""
    a = trainer(tmp_path / "a", FAST)
    a.fit()
    b = trainer(tmp_path / "b", FAST)
    torch.rand(1000)
    random.random()
    b.fit()
    for p, q in zip(a.levels["fine"].params, b.levels["fine"].params):
        assert torch.equal(p, q)


def test_event_hooks_get_a_read_only_view_through_pluggy(tmp_path: Path) -> None:
    order: list[str] = []
    views: list[RunView] = []

    class Late:
        @hookimpl(trylast=True)
        def mlsgd_cycle_end(self, run, cycle):
            order.append("late")

    class Early:
        @hookimpl(tryfirst=True)
        def mlsgd_cycle_end(self, run, cycle):
            order.append("early")
            views.append(run)

        @hookimpl
        def mlsgd_epoch_end(self, run, record):
            with pytest.raises(TypeError):
                record["val_acc"] = 1.0  # type: ignore[index]
            assert run.record == record and run.level == record["level"]

    class Wrapper:
        @hookimpl(wrapper=True)
        def mlsgd_cycle_end(self, run, cycle):
            order.append("wrapper in")
            result = yield
            order.append("wrapper out")
            return result

    t = trainer(tmp_path, {**FAST, "mlsgd.cycles": 2})
    names = ["late-test", "early-test", "wrapper-test"]
    for name, plugin in zip(names, (Early(), Late(), Wrapper())):  # registration order
        t.c.registry.manager.register(plugin, name=name)
    try:
        t.fit()
    finally:
        for name in names:
            t.c.registry.manager.unregister(name=name)
    assert order == ["wrapper in", "early", "late", "wrapper out"] * 2
    view = views[-1]
    assert isinstance(view, RunView) and (view.cycle, view.cycles_done, view.cycles) == (1, 2, 2)
    assert view.out_dir == tmp_path and view.checkpoint == tmp_path / "checkpoint.pt"
    assert view.model is t.levels["fine"].model and view.finest == "fine"
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.cycle = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        view.config["name"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        view.config["mlsgd"]["cycles"] = 9  # type: ignore[index]


def test_a_raising_hook_is_named_among_several(tmp_path: Path) -> None:
    class Quiet:
        @hookimpl
        def mlsgd_cycle_end(self, run, cycle):
            pass

    class Loud:
        @hookimpl
        def mlsgd_cycle_end(self, run, cycle):
            raise ValueError("boom")

    t = trainer(tmp_path, FAST)
    for name, plugin in (("quiet-test", Quiet()), ("loud-test", Loud()), ("calm-test", Quiet())):
        t.c.registry.manager.register(plugin, name=name)
    try:
        with pytest.raises(PluginFailure) as err:
            t.fit()
    finally:
        for name in ("quiet-test", "loud-test", "calm-test"):
            t.c.registry.manager.unregister(name=name)
    assert "plugin loud-test (registered at run time" in str(err.value)
    assert "hook mlsgd_cycle_end raised ValueError: boom" in str(err.value)


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(tmp_path: Path) -> None:
    trainer(tmp_path, FAST).fit()
    path = tmp_path / "checkpoint.pt"
    ck = load_checkpoint(path)
    ck["format"] = 1
    del ck["strategy"]
    save_checkpoint(path, ck, keep_previous=False)
    with pytest.raises(RunError) as err:
        Trainer(compiled(FAST), resume=tmp_path, quiet=True, validate=False)
    message = str(err.value)
    assert "checkpoint format 1 cannot be resumed" in message and "\n" not in message
    assert "strategy's state" in message


EVENT_HOOKS = ("mlsgd_run_start", "mlsgd_epoch_end", "mlsgd_cycle_end", "mlsgd_run_end")


@pytest.mark.parametrize("name", EVENT_HOOKS)
def test_every_event_hook_parameter_is_typed_and_documented(name) -> None:
    import inspect

    from mlsgd_dsl import hookspecs

    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec)
    for param in inspect.signature(spec).parameters.values():
        assert param.annotation not in (inspect.Parameter.empty, "Any"), param
        assert f":param {param.name}:" in doc, (name, param.name)
    assert inspect.signature(spec).parameters["run"].annotation == "RunView"


def test_plugins_doc_lists_every_field_of_the_view() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text("utf-8")
    table = doc[doc.index("| field | meaning |"):]
    table = table[:table.index("\n\n")]
    for field in dataclasses.fields(RunView):
        assert f"`{field.name}`" in table, field.name


def test_plugins_doc_lists_every_member_of_the_strategy_host() -> None:
    from mlsgd_dsl.runner.corrections import CorrectionHost

    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text("utf-8")
    table = doc[doc.index("| member | what it gives |"):]
    table = table[:table.index("\n\n")]
    for member in (n for n in vars(CorrectionHost) if not n.startswith("_")):
        assert f"host.{member}" in table, member


def test_the_driver_implements_the_declared_hosts(tmp_path: Path) -> None:
    from mlsgd_dsl.runner.corrections import CorrectionHost, LevelView
    from mlsgd_dsl.runner.level import FixedHost, LevelHost

    t = trainer(tmp_path, FAST)
    for protocol, obj in ((CorrectionHost, t.driver), (LevelHost, t.driver),
                          (LevelHost, FixedHost()), (LevelView, t.levels["fine"])):
        for member in (n for n in vars(protocol) if not n.startswith("_")):
            assert hasattr(obj, member), (protocol.__name__, member)
