"""One pluggy PluginManager and the named things its plugins provide.

Built-in features are plugins registered exactly like third-party ones (pytest's model); third
party plugins come from the entry-point group ``mlsgd_dsl``. A plugin that fails to import, or
whose registration hook raises, is recorded as *broken* with a message and left out; the others
keep working. A hierarchy file that uses a name only a broken plugin would provide gets that
plugin's message instead of "unknown name".

A name that two plugins provide is available from neither, whichever was installed first: a
file that uses it is refused with both distributions named until the user blocks one of them
(``-p no:PLUGIN`` on the command line, or ``MLSGD_DSL_BLOCK_PLUGINS=PLUGIN``). Letting one win
silently would run the other package's code under a name the user chose for the first.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

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

    def provider(self) -> str:
        """The distribution and version that provides the record (``mlsgd-dsl X`` for a
        built-in)."""
        if self.distribution:
            return f"{self.distribution} {self.version}"
        if self.plugin in BUILTIN_NAMES:
            from . import __version__

            return f"mlsgd-dsl {__version__}"
        return "not installed"

    def conflict_message(self, others: list[Entry]) -> str:
        return " and ".join(e.label() for e in [self, *others])


def conflict_hint(kind: str, name: str, entries: list[Entry]) -> str:
    """Why a name is unavailable and how to pick one of its providers."""
    singular = kind[:-1] if kind.endswith("s") else kind
    picks = " or ".join(f"-p no:{e.plugin}" for e in entries)
    return (f"{singular} {name!r} is provided by {len(entries)} plugins: "
            f"{entries[0].conflict_message(entries[1:])}; it is available from none of them "
            f"until you block all but one ({picks}, or {BLOCK_ENV})")


@dataclass
class Registry:
    manager: pluggy.PluginManager
    items: dict[str, dict[str, Entry]] = field(
        default_factory=lambda: {k: {} for k in KINDS.values()})
    provided: list[Provided] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # plugin name -> message
    #: kind -> name -> the entries of every plugin that provides it (none of them is used)
    conflicts: dict[str, dict[str, list[Entry]]] = field(
        default_factory=lambda: {k: {} for k in KINDS.values()})
    blocked: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ lookup

    def get(self, kind: str, name: str, *, file: str | None = None,
            path: Iterable[str | int] = ()) -> Entry:
        table = self.items[kind]
        if name in table:
            return table[name]
        from .errors import ConfigError

        if name in self.conflicts[kind]:
            raise ConfigError(conflict_hint(kind, name, self.conflicts[kind][name]),
                              file=file, path=tuple(path))
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
    """Return a reason when the plugin needs an API version this core does not have.

    ``MLSGD_DSL_API`` is a version specifier (PEP 440, e.g. ``">=1.0"``, ``"==1.0"``,
    ``">=1.0,<2"``); a bare version ``"1.0"`` means the compatible release ``"~=1.0"``.
    """
    need = getattr(plugin, "MLSGD_DSL_API", None)
    if not need:
        return None
    text = str(need).strip()
    if text[:1].isdigit():
        text = f"~={text}" if "." in text else f"=={text}.*"
    try:
        spec = SpecifierSet(text)
    except InvalidSpecifier:
        return f"states MLSGD_DSL_API = {need!r}, which is not a version specifier " \
               "(expected e.g. '>=1.0')"
    if Version(API_VERSION) in spec:
        return None
    return f"needs plugin API {str(need).strip()}, this mlsgd-dsl provides {API_VERSION}"


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
        # Sorted only so that listings are stable: which plugin "wins" a name never depends
        # on this order, because a name two plugins provide is refused (see _file_records).
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

    origin: dict[str, tuple[str | None, str | None]] = {}
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
            _refuse_registration_wrappers(pm, name)
        except Exception as exc:
            if pm.get_plugin(name) is not None or pm.is_registered(obj):
                pm.unregister(plugin=obj)
            _broken(reg, name, dist, ver, f"cannot be registered: {exc}")
            continue
        origin[name] = (dist, ver)
    _file_records(reg, origin)
    return reg


def _refuse_registration_wrappers(pm: pluggy.PluginManager, name: str) -> None:
    """Registration hooks are collected per implementation (to know who provides what); a
    wrapper around one could not change that, so it is refused instead of ignored."""
    for hook_name in KINDS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == name and (impl.hookwrapper or impl.wrapper):
                raise ValueError(f"{hook_name} is a registration hook and cannot be a "
                                 "wrapper")


def _broken(reg: Registry, name: str, dist: str | None, ver: str | None, why: str) -> None:
    label = f"plugin {name} ({dist} {ver})" if dist else f"plugin {name}"
    message = f"{label}: {why}"
    reg.broken[name] = message
    warnings.warn(message, PluginWarning, stacklevel=3)


def _call_registration_hooks(reg: Registry, origin: dict[str, tuple[str | None, str | None]]
                             ) -> dict[str, list[tuple[str, Any]]]:
    """Every plugin's records, ``{plugin: [(kind, record), ...]}``, through pluggy's hook callers.

    Implementations are taken from ``get_hookimpls()`` in pluggy's call order, so ``specname``,
    ``tryfirst`` and ``trylast`` hold; each is called on its own so a record is attributed to
    the plugin that returned it. A plugin whose hook raises, or returns a record without a
    name, or the same name twice, is left out whole.
    """
    staged: dict[str, list[tuple[str, Any]]] = {name: [] for name in origin}
    failed: set[str] = set()
    for hook_name, kind in KINDS.items():
        caller = getattr(reg.manager.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last one first
            name = impl.plugin_name
            if name in failed or name not in staged:
                continue
            dist, ver = origin[name]
            try:
                records = list(impl.function() or [])
            except Exception as exc:
                failed.add(name)
                _broken(reg, name, dist, ver, f"hook {hook_name} raised "
                        f"{type(exc).__name__}: {exc}")
                continue
            seen = {r.name for k, r in staged[name] if k == kind}
            for record in records:
                rname = getattr(record, "name", None)
                if not isinstance(rname, str) or not rname:
                    why = f"hook {hook_name} returned {record!r}, which has no name"
                elif rname in seen:
                    why = f"registers {kind[:-1]} {rname!r}, which itself already provides"
                else:
                    seen.add(rname)
                    staged[name].append((kind, record))
                    continue
                failed.add(name)
                _broken(reg, name, dist, ver, why)
                break
    for name in failed:
        reg.manager.unregister(name=name)
        staged.pop(name)
    return staged


def _file_records(reg: Registry, origin: dict[str, tuple[str | None, str | None]]) -> None:
    """File every record by name; a name two plugins provide goes to ``reg.conflicts``."""
    staged = _call_registration_hooks(reg, origin)
    owners: dict[tuple[str, str], list[Entry]] = {}
    for name, records in staged.items():
        dist, ver = origin[name]
        provided = Provided(plugin=name, distribution=dist, version=ver)
        for kind, record in records:
            owners.setdefault((kind, record.name), []).append(Entry(record, name, dist, ver))
            provided.items.setdefault(kind, []).append(record.name)
        reg.provided.append(provided)
    for (kind, rname), entries in owners.items():
        if len(entries) == 1:
            reg.items[kind][rname] = entries[0]
        else:
            reg.conflicts[kind][rname] = sorted(
                entries, key=lambda e: (e.distribution or "", e.plugin))


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
