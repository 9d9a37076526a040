"""Where on-disk data sets are looked for, and the one error that lists every place tried."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import DataNotFound

#: Environment variable naming a folder that holds one sub-folder per data set.
DATA_ENV = "MLSGD_DATA"
#: Per-user cache folder (also where ``cifar10`` downloads go when no root is given).
USER_CACHE = Path("~/.cache/mlsgd-dsl")


def default_roots(name: str, *extra: str, cache_dir: str | None = None) -> list[Path]:
    """The usual folders for data set ``name``, most specific first.

    ``cache_dir`` (from the run's :class:`~mlsgd_dsl.api.DataContext`) comes first, then
    ``$MLSGD_DATA/<name>``, ``~/.cache/mlsgd-dsl/<name>``, ``./data/<name>``, then ``extra``
    (relative paths are taken under ``$MLSGD_DATA`` and ``./data``; absolute ones as they are).
    """
    bases: list[Path] = []
    if cache_dir:
        bases.append(Path(cache_dir))
    env = os.environ.get(DATA_ENV)
    if env:
        bases.append(Path(env))
    out: list[Path] = [b / name for b in bases]
    out += [USER_CACHE.expanduser() / name, Path("data") / name]
    for e in extra:
        p = Path(e)
        if p.is_absolute():
            out.append(p)
        else:
            out += [b / p for b in bases] + [Path("data") / p]
    return dedupe(out)


def dedupe(paths: Sequence[Path]) -> list[Path]:
    seen: set[Path] = set()
    out = []
    for p in paths:
        key = p.expanduser().absolute()
        if key not in seen:
            seen.add(key)
            out.append(p.expanduser())
    return out


def find_first(candidates: Sequence[Path],
               missing: Callable[[Path], list[str]]) -> tuple[Path | None, list[str]]:
    """First candidate for which ``missing(path)`` is empty, plus one note per candidate tried.

    A note says why a folder was rejected, so the final error shows half-complete folders.
    """
    notes = []
    for path in candidates:
        if not path.is_dir():
            notes.append(f"{path.absolute()} (no such folder)")
            continue
        lacking = missing(path)
        if not lacking:
            return path, notes
        notes.append(f"{path.absolute()} (lacks {', '.join(lacking)})")
    return None, notes


def not_found(name: str, notes: Sequence[str], how: str) -> DataNotFound:
    """One readable message: what is missing, every place looked at, how to get it."""
    return DataNotFound(f"data set {name!r} not found; looked in: {'; '.join(notes)}. {how}")
