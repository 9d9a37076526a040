"""One pluggy PluginManager and the named things its plugins provide.

Built-in features are plugins registered exactly like third-party ones (pytest's model); third
party plugins come from the entry-point group ``mlsgd_dsl``. A plugin that fails to import, or
whose registration hook raises, is recorded as *broken* with a message and left out; the others
keep working. A hierarchy file that uses a name only a broken plugin would provide gets that
plugin's message instead of "unknown name".
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .api import API_VERSION, Provided

ENTRY_POINT_GROUP = "mlsgd_dsl"
DISABLE_AUTOLOAD_ENV = "MLSGD_DSL_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "MLSGD_DSL_BLOCK_PLUGINS"

BUILTIN_MODULES = (
    "mlsgd_dsl.builtins.models",
    "mlsgd_dsl.builtins.transfers",
    "mlsgd_dsl.builtins.data",
    "mlsgd_dsl.builtins.corrections",
    "mlsgd_dsl.builtins.tensorboard",
)

BUILTIN_NAMES = frozenset(m.rsplit(".", 1)[-1] for m in BUILTIN_MODULES)

# registration hook -> kind of record, as shown by `mlsgd-dsl plugins`
KINDS = {
    "mlsgd_transfer_rules": "transfer rules",
    "mlsgd_architectures": "architectures",
    "mlsgd_data_sources": "data sources",
    "mlsgd_coarsenings": "coarsenings",
    "mlsgd_corrections": "corrections",
    "mlsgd_checks": "checks",
}


class PluginWarning(UserWarning):
    """A plugin was left out (import failure, bad registration)."""


@dataclass
class Entry:
    """A named record and where it came from."""

    record: Any
    plugin: str
    distribution: str | None
    version: str | None

    def label(self) -> str:
        if self.distribution:
            dist = f"{self.distribution} {self.version}"
        else:
            dist = "built-in" if self.plugin in BUILTIN_NAMES else "not installed"
        return f"plugin {self.plugin} ({dist})"


@dataclass
class Registry:
    manager: pluggy.PluginManager
    items: dict[str, dict[str, Entry]] = field(
        default_factory=lambda: {k: {} for k in KINDS.values()})
    provided: list[Provided] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # plugin name -> message
    blocked: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ lookup

    def get(self, kind: str, name: str, *, file: str | None = None,
            path: Iterable[str | int] = ()) -> Entry:
        table = self.items[kind]
        if name in table:
            return table[name]
        from .errors import ConfigError

        hint = ""
        if self.blocked:
            hint += (f" Blocked plugins (-p no:NAME / {BLOCK_ENV}): "
                     f"{', '.join(sorted(self.blocked))}.")
        if self.broken:
            hint += " Plugins that failed to load: " + "; ".join(self.broken.values()) + "."
        known = ", ".join(sorted(table)) or "none installed"
        singular = kind[:-1] if kind.endswith("s") else kind
        raise ConfigError(f"no {singular} named {name!r} is installed (known: {known}).{hint}",
                          file=file, path=tuple(path))

    def names(self, kind: str) -> list[str]:
        return sorted(self.items[kind])

    def hook(self) -> Any:
        return self.manager.hook


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _dist_of(module_or_obj: Any) -> tuple[str | None, str | None]:
    name = getattr(module_or_obj, "__name__", "") or type(module_or_obj).__module__
    top = name.split(".")[0]
    try:
        for dist in _packages_distributions().get(top, []):
            return dist, metadata.version(dist)
    except Exception:  # metadata of a broken install must not take the registry down
        pass
    return None, None


def _api_compatible(plugin: Any) -> str | None:
    """Return a reason when the plugin needs an API version this core does not have."""
    need = getattr(plugin, "MLSGD_DSL_API", None)
    if not need:
        return None
    need = str(need).strip()
    major = int(API_VERSION.split(".")[0])
    minor = int(API_VERSION.split(".")[1])
    for op in (">=", "==", ""):
        if need.startswith(op):
            try:
                want = [int(x) for x in need[len(op):].strip().split(".")[:2]]
            except ValueError:
                return f"states MLSGD_DSL_API = {need!r}, which is not a version"
            want += [0] * (2 - len(want))
            ok = (want[0] == major and want[1] <= minor)
            if op == ">=":
                ok = want[0] == major and (want[0], want[1]) <= (major, minor)
            return None if ok else (f"needs plugin API {need}, this mlsgd-dsl provides "
                                    f"{API_VERSION}")
    return f"states MLSGD_DSL_API = {need!r}, expected e.g. '>=1.0'"


def build_registry(*, block: Iterable[str] = (), autoload: bool | None = None,
                   extra_plugins: Iterable[tuple[str, Any]] = ()) -> Registry:
    """Build the registry: built-ins, entry points (unless disabled) and ``extra_plugins``.

    ``block`` names plugins not to load (like pytest's ``-p no:NAME``); the environment
    variable ``MLSGD_DSL_BLOCK_PLUGINS`` (comma separated) adds to it.
    ``MLSGD_DSL_DISABLE_PLUGIN_AUTOLOAD=1`` turns off entry-point loading.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = {b.strip() for b in block if b.strip()}
    blocked |= {b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()}
    for name in blocked:
        pm.set_blocked(name)
    reg = Registry(manager=pm, blocked=blocked)

    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)

    candidates: list[tuple[str, Any, str | None, str | None]] = []
    for modname in BUILTIN_MODULES:
        short = modname.rsplit(".", 1)[-1]
        if short in blocked:
            continue
        try:
            candidates.append((short, importlib.import_module(modname), None, None))
        except ModuleNotFoundError as exc:
            if exc.name != modname:  # a built-in whose own import fails is a real bug
                raise
    if autoload:
        # Sorted, so which of two clashing plugins wins does not depend on install order.
        eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda e: ((e.dist.name if e.dist else ""), e.name))
        for ep in eps:
            if ep.name in blocked or pm.is_blocked(ep.name):
                continue
            dist = ep.dist.name if ep.dist else None
            ver = ep.dist.version if ep.dist else None
            try:
                obj = ep.load()
            except BaseException as exc:  # noqa: BLE001 - any import failure isolates the plugin
                if isinstance(exc, KeyboardInterrupt):
                    raise
                _broken(reg, ep.name, dist, ver, f"failed to import {ep.value!r}: "
                        f"{type(exc).__name__}: {exc}")
                continue
            candidates.append((ep.name, obj, dist, ver))
    candidates.extend((name, obj, *_dist_of(obj)) for name, obj in extra_plugins)

    for name, obj, dist, ver in candidates:
        if name in blocked:
            continue
        reason = _api_compatible(obj)
        if reason:
            _broken(reg, name, dist, ver, reason)
            continue
        try:
            pm.register(obj, name=name)
            pm.check_pending()  # a misspelt mlsgd_* hook would otherwise be ignored silently
        except Exception as exc:
            if pm.get_plugin(name) is not None or pm.is_registered(obj):
                pm.unregister(plugin=obj)
            _broken(reg, name, dist, ver, f"cannot be registered: {exc}")
            continue
        _collect(reg, name, obj, dist, ver)
    return reg


