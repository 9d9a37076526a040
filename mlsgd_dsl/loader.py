"""Hierarchy file → validated :class:`~mlsgd_dsl.schema.Hierarchy`.

Order of work: read (size-capped) TOML, apply ``--set`` overrides, resolve inheritance
(top-level ``model`` defaults and level ``extends``), validate with pydantic, then validate
every plugin-named table with that plugin's own options model. Every failure is one
:class:`~mlsgd_dsl.errors.ConfigError` naming the file and key path. Nothing in a file is
evaluated as code.
"""

from __future__ import annotations

import copy
import json
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, format_path
from .registry import Registry, default_registry
from .schema import Hierarchy, validate_strict
from .tomlio import plain

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_EXTENDS = 16
MAX_KEY_PARTS = 64


# --------------------------------------------------------------------------- reading


def read_file_text(path: Path, file: str, where: tuple = (), label: str = "") -> str:
    """UTF-8 text of a regular file of at most MAX_FILE_BYTES (never a device or a FIFO)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            kind = ("a directory, not a hierarchy file" if stat.S_ISDIR(info.st_mode)
                    else "not a regular file")
            raise ConfigError(f"{label}is {kind}", file=file, path=where)
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{label}no such file", file=file, path=where) from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{label}cannot read: {getattr(exc, 'strerror', None) or exc}",
                          file=file, path=where) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{label}file is {info.st_size} bytes; hierarchy files are capped "
                          f"at {MAX_FILE_BYTES} bytes", file=file, path=where)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}not UTF-8 text (byte {exc.start})", file=file,
                          path=where) from None


def _check_dotted_keys(text: str, file: str) -> None:
    """tomllib is quadratic in the parts of a dotted key; refuse absurd ones before parsing."""
    for number, line in enumerate(text.splitlines(), 1):
        key = line.split("=", 1)[0] if "=" in line else line
        if key.count(".") > MAX_KEY_PARTS:
            raise ConfigError(f"line {number}: a key with more than {MAX_KEY_PARTS} dotted "
                              "parts", file=file)


def read_toml(text: str, file: str) -> dict[str, Any]:
    _check_dotted_keys(text, file)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=file) from None
    except RecursionError:
        raise ConfigError(f"tables or arrays nested deeper than {MAX_DEPTH} levels",
                          file=file) from None
    _check_depth(data, file)
    return data


def _check_depth(value: Any, file: str, path: tuple = ()) -> None:
    if len(path) > MAX_DEPTH:
        raise ConfigError(f"nested deeper than {MAX_DEPTH} levels", file=file, path=path[:4])
    if isinstance(value, dict):
        for k, v in value.items():
            _check_depth(v, file, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_depth(v, file, (*path, i))


def parse_override(item: str | tuple[str, Any]) -> dict[str, Any]:
    """``"mlsgd.cycles=3"`` → ``{"mlsgd": {"cycles": 3}}``; the value is TOML, else a string.

    Keys follow TOML's dotted-key syntax, so ``'transfer.rules."fc.*"=identity'`` works. A
    ``(key, value)`` pair (the Python API's mapping) takes the value as it is.
    """
    if isinstance(item, tuple):
        key, value = item
        text_value = "0"  # a placeholder: the key path is parsed, the value put in after
        if "\n" in key or "\r" in key:
            raise ConfigError(f"override key {key!r} contains a line break", file="--set")
    else:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value",
                              file="--set")
        if "\n" in item or "\r" in item:
            raise ConfigError(f"override {item!r} contains a line break; give one key=value "
                              "per --set", file="--set")
        key, text_value = item.split("=", 1)
    key = key.strip()
    if key.count(".") > MAX_KEY_PARTS:
        raise ConfigError(f"override key has more than {MAX_KEY_PARTS} dotted parts",
                          file="--set")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key", file="--set")
    for candidate in (text_value.strip(), json.dumps(text_value.strip(), ensure_ascii=False)):
        try:
            data = tomllib.loads(f"{key} = {candidate}")
        except tomllib.TOMLDecodeError:
            continue
        except RecursionError:
            break
        if isinstance(item, tuple):
            data = _put_leaf(data, _api_value(value))
        _check_depth(data, "--set")
        return data
    raise ConfigError(f"override {item!r}: {key!r} is not a valid key path", file="--set")


def _put_leaf(data: dict[str, Any], value: Any) -> dict[str, Any]:
    """Replace the single leaf of a one-key-path dict (what ``a.b.c = 0`` parses to)."""
    (key, inner), = data.items()
    return {key: _put_leaf(inner, value) if isinstance(inner, dict) else value}


def _api_value(value: Any) -> Any:
    try:
        _check_depth(value, "--set")
        return plain(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"override value {value!r:.80} has an unsupported type ({exc})",
                          file="--set") from None
    except RecursionError:
        raise ConfigError(f"override value nested deeper than {MAX_DEPTH} levels",
                          file="--set") from None


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else in ``top`` replaces ``base``."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------- inheritance


def resolve_inheritance(data: dict[str, Any], file: str) -> dict[str, Any]:
    """Fill each level from the top-level ``model`` table and its ``extends`` chain."""
    levels = data.get("levels")
    if not isinstance(levels, dict):
        return data
    defaults = data.get("model", {})
    if not isinstance(defaults, dict):
        return data  # pydantic reports the type error with its path
    resolved: dict[str, Any] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> dict[str, Any]:
        if name in resolved:
            return resolved[name]
        level = levels[name]
        if not isinstance(level, dict):
            return level
        parent_name = level.get("extends")
        if parent_name is None:
            base: dict[str, Any] = {"model": copy.deepcopy(defaults)} if defaults else {}
        else:
            if not isinstance(parent_name, str) or parent_name not in levels:
                raise ConfigError(f"extends {parent_name!r}, which is not a level "
                                  f"(levels: {', '.join(map(str, levels))})",
                                  file=file, path=("levels", name, "extends"))
            if parent_name in chain or parent_name == name:
                cycle = " -> ".join((*chain, name, parent_name))
                raise ConfigError(f"inheritance cycle: {cycle}", file=file,
                                  path=("levels", name, "extends"))
            base = copy.deepcopy(resolve(parent_name, (*chain, name)))
            if not isinstance(base, dict):
                base = {}
            base.pop("description", None)
        merged = deep_merge(base, {k: v for k, v in level.items()})
        resolved[name] = merged
        return merged

    out = dict(data)
    out["levels"] = {name: resolve(name, ()) for name in levels}
    return out


# --------------------------------------------------------------------------- errors


def _readable_loc(loc: tuple, data: Any) -> tuple:
    """Drop pydantic's union/validator tags from ``loc`` by walking the input data."""
    path: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(part, str) and (
            part in ("[key]",) or "[" in part or part in
            {"str", "int", "float", "bool", "dict", "list", "tuple", "none"}
            or part[:1].isupper() or "-" in part
        ):
            continue  # a union member or validator tag, not a key
        else:
            path.append(part)  # a missing key: name it
            node = None
    return tuple(path)


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a type: ``Annotated`` and unions unwrapped, ``None`` left out."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [m for a in get_args(annotation) for m in _members(a)]
    return [] if annotation is type(None) else [annotation]


def _model_at(model: Any, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model of the table that holds the key at ``loc`` (for "valid keys")."""
    current = [model]
    for part in loc[:-1]:
        found: list[Any] = []
        for kind in (m for c in current for m in _members(c)):
            origin = get_origin(kind)
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                if isinstance(part, str) and part in kind.model_fields:
                    found.append(kind.model_fields[part].annotation)
            elif origin in (dict, Mapping) and isinstance(part, str):
                found.append(get_args(kind)[1] if get_args(kind) else Any)
            elif origin in (list, tuple) and isinstance(part, int):
                found.extend(get_args(kind)[:1])
        if found:
            current = found
        # else: a union tag of pydantic's (not a key): stay at this table
    models = [m for c in current for m in _members(c)
              if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if models else None


def _error_message(err: dict, model: type[BaseModel] | None = None) -> str:
    msg = err.get("msg", "invalid value")
    kind = err.get("type", "")
    given = err.get("input")
    if kind == "extra_forbidden":
        table = _model_at(model, tuple(err["loc"])) if model is not None else None
        if table is not None and table.model_fields:
            return f"unknown key; valid keys: {', '.join(table.model_fields)}"
        if table is not None:
            return "unknown key; this table takes no options"
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    msg = msg.replace("should be an object", "should be a table")  # TOML's word for it
    if ", got" not in msg and not isinstance(given, dict | list):
        shown = repr(given)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"{msg[0].lower() + msg[1:]}, got {shown}"
    return msg[0].lower() + msg[1:]


def config_error_from(exc: ValidationError, data: Any, file: str,
                      prefix: tuple = (), model: type[BaseModel] | None = None) -> ConfigError:
    """One ConfigError listing the distinct problems (at most five), deepest first.

    ``model`` is the model that was validated: an unknown key's message then lists the valid
    keys of its table.
    """
    by_path: dict[tuple, list[str]] = {}
    for err in exc.errors():
        path = (*prefix, *_readable_loc(tuple(err["loc"]), data))
        by_path.setdefault(path, [])
        message = _error_message(err, model)
        if message not in by_path[path]:
            by_path[path].append(message)
    # With unions pydantic reports one error per member; the most specific path wins.
    paths = sorted(by_path, key=len, reverse=True)
    kept = [p for p in paths if not any(len(q) > len(p) and q[:len(p)] == p for q in paths)]
    kept.sort(key=lambda p: list(by_path).index(p))
    # The deepest problem is the most specific one (unions report a shallow error per member).
    first = max(kept, key=len)
    kept.remove(first)
    kept.insert(0, first)
    message = " or ".join(by_path[first][:3])
    error = ConfigError(message, file=file, path=first)
    if len(kept) > 1:
        more = [f"{format_path(p)}: {' or '.join(by_path[p][:2])}" for p in kept[1:5]]
        error = ConfigError(message + "\n  also: " + "\n  also: ".join(more), file=file,
                            path=first)
    return error


# --------------------------------------------------------------------------- plugins


def validate_options(model: type[BaseModel], options: Mapping[str, Any], *, file: str,
                     path: tuple) -> BaseModel:
    try:
        return validate_strict(model, dict(options))
    except ValidationError as exc:
        raise config_error_from(exc, dict(options), file, prefix=path, model=model) from None


def resolve_plugins(h: Hierarchy, registry: Registry, file: str) -> dict[tuple, Any]:
    """Validate every plugin-named table; returns ``{key path: options instance}``."""
    out: dict[tuple, Any] = {}
    src = registry.get("data sources", h.data.source, file=file, path=("data", "source"))
    out[("data",)] = validate_options(src.record.options, h.data.options, file=file,
                                      path=("data", "options"))
    for name, level in h.levels.items():
        fam = registry.get("architectures", level.model.family, file=file,
                           path=("levels", name, "model", "family"))
        out[("levels", name, "model")] = validate_options(
            fam.record.options, level.model.options(), file=file,
            path=("levels", name, "model"))
        for i, step in enumerate(level.data.coarsen):
            co = registry.get("coarsenings", step.method, file=file,
                              path=("levels", name, "data", "coarsen", i, "method"))
            out[("levels", name, "data", "coarsen", i)] = validate_options(
                co.record.options, step.options(), file=file,
                path=("levels", name, "data", "coarsen", i))
    transfers = [(("transfer",), h.transfer)]
    transfers += [(("edges", i, "transfer"), e.transfer) for i, e in enumerate(h.edges or [])
                  if e.transfer is not None]
    for base, spec in transfers:
        entries = [(("default",), spec.default)] if spec.default is not None else []
        entries += [(("rules", pattern), value) for pattern, value in spec.rules.items()]
        for sub, value in entries:
            rule_name = value if isinstance(value, str) else value.rule
            opts = {} if isinstance(value, str) else value.options()
            where = (*base, *sub)
            rule = registry.get("transfer rules", rule_name, file=file,
                                path=where if isinstance(value, str) else (*where, "rule"))
            out[where] = (rule, validate_options(rule.record.options, opts, file=file,
                                                 path=where))
    corr = h.mlsgd.correction
    strategy = corr if isinstance(corr, str) else corr.strategy
    copts = {} if isinstance(corr, str) else corr.options()
    entry = registry.get("corrections", strategy, file=file,
                         path=("mlsgd", "correction") if isinstance(corr, str)
                         else ("mlsgd", "correction", "strategy"))
    out[("mlsgd", "correction")] = (entry, validate_options(
        entry.record.options, copts, file=file, path=("mlsgd", "correction")))
    return out


def check_per_level(h: Hierarchy, file: str) -> None:
    """Per-level tables must name existing levels and cover them all."""
    names = set(h.levels)
    for field_name in ("epochs", "cascade_epochs", "lr", "batch_size", "optimizer",
                       "compile", "channels_last"):
        value = getattr(h.mlsgd, field_name)
        if not isinstance(value, dict):
            continue
        for key in value:
            if key not in names:
                raise ConfigError(f"no level named {key!r} (levels: {', '.join(h.levels)})",
                                  file=file, path=("mlsgd", field_name, key))
        missing = [n for n in h.levels if n not in value]
        if missing:
            raise ConfigError(f"per-level table lacks level(s) {', '.join(missing)}; give "
                              "every level or a single value for all", file=file,
                              path=("mlsgd", field_name))
    paths = h.mlsgd.path or []
    for i, p in enumerate(paths):
        for j, name in enumerate(p):
            if name not in names:
                where = ("mlsgd", "path", i, j) if len(paths) > 1 else ("mlsgd", "path", j)
                raise ConfigError(f"no level named {name!r}", file=file, path=where)


# --------------------------------------------------------------------------- entry points


def resolve_file_inheritance(data: dict[str, Any], file: str, base_dir: Path | None,
                             chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Top-level ``extends = "other.toml"``: this file's keys deep-merged over the other's."""
    parent = data.get("extends")
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"must be a file path (string), got {parent!r}", file=file,
                          path=("extends",))
    if base_dir is None:
        raise ConfigError("file inheritance needs a file on disk", file=file,
                          path=("extends",))
    if not parent.endswith(".toml"):  # never read /etc/passwd, a device, a folder as TOML
        raise ConfigError(f"must name a .toml hierarchy file, got {parent[:60]!r}", file=file,
                          path=("extends",))
    try:
        target = (base_dir / parent).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot resolve {parent!r}: {exc}", file=file,
                          path=("extends",)) from None
    if str(target) in chain:
        raise ConfigError("inheritance cycle: " + " -> ".join((*chain, str(target))),
                          file=file, path=("extends",))
    if len(chain) > MAX_EXTENDS:
        raise ConfigError(f"file inheritance deeper than {MAX_EXTENDS} files", file=file,
                          path=("extends",))
    text = read_file_text(target, file, ("extends",), f"cannot read inherited file {parent!r}: ")
    try:
        base = resolve_file_inheritance(read_toml(text, str(target)), str(target),
                                        target.parent, (*chain, str(target)))
    except ConfigError as exc:
        if exc.path[:1] == ("extends",):  # about the other file's own `extends`: it says so
            raise
        # the other file is not a valid hierarchy: name the key that asked for it, and its file
        raise ConfigError(f"in inherited file {parent!r}: {exc}", file=file,
                          path=("extends",)) from None
    child = {k: v for k, v in data.items() if k != "extends"}
    merged = deep_merge(base, child)
    merged.pop("extends", None)
    return merged


