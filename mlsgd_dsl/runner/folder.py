"""The run folder on disk: the resolved configuration, checkpoints and their reading on resume.

Checkpoints are written atomically after every cycle (the one before is kept as
``checkpoint.prev.pt``, used with a message when the newer one cannot be loaded). A checkpoint
holds :data:`CHECKPOINT_FORMAT`; a file of another format is refused with one line (format 1,
before the correction strategies' state was saved, cannot be resumed: the strategy's state is
missing from it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import RunError
from ..tomlio import hierarchy_dumps
from .checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_bytes,
    load_checkpoint,
    network_mismatch,
    previous_path,
    save_checkpoint,
)

#: 2: the correction strategy's ``state_dict()`` under ``"strategy"`` (1 had none)
CHECKPOINT_FORMAT = 2


class RunFolder:
    """``out_dir`` and what is written there besides the metrics (rank 0 only writes)."""

    def __init__(self, out_dir: Path, *, is_main: bool, checkpoints: bool) -> None:
        self.out_dir = Path(out_dir)
        self.is_main = is_main
        self.checkpoints = checkpoints
        self.set_aside: Path | None = None  # an unreadable checkpoint found on resume

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.checkpoints else None

    def write_config(self, cfg: dict[str, Any]) -> None:
        if not self.is_main:
            return
        atomic_write_bytes(self.out_dir / "resolved.json",
                           (json.dumps(cfg, indent=2) + "\n").encode("utf-8"))
        atomic_write_bytes(self.out_dir / "resolved.toml",
                           hierarchy_dumps(cfg).encode("utf-8"))

    def write_json(self, name: str, data: Any) -> None:
        if self.is_main:
            atomic_write_bytes(self.out_dir / name,
                               (json.dumps(data, indent=2) + "\n").encode("utf-8"))

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        if self.checkpoints and self.is_main:
            save_checkpoint(self.out_dir / CHECKPOINT_NAME,
                            {"format": CHECKPOINT_FORMAT, **payload})

    def read_checkpoint(self, *, config_hash: str, force: bool,
                        network: dict[str, Any] | None = None,
                        network_name: str = "the finest level") -> dict[str, Any]:
        """``checkpoint.pt``, or ``checkpoint.prev.pt`` when the newer one cannot be loaded (a
        message says so; the bad file is noted in :attr:`set_aside`, and the run folder that
        continues sets it aside as ``checkpoint.pt.corrupt`` — never the folder resumed from
        when the run is forked). ``network``: the state dict the checkpoint must fit, with or
        without ``force``."""
        run_dir = self.out_dir
        if not run_dir.is_dir():
            raise RunError(f"cannot resume: {run_dir} is not a run folder")
        current = run_dir / CHECKPOINT_NAME
        candidates = [p for p in (current, previous_path(current)) if p.is_file()]
        if not candidates:
            raise RunError("no checkpoint to resume from", file=str(run_dir))
        failures: list[RunError] = []
        for path in candidates:
            try:
                ck = load_checkpoint(path, map_location="cpu")
            except RunError as exc:
                failures.append(exc)
                continue
            break
        else:
            if len(failures) == 1:
                raise failures[0]
            raise RunError(f"neither {current.name} nor {candidates[1].name} can be loaded "
                           f"({failures[0].message.split(';')[0]})", file=str(run_dir))
        if failures:
            print(f"mlsgd-dsl: warning: {failures[0].message.split(';')[0]} "
                  f"({current}); resuming from {path.name} (after cycle "
                  f"{ck.get('cycles_done')}), the copy before it", file=sys.stderr)
            if current.is_file():
                self.set_aside = current
        found = ck.get("format")
        if found != CHECKPOINT_FORMAT:
            older = isinstance(found, int) and found < CHECKPOINT_FORMAT
            raise RunError(
                f"checkpoint format {found!r} cannot be resumed by this mlsgd-dsl (it writes "
                f"format {CHECKPOINT_FORMAT}"
                + ("; older checkpoints lack the correction strategy's state — start the run "
                   "again" if older else "") + ")", file=str(path))
        # first: a different network is refused even with --force (it cannot be loaded)
        problem = network_mismatch(ck.get("finest"), network) if network is not None else None
        if problem:
            raise RunError(
                f"this checkpoint holds a different network than {network_name} ({problem}); "
                "--force accepts changed settings, never a different network: start a new run "
                "instead", file=str(path))
        if ck.get("config_hash") != config_hash and not force:
            raise RunError(
                f"the hierarchy changed since this checkpoint (config hash "
                f"{ck.get('config_hash')} → {config_hash}); resume with --force to "
                "continue anyway", file=str(path))
        return ck