def _broken(reg: Registry, name: str, dist: str | None, ver: str | None, why: str) -> None:
    label = f"plugin {name} ({dist} {ver})" if dist else f"plugin {name}"
    message = f"{label}: {why}"
    reg.broken[name] = message
    warnings.warn(message, PluginWarning, stacklevel=3)


def _collect(reg: Registry, name: str, obj: Any, dist: str | None, ver: str | None) -> None:
    """Call this plugin's registration hooks and file its records by name."""
    provided = Provided(plugin=name, distribution=dist, version=ver)
    staged: list[tuple[str, Any]] = []
    for hook_name, kind in KINDS.items():
        impl = getattr(obj, hook_name, None)
        if impl is None:
            continue
        try:
            records = list(impl() or [])
        except Exception as exc:
            reg.manager.unregister(name=name)
            _broken(reg, name, dist, ver, f"hook {hook_name} raised "
                    f"{type(exc).__name__}: {exc}")
            return
        for record in records:
            rname = getattr(record, "name", None)
            if not isinstance(rname, str) or not rname:
                reg.manager.unregister(name=name)
                _broken(reg, name, dist, ver, f"hook {hook_name} returned {record!r}, which "
                        "has no name")
                return
            owner = reg.items[kind].get(rname)
            staged_names = {r.name for k, r in staged if k == kind}
            if owner is not None or rname in staged_names:
                where = owner.label() if owner else "itself"
                reg.manager.unregister(name=name)
                _broken(reg, name, dist, ver, f"registers {kind[:-1]} {rname!r}, which "
                        f"{where} already provides")
                return
            staged.append((kind, record))
    for kind, record in staged:
        reg.items[kind][record.name] = Entry(record, name, dist, ver)
        provided.items.setdefault(kind, []).append(record.name)
    reg.provided.append(provided)


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    global _default
    if _default is None:
        with warnings.catch_warnings():
            warnings.simplefilter("default", PluginWarning)
            _default = build_registry()
    return _default


def set_default_registry(reg: Registry | None) -> None:
    global _default
    _default = reg
