"""TensorBoard event files, written through the event hooks like any logging plugin.

Enabled by ``[report] tensorboard = true`` (``pip install 'mlsgd-dsl[tensorboard]'``). Three
TensorBoard runs inside the run folder, one per horizontal axis (a run has one step unit, and
``--resume`` discards what a killed session wrote after the checkpoint per run and step):

* ``tensorboard/``: per-level ``train_loss/LEVEL``, ``train_acc/LEVEL`` and ``lr/LEVEL``, the
  finest network's ``val_acc/finest`` and ``val_loss/finest``, markers ``events/prolongation``,
  ``events/corrected_cycle`` (1 in a cycle with gradient correction, 0 without) and one per other
  event (``events/early_stop`` ...); step = epochs on all levels × 100. Every point's wall time
  is the run's training time (evaluation excluded), so TensorBoard's "Relative" axis shows it.
  Text: ``hierarchy`` (levels, h, parameters, FLOPs), ``events``, ``summary``.
* ``tensorboard/by_finest_epoch/``: ``val_acc/by_finest_epoch``, step = finest-level epochs × 100.
* ``tensorboard/by_train_time/``: ``val_acc/by_train_time``, step = training time in ms.

Only the hook arguments (``record``, ``cycle``, ``summary``) and :func:`run_facts` are used.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..hookspecs import hookimpl

MLSGD_DSL_API = ">=1.0"
FOLDER = "tensorboard"
BY_FINEST_EPOCH = "by_finest_epoch"
BY_TRAIN_TIME = "by_train_time"
EPOCH_SCALE = 100  # steps per epoch (TensorBoard steps are integers; visits can be 0.5 epoch)
MISSING = ("[report] tensorboard = true needs the tensorboard package: "
           "pip install 'mlsgd-dsl[tensorboard]'")


@dataclass(frozen=True)
class RunFacts:
    """What this plugin needs to know about a run besides the hook arguments."""

    out_dir: Path
    enabled: bool  # [report] tensorboard
    name: str
    finest: str | None
    levels: list[dict[str, Any]] = field(default_factory=list)  # coarsest first
    correction: str = "none"
    uncorrected_cycles: int = 0


def run_facts(run: Any) -> RunFacts | None:
    """The one place that reads the object the runner passes to event hooks; None when
    TensorBoard is off (or the object is not a run, as when a test calls the hooks bare)."""
    config = getattr(run, "config", None)
    if not isinstance(config, Mapping) or not config.get("report", {}).get("tensorboard"):
        return None
    mlsgd = config.get("mlsgd", {})
    correction = mlsgd.get("correction", "none")
    return RunFacts(
        out_dir=Path(run.out_dir), enabled=True, name=run.name, finest=run.finest,
        levels=[dict(row) for row in run.levels],
        correction=correction if isinstance(correction, str) else correction.get("strategy"),
        uncorrected_cycles=mlsgd.get("uncorrected_cycles", 0) if run.method != "sgd"
        else 1 << 30)


def _epoch_step(epochs: float) -> int:
    return round(float(epochs) * EPOCH_SCALE)


def _ms(seconds: float) -> int:
    return round(float(seconds) * 1000)


def hierarchy_markdown(facts: RunFacts) -> str:
    lines = [f"**{facts.name}**, finest level `{facts.finest}`, correction "
             f"`{facts.correction}`", "",
             "| level (coarsest first) | h | parameters | FLOPs per image | input |",
             "|---|---|---|---|---|"]
    for lv in facts.levels:
        flops = f"{lv['flops']:.3g}" if lv.get("flops") else "–"
        lines.append(f"| {lv['level']} | {lv['h']:g} | {lv['parameters']:,} | {flops} | "
                     f"{'x'.join(map(str, lv['input']))} |")
    return "\n".join(lines)


class Board:
    """The three writers of one run folder."""

    def __init__(self, facts: RunFacts) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError(MISSING) from None
        from ..runner.records import JSONL_NAME, read_rows

        self.facts = facts
        base = facts.out_dir / FOLDER
        rows = read_rows(facts.out_dir) if (facts.out_dir / JSONL_NAME).is_file() else []
        # a resumed run: what a killed session wrote after the checkpoint's rows is purged
        last = rows[-1] if rows else None
        val = [r for r in rows if r.get("val_acc") is not None]

        def purge(step: int | None) -> int | None:
            return step + 1 if step is not None else None

        self.main = SummaryWriter(str(base), purge_step=purge(
            _epoch_step(last["global_epoch"]) if last else None))
        self.by_epoch = SummaryWriter(str(base / BY_FINEST_EPOCH), purge_step=purge(
            _epoch_step(val[-1]["epoch"]) if val else None))
        self.by_time = SummaryWriter(str(base / BY_TRAIN_TIME), purge_step=purge(
            _ms(val[-1]["train_time"]) if val else None))
        # wall time = training time, so TensorBoard's "Relative" axis is training time
        self.origin = time.time() - (float(last["train_time"]) if last else 0.0)
        self.step = _epoch_step(last["global_epoch"]) if last else 0
        if not rows:
            self.main.add_text("hierarchy", hierarchy_markdown(facts), 0)

    def record(self, row: dict[str, Any]) -> None:
        level = str(row.get("level"))
        self.step = step = _epoch_step(row.get("global_epoch") or 0.0)
        wall = self.origin + float(row.get("train_time") or 0.0)
        for key in ("train_loss", "train_acc", "lr"):
            if row.get(key) is not None:
                self.main.add_scalar(f"{key}/{level}", float(row[key]), step, walltime=wall)
        event = str(row.get("event") or "")
        if event:
            kind = event.split(":", 1)[0]
            tag = "prolongation" if kind == "prolongated" else kind
            self.main.add_scalar(f"events/{tag}", 1.0, step, walltime=wall)
            self.main.add_text("events", f"cycle {row.get('cycle')}, level {level}: {event}",
                               step, walltime=wall)
        if row.get("val_acc") is not None and level == self.facts.finest:
            acc = float(row["val_acc"])
            self.main.add_scalar("val_acc/finest", acc, step, walltime=wall)
            if row.get("val_loss") is not None:
                self.main.add_scalar("val_loss/finest", float(row["val_loss"]), step,
                                     walltime=wall)
            self.by_epoch.add_scalar("val_acc/by_finest_epoch", acc,
                                     _epoch_step(row.get("epoch") or 0.0), walltime=wall)
            self.by_time.add_scalar("val_acc/by_train_time", acc,
                                    _ms(row.get("train_time") or 0.0), walltime=wall)

    def cycle(self, cycle: int) -> None:
        facts = self.facts
        corrected = facts.correction != "none" and cycle >= facts.uncorrected_cycles
        self.main.add_scalar("events/corrected_cycle", float(corrected), self.step)
        for writer in (self.main, self.by_epoch, self.by_time):
            writer.flush()  # a killed run keeps its curves up to the last checkpoint

    def close(self, summary: dict[str, Any]) -> None:
        from ..runner.summary import markdown_table

        self.main.add_text("summary", markdown_table([summary]), self.step)
        for writer in (self.main, self.by_epoch, self.by_time):
            writer.close()


_boards: dict[Path, Board] = {}


def _board(run: Any) -> Board | None:
    facts = run_facts(run)
    if facts is None:
        return None
    key = facts.out_dir.resolve()
    if key not in _boards:
        _boards[key] = Board(facts)
    return _boards[key]


@hookimpl
def mlsgd_run_start(run: Any) -> None:
    facts = run_facts(run)
    if facts is not None:
        stale = _boards.pop(facts.out_dir.resolve(), None)  # a session that died in-process
        if stale is not None:
            for writer in (stale.main, stale.by_epoch, stale.by_time):
                writer.close()
        _board(run)


@hookimpl
def mlsgd_epoch_end(run: Any, record: dict) -> None:
    board = _board(run)
    if board is not None:
        board.record(record)


@hookimpl
def mlsgd_cycle_end(run: Any, cycle: int) -> None:
    board = _board(run)
    if board is not None:
        board.cycle(cycle)


@hookimpl
def mlsgd_run_end(run: Any, summary: dict) -> None:
    facts = run_facts(run)
    board = _boards.pop(facts.out_dir.resolve(), None) if facts is not None else None
    if board is not None:
        board.close(summary)
