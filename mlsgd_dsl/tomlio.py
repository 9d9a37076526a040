"""The one TOML writer of mlsgd-dsl (tomli-w behind a function that knows about ``None``).

TOML has no null. A ``None`` value of a table is written as an absent key (what every
optional key of a hierarchy file means); ``None`` inside an array has no TOML form and is
refused rather than dropped, which would shift the other items. :func:`hierarchy_dumps`
writes a resolved hierarchy so that reading it back gives the same configuration (a
transfer table without a default rule is ``default = false``, not an absent key, which would
mean the ``identity`` default). Everything written here is read back by ``tomllib`` unchanged
(tests/test_tomlio.py checks it with hypothesis).
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from collections.abc import Mapping
from typing import Any

import tomli_w


def _clean(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _clean(v, f"{where}.{k}" if where else str(k))
                for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        if any(v is None for v in value):
            raise ValueError(f"{where + ': ' if where else ''}an array with a None item has no "
                             "TOML form")
        return [_clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, bool | int | float | str | datetime.date | datetime.time):
        return value
    raise TypeError(f"{where + ': ' if where else ''}{type(value).__name__} has no TOML form")


def plain(value: Any) -> Any:
    """``value`` with ``None`` table values left out, as :func:`dumps` writes it; raises
    ``TypeError`` / ``ValueError`` for what TOML cannot hold."""
    return _clean(value, "")


def dumps(data: Mapping[str, Any]) -> str:
    """``data`` as TOML text; ``None`` values of tables are left out (see the module doc)."""
    return tomli_w.dumps(_clean(data, ""))


def hierarchy_dumps(resolved: Mapping[str, Any]) -> str:
    """A resolved hierarchy (``Compiled.resolved()``) as a hierarchy file that loads back to it."""
    data = copy.deepcopy(dict(resolved))
    tables = [data.get("transfer")] + [e.get("transfer") for e in data.get("edges") or []
                                       if isinstance(e, Mapping)]
    for table in tables:
        if isinstance(table, dict) and "default" in table and table["default"] is None:
            table["default"] = False
    return dumps(data)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _string(text: str) -> str:
    # a JSON string is a TOML basic string but for DEL, which TOML wants escaped
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def inline(value: Any) -> str:
    """``value`` as one line of TOML (inline tables), e.g. for a ``--set KEY=VALUE`` override."""
    value = _clean(value, "")
    if isinstance(value, Mapping):
        keys = (k if _BARE_KEY.fullmatch(k) else _string(k) for k in value)
        return "{" + ", ".join(f"{k} = {inline(v)}" for k, v in zip(keys, value.values())) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(inline(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else (
            "nan" if value != value else ("inf" if value > 0 else "-inf"))
    return str(value)  # int, date, time
