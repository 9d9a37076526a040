"""What event hooks see (:class:`RunView`) and how they are called (:class:`EventHooks`).

Event hooks get a frozen, read-only view of the run, built afresh for every call — never the
trainer, so nothing of the runner's inside is plugin API. Dispatch goes through pluggy's hook
caller, so ``tryfirst`` / ``trylast`` and wrappers behave as in any pluggy project; only rank 0
calls the hooks (under torchrun). A hook that raises ends the run with one line naming the
plugin (:class:`~mlsgd_dsl.errors.PluginFailure`); the plugin is found from the traceback,
which passes through the implementation pluggy called.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import nn

from ..errors import PluginFailure


@dataclass(frozen=True)
class RunView:
    """A read-only view of a run, handed to the event hooks (see :mod:`mlsgd_dsl.hookspecs`).

    Values are copies taken when the hook is called, except ``model`` (the finest network,
    live: read it, do not change it — copy ``model.state_dict()`` to keep weights) and
    ``config`` (a read-only mapping of the resolved configuration).
    """

    #: the hierarchy's ``name``
    name: str
    #: ``"mlsgd"`` or ``"sgd"``
    method: str
    #: the run folder (``metrics.csv``, ``metrics.jsonl``, ``checkpoint.pt``, ``summary.json``)
    out_dir: Path
    #: the checkpoint file (None with ``report.checkpoint = "none"``)
    checkpoint: Path | None
    #: the cycle in progress (0-based; after the last cycle: the last one)
    cycle: int
    #: cycles completed (and checkpointed)
    cycles_done: int
    #: cycles planned (``mlsgd.cycles``; ``sgd``: epochs of the finest level, rounded up)
    cycles: int
    #: the level of the latest metrics row (None before the first)
    level: str | None
    #: epochs trained over all levels so far (the x axis of the metrics)
    global_epoch: float
    #: the latest metrics row (None before the first), read-only
    record: Mapping[str, Any] | None
    #: the finest level's name
    finest: str
    #: the finest level's network (live; read access only)
    model: nn.Module
    #: training time and wall time so far, in seconds (see ``docs/runs.md``)
    train_time: float
    wall_time: float
    #: why the run stopped early ("time budget", "diverged on level …"), or None
    stop_reason: str | None
    #: the resolved configuration (read-only mapping) and its hash
    config: Mapping[str, Any]
    config_hash: str
    #: the levels, coarsest first: read-only mappings with ``level``, ``h``, ``parameters``,
    #: ``flops`` (forward FLOPs per image, or None) and ``input`` (C, H, W)
    levels: tuple[Mapping[str, Any], ...] = ()


def read_only(mapping: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if mapping is None else MappingProxyType(dict(mapping))


def frozen(value: Any) -> Any:
    """A deep read-only copy of a JSON-like value: mappings → mappingproxy, lists → tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(frozen(v) for v in value)
    return value


def plugin_label(registry: Any, impl: Any) -> str:
    """``plugin NAME (DIST VERSION)`` of a hook implementation, from the registry's records."""
    from ..registry import Entry, _dist_of

    name = impl.plugin_name
    for provided in getattr(registry, "provided", []):
        if provided.plugin == name:
            return Entry(None, name, provided.distribution, provided.version).label()
    dist, version = _dist_of(impl.plugin)
    if dist:
        return Entry(None, name, dist, version).label()
    if name.isdigit():  # registered without a name: say what it is
        name = getattr(impl.plugin, "__name__", None) or type(impl.plugin).__qualname__
    module = getattr(impl.plugin, "__name__", None) or type(impl.plugin).__module__
    return f"plugin {name} (registered at run time from {module})"


def _culprit(caller: Any, exc: BaseException) -> Any | None:
    """The hook implementation the exception came out of (the outermost one on its way)."""
    impls = caller.get_hookimpls()
    codes = {}
    for impl in impls:
        code = getattr(impl.function, "__code__", None)
        if code is not None:
            codes[code] = impl
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code in codes:
            return codes[frame.f_code]
    return impls[0] if len(impls) == 1 else None


class EventHooks:
    """Calls the event hooks of a registry (or nothing without one, or off rank 0)."""

    def __init__(self, registry: Any, *, enabled: bool = True) -> None:
        self.registry = registry
        self.relay = registry.hook() if registry is not None and enabled else None

    def wanted(self, hook_name: str) -> bool:
        """Whether any plugin implements ``hook_name`` (no view is built otherwise)."""
        return self.relay is not None and bool(getattr(self.relay, hook_name).get_hookimpls())

    def emit(self, hook_name: str, *, resume_hint: str = "", **kwargs: Any) -> None:
        """Call ``hook_name`` with ``kwargs``; an exception → :class:`PluginFailure`."""
        if self.relay is None:
            return
        caller = getattr(self.relay, hook_name)
        try:
            caller(**kwargs)
        except Exception as exc:
            impl = _culprit(caller, exc)
            who = plugin_label(self.registry, impl) if impl is not None else "a plugin"
            raise PluginFailure(f"{who}: hook {hook_name} raised {type(exc).__name__}: "
                                f"{exc}{resume_hint}") from None