def loads(text: str, *, file: str = "<string>", overrides: Any = None,
          registry: Registry | None = None, base_dir: Path | None = None) -> Hierarchy:
    data = read_toml(text, file)
    data = resolve_file_inheritance(data, file, base_dir, (str(Path(file).resolve()),))
    for item in _override_items(overrides):
        data = deep_merge(data, parse_override(item))
    data = resolve_inheritance(data, file)
    try:
        h = validate_strict(Hierarchy, data)
    except ValidationError as exc:
        raise config_error_from(exc, data, file, model=Hierarchy) from None
    except RecursionError:
        raise ConfigError("nested too deeply", file=file) from None
    check_per_level(h, file)
    reg = registry or default_registry()
    h._plugin_options = resolve_plugins(h, reg, file)
    h._file = file
    h._registry = reg
    h._base_dir = base_dir
    return h


def _override_items(overrides: Any) -> list[Any]:
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    return list(overrides)


def load(path: str | Path, overrides: Any = None, *,
         registry: Registry | None = None) -> Hierarchy:
    """Read and validate a hierarchy file.

    ``overrides`` is a mapping ``{"mlsgd.cycles": 2}`` or a list of ``"key.path=value"``.
    """
    p = Path(path)
    file = str(path)
    text = read_file_text(p, file)
    return loads(text, file=file, overrides=overrides, registry=registry,
                 base_dir=p.resolve().parent)


__all__ = ["load", "loads"]
