"""The run's I/O: metrics rows, the finest network's evaluation, the event hooks, the clocks
and the progress bar (:class:`RunIO`).

Rows: one per epoch of any level and one per event (``prolongated``, ``cycle``,
``early_stop:…``, a strategy's ``record``), written to ``metrics.csv`` / ``metrics.jsonl`` by
rank 0 and shown to the ``mlsgd_epoch_end`` hooks. The finest network is evaluated on the
validation split where ``mlsgd.eval.every`` says (at most once per weights version), with its
BatchNorm statistics re-estimated first (``mlsgd.eval.recalibrate``; see :mod:`.bn`);
evaluation, re-estimation, writing and the hooks are excluded from the training time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import bn, distributed
from .clock import RunClock
from .events import EventHooks, RunView, frozen, read_only
from .folder import RunFolder
from .level import EpochStats, Level
from .records import MetricsLog
from .rundir import checkpoint_note
from .state import Progress


def _sum_over_ranks(tensors: list[Tensor]) -> None:
    distributed.all_reduce_(tensors)


class RunIO:
    """Owns the metrics log, the clocks, the event hooks, the progress bar and what evaluation
    remembers (the last validation values, which weights version was evaluated and whose
    BatchNorm statistics were re-estimated). Reads the run's :class:`Progress` and levels."""

    def __init__(self, *, compiled: Any, folder: RunFolder, progress: Progress,
                 levels: dict[str, Level], n_cycles: int, config: dict[str, Any],
                 config_hash: str, quiet: bool) -> None:
        h = compiled.hierarchy
        self.name = h.name
        self.method = h.mlsgd.method
        self.eval_spec = h.mlsgd.eval
        self.folder = folder
        self.is_main = folder.is_main
        self.progress = progress
        self.levels = levels
        self.finest = compiled.finest
        self.n_cycles = n_cycles
        self.config = frozen(config)
        self.config_hash = config_hash
        describe = getattr(compiled, "describe", None)
        self.level_table = tuple(frozen(dict(row)) for row in describe()) \
            if callable(describe) else ()
        self.quiet = quiet
        self.clock = RunClock()
        self.hooks = EventHooks(getattr(compiled, "registry", None), enabled=self.is_main)
        self.log: MetricsLog | None = None
        self.bar: Any = None
        self.seed = h.mlsgd.seed
        self.device = levels[self.finest].device
        self.last_val: tuple[float, float] | None = None
        self._version_evaluated = -1
        self._stats_version = -1  # finest version whose BatchNorm statistics were estimated
        self.bn_time = 0.0
        self.bn_estimates = 0
        self._last_row: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def out_dir(self) -> Path:
        return self.folder.out_dir

    def open(self, *, resume_rows: int | None = None, train_time0: float = 0.0,
             wall_time0: float = 0.0) -> None:
        """The metrics log (cut back to ``resume_rows`` on resume); the clocks start now, from
        the times of the sessions before."""
        if self.is_main:
            self.log = MetricsLog(self.out_dir, resume_rows=resume_rows)
        self.clock.restart(train_time0=train_time0, wall_time0=wall_time0)

    def open_bar(self, total: float) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=round(total, 6), initial=round(self.progress.global_epoch, 6),
                        unit="ep", disable=self.quiet or not self.is_main,
                        dynamic_ncols=True, leave=False, file=sys.stderr, desc=self.name)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # ------------------------------------------------------------------ rows

    def row(self, level: str, stats: EpochStats | None, event: str = "") -> dict[str, Any]:
        lv = self.levels[level]
        return {
            "cycle": self.progress.cycle, "level": level,
            "visit_epoch": stats.visit_epoch if stats else None,
            "epoch": lv.epochs_done, "global_epoch": self.progress.global_epoch,
            "lr": stats.lr if stats else None,
            "train_loss": stats.loss if stats else None,
            "train_acc": stats.acc if stats else None,
            "val_loss": None, "val_acc": None,
            "wall_time": self.clock.wall_time(), "train_time": self.clock.train_time(),
            "event": stats.event if stats else event,
        }

    def epoch(self, level: Level, stats: EpochStats) -> None:
        """The row of one epoch of ``level`` (evaluated on the finest where configured)."""
        row = self.row(level.name, stats)
        every = self.eval_spec.every
        if level.name == self.finest and (every == "epoch" or (every == "level" and stats.last)):
            self.evaluate_into(row)
        self.write(row)
        if self.bar is not None:
            if self.bar.n + stats.fraction > self.bar.total:  # a visit is at least one batch,
                self.bar.total = round(self.bar.n + stats.fraction, 6)  # more than planned
            self.bar.update(stats.fraction)
            self.bar.set_postfix(cycle=self.progress.cycle, level=level.name,
                                 epoch=f"{stats.visit_epoch:g}", loss=f"{stats.loss:.3f}",
                                 acc=f"{stats.acc:.3f}", refresh=False)

    def event(self, level: str, event: str, evaluate: bool = False) -> None:
        """An event row of ``level`` (with the finest network's validation values)."""
        row = self.row(level, None, event)
        if evaluate:
            self.evaluate_into(row)
        self.write(row)

    def write(self, row: dict[str, Any]) -> None:
        with self.clock.excluded():
            if self.log is not None:
                self.log.append(row)
            self._last_row = row
            if self.hooks.wanted("mlsgd_epoch_end"):
                self.emit("mlsgd_epoch_end", record=read_only(row))

    # ------------------------------------------------------------------ evaluation

    def evaluate_into(self, row: dict[str, Any]) -> None:
        """Validation loss and accuracy of the finest network into ``row`` (once per weights
        version: an unchanged network is not evaluated again)."""
        fin = self.levels[self.finest]
        if fin.version == self._version_evaluated and self.last_val is not None:
            return
        with self.clock.excluded():
            self.fresh_statistics(row)
            loss, acc = self.evaluate(fin, fin.data.val_x, fin.data.val_y)
        self.last_val = (loss, acc)
        self._version_evaluated = fin.version
        row["val_loss"], row["val_acc"] = loss, acc

    def fresh_statistics(self, row: dict[str, Any] | None = None) -> None:
        """Re-estimate the finest network's BatchNorm statistics if its weights changed since
        they were last estimated (``eval.recalibrate`` images; collective under torchrun)."""
        fin = self.levels[self.finest]
        images = self.eval_spec.recalibrate
        if images <= 0 or fin.version == self._stats_version or \
                not bn.has_batchnorm(fin.model):
            return
        if row is not None and self.eval_spec.compare_running and len(fin.data.val_x):
            row["val_acc_running"] = self.evaluate(fin, fin.data.val_x, fin.data.val_y)[1]
        start = time.perf_counter()
        # seeded by the global epoch (checkpointed), so a resumed run draws the same images
        gen = torch.Generator().manual_seed(
            self.seed * 1_000_003 + round(self.progress.global_epoch * 1000))
        cuda = [self.device] if self.device.type == "cuda" else []
        world = distributed.world_size()
        with torch.random.fork_rng(devices=cuda), distributed.local_batchnorm(fin.model):
            bn.recalibrate(fin.model, fin.data.train_x, images=images,
                           batch_size=fin.batch_size, generator=gen,
                           shard=(distributed.rank(), world),
                           reduce=_sum_over_ranks if world > 1 else None)
        fin.version += 1  # the buffers changed (gradient passes may use running statistics)
        self._stats_version = fin.version
        self.bn_time += time.perf_counter() - start
        self.bn_estimates += 1

    def statistics_estimated(self, version: int) -> None:
        """The finest network's statistics were just re-estimated at least as well as
        :meth:`fresh_statistics` would (after a prolongation): no second estimate needed."""
        self._stats_version = version

    def evaluate(self, lv: Level, x: Tensor, y: Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) of ``lv``'s model; distributed: each rank a contiguous shard,
        sums all-reduced."""
        bsz = self.eval_spec.batch_size
        if distributed.world_size() == 1:
            return lv.objective.evaluate(x, y, batch_size=bsz)
        part = distributed.shard_slice(len(x))
        m = part.stop - part.start
        loss, acc = lv.objective.evaluate(x[part], y[part], batch_size=bsz)
        loss_sum, correct = distributed.all_reduce_floats([loss * m, acc * m],
                                                          like=lv.params[0])
        n = max(len(x), 1)
        return loss_sum / n, round(correct) / n

    # ------------------------------------------------------------------ hooks

    def view(self) -> RunView:
        """What the event hooks see now."""
        p = self.progress
        row = self._last_row
        return RunView(
            name=self.name, method=self.method, out_dir=self.out_dir,
            checkpoint=self.folder.checkpoint_path, cycle=p.cycle, cycles_done=p.cycles_done,
            cycles=self.n_cycles, level=row["level"] if row else None,
            global_epoch=p.global_epoch, record=read_only(row), finest=self.finest,
            model=self.levels[self.finest].model, train_time=self.clock.train_time(),
            wall_time=self.clock.wall_time(), stop_reason=p.stop_reason,
            config=self.config, config_hash=self.config_hash, levels=self.level_table)

    def emit(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook with the view as ``run`` (rank 0); one that raises ends the run
        with :class:`~mlsgd_dsl.errors.PluginFailure` naming the plugin."""
        if not self.hooks.wanted(hook_name):
            return
        hint = ""
        if hook_name in ("mlsgd_epoch_end", "mlsgd_cycle_end") and self.folder.checkpoints:
            hint = f"; {checkpoint_note(self.out_dir, self.progress.cycles_done)}"
        self.hooks.emit(hook_name, resume_hint=hint, run=self.view(), **kwargs)
