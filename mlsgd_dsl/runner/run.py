"""The generic MLSGD trainer: Algorithm 4 of the thesis over any compiled hierarchy.

:func:`run` trains a :class:`~mlsgd_dsl.compiler.Compiled` hierarchy and leaves a run folder:
``resolved.toml``/``resolved.json``, ``metrics.csv``/``metrics.jsonl`` (one row per epoch of any
level, plus event rows), ``checkpoint.pt`` after every cycle, ``summary.json``/``summary.md``
and ``accuracy.png``.

Crash safety: checkpoints are written atomically after every cycle (the one before is kept as
``checkpoint.prev.pt``, used with a message when the newer one cannot be loaded); metrics are
appended and cut back to the checkpoint's row count on ``--resume``; the checkpoint holds the
configuration hash (a changed hierarchy is refused unless ``force``), the seeds and all RNG
states, the correction strategy's ``state_dict()``, so a resumed run repeats the uninterrupted
one. Event hooks are called through pluggy with a read-only
:class:`~mlsgd_dsl.runner.events.RunView`; one that raises ends the run with
:class:`~mlsgd_dsl.errors.PluginFailure`.

The parts, each owning its state: :class:`~mlsgd_dsl.runner.process.RunProcess` (threads,
flush-denormal, global RNGs, process group — entered around construction and ``fit()``, restored
after), :class:`~mlsgd_dsl.runner.io.RunIO` (metrics rows, evaluation, hooks, clocks; with
:class:`~mlsgd_dsl.runner.folder.RunFolder` for the folder and checkpoints),
:class:`~mlsgd_dsl.runner.driver.Driver` (descend / ascend / smooth, the host of the level solver
and the strategies, a fresh :class:`~mlsgd_dsl.runner.state.CycleState` per cycle) and
:class:`Trainer`, which builds them and runs the cycles.

Under ``torchrun`` (``WORLD_SIZE > 1``) every level trains with DistributedDataParallel on
slices of the same global batches; rank 0 writes the run folder and calls the event hooks
(:mod:`mlsgd_dsl.runner.distributed`, ``docs/scaling.md``).

One cycle (see :mod:`mlsgd_dsl.runner.cycle` for V/W/F, cascade and fmg): the finest iterate
``w_{L,k,0}`` is restricted level by level to the coarsest (no training on the way down, thesis
Fig. 3.2); at each descent the coarse level's objective ``H_l`` is set up by the correction
strategy (:mod:`mlsgd_dsl.runner.corrections`); then the levels train bottom-up, each adding the
prolongated step ``P(w_l − R w_{l+1})`` of the level below before its own epochs
(:mod:`mlsgd_dsl.runner.level`). ``method = "sgd"`` trains the finest level alone through the
same level solver (the baseline); there a "cycle" (checkpoint unit) is one epoch.

Choices where the thesis is silent or the configuration needed a definition (also in the
report of the runner's author):

* Time (``train_time``, the plots' axis, ``time_budget``) counts training only: evaluation and
  checkpoint writing are excluded; ``wall_time`` counts everything since the run started.
* The finest network is evaluated on the validation split (``mlsgd.eval.every``): ``epoch`` —
  after every epoch of the finest level and right after every prolongation into it (coarse
  epochs leave the finest network unchanged, so their rows carry no validation values);
  ``level`` — at the end of every visit of the finest level and after every prolongation into
  it; ``cycle`` — at the end of every cycle.
* BatchNorm statistics are re-estimated after every non-zero prolongation
  (``bn_recalibration`` images), before the level trains or is evaluated; restriction carries
  the buffers down with the weights (full state dicts).
* Whatever the run reports or leaves behind — every evaluation row, the checkpoints' finest
  network, the summary — uses BatchNorm statistics that match the weights: before each of
  them the finest network's statistics are re-estimated on ``eval.recalibrate`` training images
  if its weights changed since the last estimate (MLSGD and ``method = "sgd"`` alike). The
  running averages a short visit at a high step leaves behind can be far off (a reported 0.135
  against 0.717 for the same weights, :mod:`mlsgd_dsl.runner.bn`). The images are drawn by a
  generator seeded from ``seed`` and the global epoch (so a resumed run draws the same ones),
  the global RNG is left untouched, and under torchrun each rank passes its share of the
  batches and the statistics are combined (the same as one process computes). Training
  itself uses batch statistics, so the weights do not depend on it. Its time is excluded
  from training time, like evaluation, and reported in the summary (``bn_estimates``, ``bn_time``).
* ``optimizer_state = "transfer"`` treats the first moment as a step-like (primal) vector:
  ``R`` on the way down, ``P`` on the way up, replacing the receiving level's first moment;
  the rest of the state is kept per level (Adam's first moment is only set where the level
  already has a second moment).
* λ (``step_regularization``) applies on every level below the finest, with or without a
  correction; the finest level's objective is ``F_L`` (with variance reduction: SVRG around
  ``w_{L,k,0}``).
* ``plan = "auto"`` turns ``time_budget`` into cycles and epochs from measured costs before
  training (:mod:`mlsgd_dsl.runner.plan`); the budget still stops the run.
* ``time_budget`` stops before the next step once exceeded; coarse steps not yet prolongated
  are dropped (never carried up untrained), the finest network is evaluated as it is.
* The angle condition is also applied on the finest level (Algorithm 5 runs on every level,
  with ``P`` the identity on level L), not in ``method = "sgd"``.
* Gradient passes (corrections, angle condition, early termination) differentiate the
  training-mode function: BatchNorm uses the statistics of each chunk of
  ``full_batch_size`` images and its running statistics are restored afterwards (the
  strategies' option ``batchnorm = "running"`` gives eval mode instead; see
  :meth:`~mlsgd_dsl.runner.objective.Objective.gradient` for the measurement behind this).
* The stochastic correction draws one sample per cycle and uses the same image indices on
  every level; the angle condition with ``gradient = "stochastic"`` and the same fraction
  shares it (and the gradient).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import RunError, UserError
from . import bn, distributed, rundir
from .checkpoint import rng_state, set_rng_state
from .corrections import Correction
from .cycle import is_pass, run_cycle, visit_order
from .driver import Driver
from .events import read_only
from .folder import RunFolder
from .io import RunIO
from .plan import Plan, plan_run
from .process import RunProcess
from .records import read_rows
from .schedule import Schedule
from .setup import (
    build_levels,
    config_hash,
    resolved_config,
    select_device,
    trained_levels,
    validate_or_raise,
)
from .state import Progress


class Trainer:
    """Builds a run's parts from a compiled hierarchy and trains its cycles (:meth:`fit`).

    Constructing one changes no process-wide setting (see :mod:`.process`); with ``resume`` a
    bad or changed checkpoint is refused here, before any training.
    """

    def __init__(self, compiled: Any, *, out_dir: Path | str | None = None,
                 resume: Path | str | None = None, device: str | None = None,
                 quiet: bool = False, validate: bool = True, force: bool = False,
                 overwrite: bool = False) -> None:
        self.c = compiled
        self.hierarchy = compiled.hierarchy
        self.spec = self.hierarchy.mlsgd
        self.device = distributed.device_for_rank(select_device(device, self.spec.device))
        self.process = RunProcess(threads=self.spec.threads, seed=self.spec.seed,
                                  device=self.device)
        try:
            with self.process:
                self._build(out_dir, resume, quiet=quiet, validate=validate, force=force,
                            overwrite=overwrite)
        except BaseException:
            self.process.close()
            raise

    def _build(self, out_dir: Path | str | None, resume: Path | str | None, *, quiet: bool,
               validate: bool, force: bool, overwrite: bool) -> None:
        c, spec = self.c, self.spec
        # under torchrun (WORLD_SIZE > 1) the process has joined the group: rank 0 writes
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        # only looks: the folder is created in start(), once every check has passed
        self.plan = rundir.plan(out_dir, resume, name=self.hierarchy.name, overwrite=overwrite)
        self.out_dir = self.plan.path or rundir.RUNS_ROOT  # a default folder: named in start()
        self.resume_dir = self.plan.resume_from
        self.force = force
        self._set_aside: Path | None = None
        if validate:
            validate_or_raise(c)

        self.process.seed()
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.sgd = spec.method == "sgd"
        self.finest = c.finest
        self.levels = build_levels(c, trained_levels(c, self.sgd), self.device, sgd=self.sgd)
        self.config = resolved_config(c)
        self.config_hash = config_hash(c)
        self.quiet = quiet
        # read before planning: a resumed run keeps the plan its checkpoint holds
        self._resume_ck = self._load_resume_checkpoint() if resume is not None else None
        self.budget_plan = self._make_plan()
        self.sgd_total: float | None = None
        if self.sgd:
            fin = self.levels[self.finest]
            total = spec.sgd_epochs if spec.sgd_epochs is not None else spec.cycles * fin.epochs
            if self.budget_plan is not None:
                total = self.budget_plan.sgd_epochs
            self.sgd_total = float(total)
            self.n_cycles = max(1, math.ceil(self.sgd_total - 1e-9))
        else:
            self.n_cycles = (spec.cycles if self.budget_plan is None
                             else self.budget_plan.cycles)
        self.total_epochs = self.planned_epochs()
        if self.budget_plan is not None:
            self.budget_plan.horizon = self.total_epochs
        self.schedule = Schedule(spec.schedule, self.total_epochs)
        self.strategy: Correction = c.correction() if not self.sgd else Correction()
        self.progress = Progress()
        folder = RunFolder(self.out_dir, is_main=self.is_main,
                           checkpoints=self.hierarchy.report.checkpoint != "none")
        self.io = RunIO(compiled=c, folder=folder, progress=self.progress, levels=self.levels,
                        n_cycles=self.n_cycles, config=self.config,
                        config_hash=self.config_hash, quiet=quiet)
        self.driver = Driver(compiled=c, levels=self.levels, strategy=self.strategy,
                             schedule=self.schedule, progress=self.progress, io=self.io,
                             generator=self.generator, device=self.device,
                             sgd_total=self.sgd_total)

    def _make_plan(self) -> Plan | None:
        """``mlsgd.plan``: the checkpoint's plan on resume, else a new one (rank 0 measures,
        every rank gets the same plan); applied to the levels' epochs here."""
        if self.spec.plan == "off":
            return None
        stored = (self._resume_ck or {}).get("plan")
        if stored is not None:
            plan = Plan.from_dict(stored)
        else:
            plan = plan_run(self.c, self.levels, sgd=self.sgd) if self.is_main else None
            plan = Plan.from_dict(distributed.broadcast_object(
                plan.as_dict() if plan is not None else None))
        for name, lv in self.levels.items():
            lv.epochs = plan.epochs.get(name, lv.epochs)
            lv.pass_epochs = plan.pass_epochs.get(name, lv.pass_epochs)
        return plan

    def planned_epochs(self) -> float:
        """Epochs on all levels the run plans (the horizon of cosine / one-cycle)."""
        if self.sgd:
            return self.sgd_total
        kind, total = self.spec.cycle, 0.0
        for k in range(self.n_cycles):
            for name in visit_order(self.c.path(k), kind, k):
                lv = self.levels[name]
                total += lv.pass_epochs if is_pass(kind, k) else lv.epochs
        return total

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, completed: int) -> None:
        if not self.io.folder.checkpoints:
            return
        with self.io.clock.excluded():
            self.io.fresh_statistics()  # every rank: the estimate is collective
        if not self.is_main:
            return
        with self.io.clock.excluded():
            keep = self.sgd or self.spec.optimizer_state != "reset"
            self.io.folder.save_checkpoint({
                "config_hash": self.config_hash,
                "seed": self.spec.seed,
                "data_seed": self.hierarchy.data.seed,
                "world_size": self.world,
                "cycles_done": completed,
                "rows": self.io.log.rows_written if self.io.log else 0,
                "global_epoch": self.progress.global_epoch,
                "level_epochs": {n: lv.epochs_done for n, lv in self.levels.items()},
                "train_time": self.io.clock.train_time(),
                "wall_time": self.io.clock.wall_time(),
                "finest": self.levels[self.finest].model.state_dict(),
                "optimizers": {n: lv.optimizer.state_dict() for n, lv in self.levels.items()
                               if keep and lv.optimizer is not None},
                "optimizer_kinds": {n: type(lv.optimizer).__name__
                                    for n, lv in self.levels.items()
                                    if keep and lv.optimizer is not None},
                "rng": rng_state(),
                "generator": self.generator.get_state(),
                "strategy": self.strategy.state_dict(),
                "stop_reason": self.progress.stop_reason,
                "schedule": {"kind": self.spec.schedule.kind,
                             "total_epochs": self.total_epochs},
                "plan": (self.budget_plan.as_dict() if self.budget_plan is not None
                         else None),
            })

    def _load_resume_checkpoint(self) -> dict[str, Any]:
        """Rank 0 reads the checkpoint; every rank gets it (or the same error)."""
        ck, error = None, None
        if self.is_main:
            try:
                source = RunFolder(self.resume_dir, is_main=True, checkpoints=True)
                ck = source.read_checkpoint(
                    config_hash=self.config_hash, force=self.force,
                    network=self.levels[self.finest].model.state_dict(),
                    network_name=f"level {self.finest!r} of "
                                 f"{getattr(self.c, 'file', None) or 'this hierarchy'}")
                self._set_aside = source.set_aside
            except UserError as exc:
                error = exc
        ck, message = distributed.broadcast_object((ck, str(error) if error else None))
        if error is not None:
            raise error
        if message is not None:
            raise RunError(message)
        return ck

    def _restore(self) -> int:
        ck = self._resume_ck
        if int(ck.get("world_size", 1)) != self.world and self.is_main:
            print(f"mlsgd-dsl: note: the checkpoint was written by {ck.get('world_size', 1)} "
                  f"process(es), this run has {self.world}; the global batch is the same",
                  file=sys.stderr)
        self.levels[self.finest].load_state(ck["finest"])
        kinds = ck.get("optimizer_kinds", {})
        for name, state in ck.get("optimizers", {}).items():
            if name in self.levels:
                opt = self.levels[name].new_optimizer()
                if kinds.get(name, type(opt).__name__) != type(opt).__name__:
                    continue  # a forced resume changed the optimiser: it starts afresh
                try:
                    opt.load_state_dict(state)
                except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                    raise RunError(f"the optimiser state of level {name!r} does not fit this "
                                   f"hierarchy's level ({exc}); --force accepts changed "
                                   "settings, never a different network",
                                   file=str(self.resume_dir / "checkpoint.pt")) from None
        for name, epochs in ck.get("level_epochs", {}).items():
            if name in self.levels:
                self.levels[name].epochs_done = float(epochs)
        self.strategy.load_state_dict(ck["strategy"])
        self.progress.global_epoch = float(ck["global_epoch"])
        # a run stopped early (time budget, divergence) continues when resumed explicitly;
        # the budget counts the training time of all sessions
        set_rng_state(ck["rng"])
        self.generator.set_state(ck["generator"].to("cpu", torch.uint8))
        self.io.open(resume_rows=int(ck["rows"]), train_time0=float(ck["train_time"]),
                     wall_time0=float(ck["wall_time"]))
        return int(ck["cycles_done"])

    # ------------------------------------------------------------------ the run

    def start(self) -> int:
        """Open the run folder (or restore the checkpoint); return the first cycle to run.
        Call inside ``with trainer.process:`` (``fit()`` does)."""
        opened, error = None, None
        if self.is_main:  # rank 0 creates the folder; every rank learns its name (or the error)
            try:
                opened = str(rundir.open_folder(self.plan))
            except UserError as exc:
                error = exc
            if error is None and self._set_aside is not None:
                aside = Path(opened) / self._set_aside.name
                if aside.is_file():
                    aside.replace(aside.with_name(aside.name + ".corrupt"))
        opened, message = distributed.broadcast_object((opened, str(error) if error else None))
        if error is not None:
            raise error
        if message is not None:
            raise RunError(message)
        self.out_dir = self.io.folder.out_dir = Path(opened)
        if self.is_main and self.spec.eval.recalibrate == 0 and \
                bn.has_batchnorm(self.levels[self.finest].model):
            from ..validation import BATCHNORM_OFF

            print(f"mlsgd-dsl: warning: {BATCHNORM_OFF}", file=sys.stderr)
        if self.resume_dir is not None:
            start = self._restore()
        else:
            self.io.open()
            start = 0
        self.io.folder.write_config(self.config)
        if self.budget_plan is not None and self.is_main:
            self.io.folder.write_json("plan.json", self.budget_plan.as_dict())
            if not self.quiet:
                print(f"mlsgd-dsl: {self.budget_plan.describe(self.spec.cycle)}",
                      file=sys.stderr)
        if start == 0 and self.resume_dir is None:
            self._checkpoint(0)
        return start

    def fit(self) -> dict[str, Any]:
        """Train all cycles, then evaluate and write the summary; returns the summary."""
        try:
            with self.process:
                start = self.start()
                self.io.emit("mlsgd_run_start")
                self._train(start)
                return self._finish()
        finally:
            self.process.close()

    def _train(self, start: int) -> None:
        driver, progress = self.driver, self.progress
        self.io.open_bar(self.total_epochs)
        k = start
        try:
            while k < self.n_cycles and progress.stop_reason is None:
                driver.begin_cycle(k)
                if self.sgd:
                    driver.smooth(self.finest)
                else:
                    run_cycle(driver, list(driver.state.path), self.spec.cycle, k)
                if progress.stop_reason == "time budget":
                    break  # an interrupted cycle is not a completed one
                driver.end_cycle(k)
                k += 1
                progress.cycles_done = k
                if self.spec.eval.every == "cycle":
                    self.io.event(self.finest, "cycle", evaluate=True)
                self._checkpoint(k)
                self.io.emit("mlsgd_cycle_end", cycle=k - 1)
        except KeyboardInterrupt:
            # cycles counted as in metrics.csv (from 0); the checkpoint by completed cycles
            raise RunError(
                f"interrupted during cycle {progress.cycle} (counted from 0, as in metrics.csv); "
                f"{rundir.checkpoint_note(self.out_dir, progress.cycles_done)}") from None
        finally:
            self.io.close_bar()

    def _finish(self) -> dict[str, Any]:
        from .summary import build_summary, write_summary

        fin = self.levels[self.finest]
        spec, io = self.spec, self.io
        closing: dict[str, Any] = {}
        with io.clock.excluded():
            io.fresh_statistics(closing)
            d = fin.data
            train_loss, train_acc = io.evaluate(fin, d.train_x, d.train_y)
            val_loss, val_acc = io.evaluate(fin, d.val_x, d.val_y) \
                if len(d.val_x) else (float("nan"), float("nan"))
            test_loss, test_acc = io.evaluate(fin, d.test_x, d.test_y)
        rows = read_rows(self.out_dir) if io.log is not None and io.log.rows_written else []
        final = {
            "train_acc": train_acc, "val_acc": val_acc, "test_acc": test_acc,
            "train_loss": train_loss, "val_loss": val_loss, "test_loss": test_loss,
            "training_time": io.clock.train_time(), "wall_time": io.clock.wall_time(),
            "cycles": self.progress.cycles_done, "stopped": self.progress.stop_reason,
            "global_epochs": self.progress.global_epoch,
            "lr": spec.lr if not isinstance(spec.lr, dict) else json.dumps(spec.lr),
            "schedule": spec.schedule.kind,
            "correction": self.strategy.describe() if not self.sgd else "none",
            "variance_reduction": bool(getattr(self.strategy, "variance_reduction", False)),
            "cycle_kind": None if self.sgd else spec.cycle,
            "config_hash": self.config_hash,
            # BatchNorm re-estimations before evaluations/checkpoints (not training time)
            "bn_estimates": io.bn_estimates, "bn_time": io.bn_time,
            "bn_images": spec.eval.recalibrate if io.bn_estimates else 0,
        }
        if "val_acc_running" in closing:
            final["val_acc_running"] = closing["val_acc_running"]
        if not self.is_main:  # rank 0 writes the run folder; the others report its place
            return {**final, "run_dir": str(self.out_dir), "rank": self.rank}
        summary = build_summary(rows, name=self.hierarchy.name, method=spec.method,
                                thresholds=list(self.hierarchy.report.thresholds),
                                final=final)
        summary["run_dir"] = str(self.out_dir)
        write_summary(self.out_dir, summary)
        from ..handover import save_network_or_warn  # the weights, with the statistics used above

        save_network_or_warn(self.out_dir, fin.model, self.c, self.finest, fin.data)
        if self.hierarchy.report.plot and rows:
            try:
                from .plots import plot_accuracy

                plot_accuracy(rows, self.out_dir / "accuracy.png",
                              title=f"{self.hierarchy.name} ({spec.method})")
            except ImportError:  # matplotlib missing: the numbers are in the summary
                pass
        io.emit("mlsgd_run_end", summary=read_only(summary))
        return summary


def run(compiled: Any, *, out_dir: Path | str | None = None, resume: Path | str | None = None,
        device: str | None = None, quiet: bool = False, validate: bool = True,
        force: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``compiled`` and return the run summary (also written to the run folder).

    ``resume``: a run folder; training continues after its last checkpoint (no cycle repeated
    or lost). A changed configuration is refused (:class:`~mlsgd_dsl.errors.RunError`) unless
    ``force``. ``device``: "auto" | "cpu" | "cuda" (default: ``mlsgd.device``). Process-wide
    settings are restored when it returns or raises. ``out_dir`` must be new or empty; a folder
    holding a run is replaced only with ``overwrite``. ``resume`` with a different ``out_dir``
    forks the run into ``out_dir`` (see :mod:`mlsgd_dsl.runner.rundir`).
    """
    trainer = Trainer(compiled, out_dir=out_dir, resume=resume, device=device, quiet=quiet,
                      validate=validate, force=force, overwrite=overwrite)
    return trainer.fit()
