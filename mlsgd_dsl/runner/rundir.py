"""The run folder: which folder a run writes into, and the rules that keep earlier runs intact.

* Without ``--out`` the folder is ``runs/NAME-YYYYmmdd-HHMMSS``, created with one ``os.mkdir``
  (atomic: of two processes asking for the same name, exactly one gets it); the loser tries
  ``NAME-YYYYmmdd-HHMMSS-2``, ``-3``, ... so two runs never share a folder.
* ``--out DIR`` must be new or empty. A folder that already holds a run is refused with a line
  saying how to resume it; ``--overwrite`` deletes that run's files (and only those) first. A
  non-empty folder that holds no run (a user's folder, ``.``) is refused even with
  ``--overwrite``: a run never deletes files it did not write.
* ``--resume A`` continues A in place. ``--resume A --out B`` forks: A's state files are copied
  into B (new or empty, as for ``--out``) and the run continues there; A is never written.

:func:`plan` only looks (it runs before any data is loaded, so a refusal is immediate);
:func:`open_folder` creates or prepares the folder once every check has passed, so a refused
run leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from ..errors import RunError

#: Every file a run writes (``--overwrite`` deletes these and nothing else).
RUN_FILES = ("resolved.json", "resolved.toml", "metrics.csv", "metrics.jsonl",
             "checkpoint.pt", "checkpoint.prev.pt", "checkpoint.pt.corrupt",
             ".checkpoint.pt.tmp", "summary.json", "summary.md", "accuracy.png")
#: Files that make a folder a run folder.
MARKERS = ("resolved.json", "resolved.toml", "checkpoint.pt", "checkpoint.prev.pt",
           "metrics.jsonl", "summary.json")
#: What a fork copies: the state a resumed run reads (summary and plot are written anew).
STATE_FILES = ("resolved.json", "resolved.toml", "metrics.csv", "metrics.jsonl",
               "checkpoint.pt", "checkpoint.prev.pt")
RUNS_ROOT = Path("runs")
MAX_SUFFIX = 1000

Mode = Literal["default", "new", "overwrite", "resume", "fork"]


@dataclass
class FolderPlan:
    """Where a run writes. ``path`` of a ``default`` folder is only known once created."""

    mode: Mode
    path: Path | None
    resume_from: Path | None = None
    overwrite: bool = False
    name: str = "run"


def is_run_folder(path: Path) -> bool:
    return any((path / name).exists() for name in MARKERS)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return os.path.abspath(a) == os.path.abspath(b)


def _check_target(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` can receive a run: True if a run there must be deleted first."""
    try:
        if not out.exists():
            ancestor = out.parent
            while not ancestor.exists() and ancestor != ancestor.parent:
                ancestor = ancestor.parent
            if ancestor.exists() and not ancestor.is_dir():
                raise RunError(f"cannot create the run folder: {ancestor} is a file",
                               file=str(out))
            return False
        if not out.is_dir():
            raise RunError("is a file, not a folder; name a new or empty folder with --out",
                           file=str(out))
        # visible names first: they say more about the folder than .git does
        entries = sorted((p.name for p in out.iterdir()), key=lambda n: (n.startswith("."), n))
    except OSError as exc:
        raise RunError(f"cannot use it as the run folder ({exc.strerror or exc})",
                       file=str(out)) from None
    if not entries:
        return False
    if is_run_folder(out):
        if overwrite:
            return True
        raise RunError(f"already holds a run; continue it with --resume {out}, or pass "
                       "--overwrite to replace it", file=str(out))
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise RunError(f"is not empty and holds no run ({shown}); name a new or empty folder "
                   "with --out (--overwrite replaces only a run folder)", file=str(out))


def plan(out: Path | str | None, resume: Path | str | None, *, name: str,
         overwrite: bool = False) -> FolderPlan:
    """Decide where the run writes, refusing anything that would touch another run's files."""
    out = Path(out) if out is not None else None
    if resume is not None:
        resume = Path(resume)
        if out is None or _same(out, resume):
            if overwrite:
                raise RunError("--overwrite replaces a finished run; it cannot be combined "
                               "with resuming that same run in place", file=str(resume))
            return FolderPlan("resume", resume, resume_from=resume, name=name)
        return FolderPlan("fork", out, resume_from=resume,
                         overwrite=_check_target(out, overwrite), name=name)
    if out is None:
        return FolderPlan("default", None, name=name)
    delete = _check_target(out, overwrite)
    return FolderPlan("overwrite" if delete else "new", out, overwrite=delete, name=name)


def create_unique(base: Path) -> Path:
    """Create ``base`` (or ``base-2``, ``base-3``, ...) atomically; return the one created."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, MAX_SUFFIX + 1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise RunError(f"{MAX_SUFFIX} run folders named {base.name}* exist already; pass --out",
                   file=str(base.parent))


def default_base(name: str, now: datetime | None = None) -> Path:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return RUNS_ROOT / f"{name}-{stamp}"


def _make(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(out)
    except FileExistsError:
        if not out.is_dir():
            raise RunError("is a file, not a folder", file=str(out)) from None
        if any(out.iterdir()) and not is_run_folder(out):  # filled since plan() looked
            raise RunError("is no longer empty; name a new or empty folder with --out",
                           file=str(out)) from None


def open_folder(folder: FolderPlan) -> Path:
    """Create (or prepare) the run folder planned by :func:`plan`; return its path."""
    try:
        if folder.mode == "default":
            folder.path = create_unique(default_base(folder.name))
            return folder.path
        out = folder.path
        assert out is not None
        if folder.mode == "resume":
            return out
        _make(out)
        if folder.overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        if folder.mode == "fork":
            assert folder.resume_from is not None
            for name in STATE_FILES:
                source = folder.resume_from / name
                if source.is_file():
                    shutil.copy2(source, out / name)
        return out
    except OSError as exc:
        where = folder.path or RUNS_ROOT
        if exc.errno == errno.ENOSPC:
            raise RunError("no space left on the device", file=str(where)) from None
        raise RunError(f"cannot create the run folder ({exc.strerror or exc})",
                       file=str(where)) from None


def checkpoint_note(out_dir: Path | str, cycles_done: int) -> str:
    """Where to continue from; cycles counted from 0, as in ``metrics.csv`` and the messages."""
    if cycles_done <= 0:
        held = "no completed cycle"
    elif cycles_done == 1:
        held = "cycle 0 completed"
    else:
        held = f"cycles 0-{cycles_done - 1} completed"
    return f"the checkpoint in {out_dir} holds {held} — continue with --resume {out_dir}"
