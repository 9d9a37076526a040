"""The generic MLSGD trainer: Algorithm 4 of the thesis over any compiled hierarchy.

:func:`run` trains a :class:`~mlsgd_dsl.compiler.Compiled` hierarchy and leaves a run folder:
``resolved.toml``/``resolved.json``, ``metrics.csv``/``metrics.jsonl`` (one row per epoch of any
level, plus event rows), ``checkpoint.pt`` after every cycle, ``summary.json``/``summary.md``
and ``accuracy.png``.

Crash safety: checkpoints are written atomically after every cycle (the one before is kept as
``checkpoint.prev.pt``, used with a message when the newer one cannot be loaded); metrics are
appended and cut back to the checkpoint's row count on ``--resume``; the checkpoint holds the
configuration hash (a changed hierarchy is refused unless ``force``), the seeds and all RNG
states, so a resumed run repeats the uninterrupted one. Event hooks run one implementation at a
time; one that raises ends the run with :class:`~mlsgd_dsl.errors.PluginFailure`.

Under ``torchrun`` (``WORLD_SIZE > 1``) every level trains with DistributedDataParallel on
slices of the same global batches; rank 0 writes the run folder and calls the event hooks
(:mod:`mlsgd_dsl.runner.distributed`, ``docs/scaling.md``).

One cycle (see :mod:`mlsgd_dsl.runner.cycle` for V/W/F): the finest iterate ``w_{L,k,0}`` is
restricted level by level to the coarsest (no training on the way down, thesis Fig. 3.2); at
each descent the coarse level's objective ``H_l`` is set up by the correction strategy
(:mod:`mlsgd_dsl.runner.corrections`); then the levels train bottom-up, each adding the
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
* ``optimizer_state = "transfer"`` treats the first moment as a step-like (primal) vector:
  ``R`` on the way down, ``P`` on the way up, replacing the receiving level's first moment;
  the rest of the state is kept per level (Adam's first moment is only set where the level
  already has a second moment).
* λ (``step_regularization``) applies on every level below the finest, with or without a
  correction; the finest level's objective is ``F_L`` (with variance reduction: SVRG around
  ``w_{L,k,0}``).
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

import copy
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, PluginFailure, RunError, UserError
from . import bn, distributed, rundir
from .checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_bytes,
    load_checkpoint,
    network_mismatch,
    previous_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .corrections import Correction, LevelCorrection, Sample
from .cycle import cycle as run_cycle_recursion
from .cycle import visit_order
from .level import (
    AngleCheck,
    Augment,
    EpochStats,
    Level,
    Visit,
    get_first_moment,
    set_first_moment,
    train_visit,
)
from .objective import norm
from .records import MetricsLog, read_rows
from .schedule import Schedule

CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- helpers


def flush_denormal_enabled() -> bool:
    """Whether the CPU flushes denormal floats to zero (``torch.set_flush_denormal``)."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


def _select_device(requested: str | None, configured: str) -> torch.device:
    choice = requested or configured or "auto"
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available",
                          path=("mlsgd", "device"))
    return torch.device(choice)


def _config(c: Any) -> dict[str, Any]:
    resolved = getattr(c, "resolved", None)
    if callable(resolved):
        return resolved()
    return c.hierarchy.model_dump(mode="json")


def _config_hash(c: Any) -> str:
    fn = getattr(c, "config_hash", None)
    if callable(fn):
        return str(fn())
    text = json.dumps(_config(c), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _toml_key(key: str) -> str:
    if key and all(ch.isalnum() or ch in "_-" for ch in key):
        return key
    return json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}"
                                for k, v in value.items() if v is not None) + " }"
    return json.dumps(str(value))


def toml_dumps(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """A small TOML writer for resolved configurations (``None`` values are left out)."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict) and value:
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(str(key))} = {_toml_value(value)}")
    out = "\n".join(lines)
    for key, value in tables:
        name = ".".join(_toml_key(str(k)) for k in (*prefix, key))
        body = toml_dumps(value, (*prefix, key))
        out += ("\n\n" if out else "") + f"[{name}]" + ("\n" + body if body else "")
    return out


def _plugin_label(compiled: Any, impl: Any) -> str:
    """``plugin NAME (DIST VERSION)`` of a hook implementation, from the registry's records."""
    from ..registry import Entry, _dist_of

    name = impl.plugin_name
    registry = getattr(compiled, "registry", None)
    for provided in getattr(registry, "provided", []):
        if provided.plugin == name:
            return Entry(None, name, provided.distribution, provided.version).label()
    dist, version = _dist_of(impl.plugin)
    if dist:
        return Entry(None, name, dist, version).label()
    if name.isdigit():  # registered without a name: say what it is
        name = getattr(impl.plugin, "__name__", None) or type(impl.plugin).__qualname__
    module = getattr(impl.plugin, "__name__", None) or type(impl.plugin).__module__
    return f"plugin {name} (registered at run time from {module})"


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Runs a compiled hierarchy; also the host of the level solver and the correction."""

    def __init__(self, compiled: Any, *, out_dir: Path | str | None = None,
                 resume: Path | str | None = None, device: str | None = None,
                 quiet: bool = False, validate: bool = True, force: bool = False,
                 overwrite: bool = False) -> None:
        self.c = compiled
        self.h = compiled.hierarchy
        self.spec = self.h.mlsgd
        self.quiet = quiet
        spec = self.spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        # denormals: 13x slower evaluation of fresh networks otherwise (DESIGN); the previous
        # setting is restored when fit() returns (torch has no getter: probe it)
        self._flush_before = flush_denormal_enabled()
        torch.set_flush_denormal(True)
        self.device = distributed.device_for_rank(_select_device(device, spec.device))
        # under torchrun (WORLD_SIZE > 1): join the process group; rank 0 writes the run folder
        self._owns_group = distributed.setup(self.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0

        # only looks: the folder is created in start(), once every check has passed
        self.folder = rundir.plan(out_dir, resume, name=self.h.name, overwrite=overwrite)
        self.out_dir = self.folder.path or rundir.RUNS_ROOT
        self.resume_dir = self.folder.resume_from
        self.force = force
        self._set_aside: Path | None = None

        if validate:
            self._validate()

        torch.manual_seed(spec.seed)
        random.seed(spec.seed)
        self.generator = torch.Generator().manual_seed(spec.seed)

        self.sgd = spec.method == "sgd"
        self.finest = compiled.finest
        self.n_paths = max(1, len(getattr(compiled, "paths", [None])))
        if self.sgd:
            used = [self.finest]
        else:
            used = []
            for k in range(self.n_paths):
                for name in compiled.path(k):
                    if name not in used:
                        used.append(name)
        self.used = used
        data = compiled.data(self.device)
        models = self._initial_models(used)
        aug = self.h.data.augment
        obj = spec.objective
        self.levels: dict[str, Level] = {}
        for name in used:
            model = distributed.prepare_model(models[name].to(self.device), self.device)
            splits = data[name]
            fill = splits.black() if hasattr(splits, "black") else 0.0
            self.levels[name] = Level(
                name, model, splits, h=compiled.h(name),
                lr=compiled.for_level(spec.lr, name),
                batch_size=compiled.for_level(spec.batch_size, name),
                epochs=compiled.for_level(spec.epochs, name),
                optimizer=compiled.for_level(spec.optimizer, name),
                l2=obj.l2, smoothness=obj.smoothness, device=self.device,
                augment=Augment(flip=aug.flip, crop=aug.crop, fill=fill))
            self.levels[name].train_model = distributed.wrap(model, self.device)
        small = [n for n, lv in self.levels.items()
                 if min(lv.batch_size, len(lv.data.train_x)) < self.world]
        if small:  # a rank without images in a batch has no loss to differentiate
            raise ConfigError(f"the batches of level(s) {', '.join(small)} are smaller than "
                              f"the {self.world} processes that share them",
                              path=("mlsgd", "batch_size"))
        fin = self.levels[self.finest]
        if self.sgd:
            total = spec.sgd_epochs if spec.sgd_epochs is not None else \
                spec.cycles * fin.epochs
            self.sgd_total = float(total)
            self.n_cycles = max(1, math.ceil(self.sgd_total - 1e-9))
        else:
            self.n_cycles = spec.cycles
        self.total_epochs = self.planned_epochs()
        self.schedule = Schedule(spec.schedule, self.total_epochs)
        self.strategy: Correction = compiled.correction() if not self.sgd else Correction()
        self.no_correction = Correction()
        # BatchNorm in gradient passes: batch statistics (default) or running statistics
        self.batchnorm_mode = getattr(self.strategy, "batchnorm", "batch")
        self.divergence_factor = spec.divergence.factor
        self.eval_every = spec.eval.every
        self.config_hash = _config_hash(compiled)

        # per-run counters (checkpointed)
        self.global_epoch = 0.0
        self.cycles_done = 0
        self.train_time0 = 0.0
        self.wall_time0 = 0.0
        self.stop_reason: str | None = None
        self.last_val: tuple[float, float] | None = None
        # per-cycle state
        self.cycle = 0
        self.anchor: dict[str, list[Tensor]] = {}
        self.corr: dict[str, LevelCorrection | None] = {}
        self.started: dict[str, bool] = {}
        self.pending: dict[str, list[Tensor] | None] = {}
        self.angle_gradient: list[Tensor] | None = None
        self._grad_cache: dict[tuple, list[Tensor]] = {}
        self._samples: dict[float, Sample] = {}
        self._transfers: dict[tuple[str, ...], Any] = {}
        self.path_k: list[str] = []
        self._finest_version_evaluated = -1
        self.log: MetricsLog | None = None
        self.bar = None
        self.hook = compiled.registry.hook() if getattr(compiled, "registry", None) else None
        self._t0 = time.perf_counter()
        self._excluded = 0.0
        self._excluded_depth = 0
        self.strategy_k: Correction = self.no_correction
        self._resume_ck = self._load_resume_checkpoint() if resume is not None else None

    # ------------------------------------------------------------------ setup

    def _validate(self) -> None:
        try:
            from ..validation import validate as run_checks
        except ImportError:
            return
        report = run_checks(self.c)
        if not report.ok:
            failed = [r for r in report.rows if r.status == "fail"]
            text = "; ".join(f"{r.name}: {r.detail}" for r in failed[:5])
            raise ConfigError(f"the hierarchy fails validation ({len(failed)} check(s)): "
                              f"{text}", file=getattr(self.c, "file", None))

    def _initial_models(self, used: Sequence[str]) -> dict[str, nn.Module]:
        """Fresh models: ``nested`` — every level that has a coarser neighbour starts from the
        prolongated (full state dict, buffers too) initial weights of that neighbour, so along a
        chain all start from ``P…P w_0`` of the coarsest; ``independent`` — each level's own
        initialisation."""
        c = self.c
        if self.spec.init == "independent" or self.sgd:
            # The SGD baseline is a plain network: its own initialisation, not P…P w_0.
            return {name: c.model(name) for name in used}
        models: dict[str, nn.Module] = {}
        graph = c.graph
        for name in c.levels:  # coarsest first: predecessors are done before their successors
            models[name] = c.model(name)
            preds = [p for p in c.levels if graph.has_edge(p, name)]
            if preds:
                with torch.no_grad():
                    sd = c.transfer(preds[0], name).prolongate(models[preds[0]].state_dict())
                models[name].load_state_dict(sd)
        return {n: models[n] for n in used}

    def planned_epochs(self) -> float:
        """Epochs on all levels the run plans (the horizon of cosine / one-cycle)."""
        if self.sgd:
            return self.sgd_total
        total = 0.0
        for k in range(self.n_cycles):
            for name in visit_order(self.c.path(k), self.spec.cycle):
                total += self.levels[name].epochs
        return total

    # ------------------------------------------------------------------ clocks

    def _now_train(self) -> float:
        return self.train_time0 + (time.perf_counter() - self._t0) - self._excluded

    def _now_wall(self) -> float:
        return self.wall_time0 + (time.perf_counter() - self._t0)

    class _Excluded:
        def __init__(self, trainer: Trainer) -> None:
            self.t = trainer

        def __enter__(self) -> None:
            self.t._excluded_depth += 1
            if self.t._excluded_depth == 1:
                self.t._excluded_start = time.perf_counter()

        def __exit__(self, *exc: Any) -> None:
            self.t._excluded_depth -= 1
            if self.t._excluded_depth == 0:
                self.t._excluded += time.perf_counter() - self.t._excluded_start

    def excluded(self) -> Trainer._Excluded:
        """Context in which time does not count as training time (evaluation, checkpoints)."""
        return Trainer._Excluded(self)

    # ------------------------------------------------------------------ level-solver host

    def lr(self, base: float, epoch: float, step: float = 0.0) -> float:
        return self.schedule.lr(base, epoch, step)

    def schedule_constant(self) -> bool:
        return self.schedule.constant_within(0.0)

    def deadline(self) -> float | None:
        if self.spec.time_budget is None:
            return None
        # perf_counter value at which train time reaches the budget
        return self._t0 + self._excluded + (self.spec.time_budget - self.train_time0)

    def epoch_end(self, level: Level, stats: EpochStats) -> None:
        row = self._row(level.name, stats)
        fin = level.name == self.finest
        if fin and (self.eval_every == "epoch" or (self.eval_every == "level" and stats.last)):
            self._evaluate_into(row)
        self._write(row)
        if self.bar is not None:
            self.bar.update(stats.fraction)
            self.bar.set_postfix(cycle=self.cycle, level=level.name,
                                 epoch=f"{stats.visit_epoch:g}", loss=f"{stats.loss:.3f}",
                                 acc=f"{stats.acc:.3f}", refresh=False)

    # ------------------------------------------------------------------ correction host

    def gradient(self, level: str, sample: Sample | None = None, *,
                 model: nn.Module | None = None) -> list[Tensor]:
        lv = self.levels[level]
        key = (level, lv.version if model is None else ("model", id(model)),
               sample.key if sample is not None else "full")
        if model is None and key in self._grad_cache:
            return self._grad_cache[key]
        # gradient passes are training work: they count as training time
        shared = {"shard": (self.rank, self.world), "reduce": distributed.all_reduce_} \
            if self.world > 1 else {}
        with distributed.local_batchnorm(model or lv.model):
            g = lv.objective.gradient(lv.data.train_x, lv.data.train_y,
                                      batch_size=self.spec.full_batch_size,
                                      indices=sample.indices if sample is not None else None,
                                      batchnorm=self.batchnorm_mode, model=model, **shared)
        if model is None:
            self._grad_cache[key] = g
        return g

    def sample(self, fraction: float) -> Sample:
        fraction = float(fraction)
        if fraction not in self._samples:
            n = len(self.levels[self.finest].data.train_x)
            m = max(1, min(n, round(fraction * n)))
            idx = torch.randperm(n, generator=self.generator)[:m].sort().values
            self._samples[fraction] = Sample(indices=idx.to(self.device), fraction=fraction,
                                             cycle=self.cycle)
        return self._samples[fraction]

    def snapshot(self, level: str) -> nn.Module:
        model = self.levels[level].model
        try:
            snap = copy.deepcopy(model)
        except Exception:  # a model deepcopy cannot handle: rebuild and load
            snap = self.c.model(level).to(self.device)
            snap.load_state_dict(model.state_dict())
        for p in snap.parameters():
            p.requires_grad_(True)
        return snap

    def at_start(self, level: str) -> bool:
        return self.started.get(level, False)

    # ------------------------------------------------------------------ rows & evaluation

    def _row(self, level: str, stats: EpochStats | None, event: str = "") -> dict[str, Any]:
        lv = self.levels[level]
        return {
            "cycle": self.cycle, "level": level,
            "visit_epoch": stats.visit_epoch if stats else None,
            "epoch": lv.epochs_done, "global_epoch": self.global_epoch,
            "lr": stats.lr if stats else None,
            "train_loss": stats.loss if stats else None,
            "train_acc": stats.acc if stats else None,
            "val_loss": None, "val_acc": None,
            "wall_time": self._now_wall(), "train_time": self._now_train(),
            "event": stats.event if stats else event,
        }

    def _evaluate_into(self, row: dict[str, Any]) -> None:
        fin = self.levels[self.finest]
        if fin.version == self._finest_version_evaluated and self.last_val is not None:
            return
        with self.excluded():
            loss, acc = self._evaluate(fin, fin.data.val_x, fin.data.val_y)
        self.last_val = (loss, acc)
        self._finest_version_evaluated = fin.version
        row["val_loss"], row["val_acc"] = loss, acc

    def _evaluate(self, lv: Level, x: Tensor, y: Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) of ``lv``'s model; distributed: each rank a contiguous shard,
        sums all-reduced."""
        bsz = self.spec.eval.batch_size
        if self.world == 1:
            return lv.objective.evaluate(x, y, batch_size=bsz)
        part = distributed.shard_slice(len(x))
        m = part.stop - part.start
        loss, acc = lv.objective.evaluate(x[part], y[part], batch_size=bsz)
        loss_sum, correct = distributed.all_reduce_floats([loss * m, acc * m],
                                                          like=lv.params[0])
        n = max(len(x), 1)
        return loss_sum / n, round(correct) / n

    def _write(self, row: dict[str, Any]) -> None:
        with self.excluded():
            if self.log is not None:
                self.log.append(row)
            self._emit("mlsgd_epoch_end", run=self, record=row)

    def _emit(self, hook_name: str, **kwargs: Any) -> None:
        """Call the event hook's implementations one by one (rank 0 only); an exception in one
        ends the run with :class:`PluginFailure` naming the plugin, never a traceback."""
        if self.hook is None or not self.is_main:
            return
        caller = getattr(self.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy's order: last registered first
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                continue  # an event has no result to wrap
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception as exc:
                where = ""
                if hook_name in ("mlsgd_epoch_end", "mlsgd_cycle_end") and \
                        self.h.report.checkpoint != "none":
                    where = f"; {rundir.checkpoint_note(self.out_dir, self.cycles_done)}"
                raise PluginFailure(f"{_plugin_label(self.c, impl)}: hook {hook_name} raised "
                                    f"{type(exc).__name__}: {exc}{where}") from None

    def _event(self, level: str, event: str, evaluate: bool = False) -> None:
        row = self._row(level, None, event)
        if evaluate:
            self._evaluate_into(row)
        self._write(row)

    # ------------------------------------------------------------------ the cycle driver

    def stopped(self) -> bool:
        return self.stop_reason is not None

    def _lam(self, level: str) -> float:
        return self.spec.step_regularization if level != self.finest else 0.0

    def _level_gradient(self, level: str) -> list[Tensor]:
        """Estimate of Euclidean ∇H_l at the level's current weights (λ term included)."""
        g = self.strategy_k.level_gradient(self, level, self.corr.get(level))
        lam = self._lam(level)
        if lam and not self.at_start(level) and level in self.anchor:
            lv = self.levels[level]
            with torch.no_grad():
                g = [a + lam * lv.h * (p.detach() - w0)
                     for a, p, w0 in zip(g, lv.params, self.anchor[level])]
        return g

    def _to_finest(self, level: str) -> Any:
        """P_{L←l} composed along this cycle's path (a graph may have several paths)."""
        path = self.path_k if level in self.path_k else [level, self.finest]
        key = tuple(path[path.index(level):])
        if key not in self._transfers:
            try:
                self._transfers[key] = self.c.transfer(level, self.finest, via=list(key))
            except TypeError:  # a Compiled without `via`: its default path
                self._transfers[key] = self.c.transfer(level, self.finest)
        return self._transfers[key]

    def begin_cycle(self, k: int) -> None:
        self.cycle = k
        self.path_k = [self.finest] if self.sgd else list(self.c.path(k))
        self._grad_cache.clear()
        self._samples.clear()
        self.corr.clear()
        self.anchor.clear()
        self.started.clear()
        self.pending.clear()
        self.angle_gradient = None
        self.strategy_k = self.strategy if k >= self.spec.uncorrected_cycles \
            else self.no_correction
        fin = self.levels[self.finest]
        if self.sgd:
            return
        self.anchor[self.finest] = fin.detached_params()  # w_{L,k,0}
        self.started[self.finest] = True
        self.pending[self.finest] = None
        self.corr[self.finest] = self.strategy_k.prepare(self, self.finest, None)
        angle = self.spec.angle
        if angle is not None:
            sample = None if angle.gradient == "full" else self.sample(angle.fraction)
            self.angle_gradient = self.gradient(self.finest, sample)

    def descend(self, fine: str, coarse: str) -> bool:
        fl, cl = self.levels[fine], self.levels[coarse]
        corrected = self.strategy_k.needs_fine_gradient(self.cycle)
        early = self.spec.early_stop
        tr = self.c.transfer(coarse, fine)
        target = None
        if corrected or early is not None:
            g = self._level_gradient(fine)
            # P*∇_l H_l with ∇_l = ∇/h_l; the Euclidean target is h_{l-1}·P*∇_l H_l = Pᵀ∇H_l
            pstar = tr.adjoint(dict(zip(fl.names, [t / fl.h for t in g])))
            pstar = [pstar[n] for n in cl.names]
            if early is not None:
                coarse_norm = math.sqrt(cl.h) * norm(pstar)       # ‖P*∇_l H_l‖_{l-1}
                fine_norm = math.sqrt(fl.h) * norm(g) / fl.h      # ‖∇_l H_l‖_l
                if coarse_norm < early.eta * fine_norm or coarse_norm < early.epsilon:
                    self._event(fine, f"early_stop:{coarse}")
                    return False
            if corrected:
                target = [cl.h * t for t in pstar]
        if self.spec.angle is not None:
            pend = self.pending.get(fine)
            if not self.at_start(fine):
                with torch.no_grad():
                    d = torch._foreach_sub([p.detach() for p in fl.params], self.anchor[fine])
                    if fine != self.finest:
                        up = self._to_finest(fine).prolongate(
                            dict(zip(fl.names, d)))
                        d = [up[n] for n in self.levels[self.finest].names]
                    pend = d if pend is None else torch._foreach_add(pend, d)
            self.pending[coarse] = pend
        with torch.no_grad():
            cl.load_state(tr.restrict(fl.model.state_dict()))
        self.anchor[coarse] = cl.detached_params()  # w_{l,0} = R w_{l+1}
        self.started[coarse] = True
        if self.spec.optimizer_state == "transfer" and fl.optimizer is not None:
            m = get_first_moment(fl.optimizer, fl.params)
            if m is not None:
                if cl.optimizer is None:
                    cl.new_optimizer()
                rm = tr.restrict(dict(zip(fl.names, m)))
                set_first_moment(cl.optimizer, cl.params, [rm[n] for n in cl.names])
        self.corr[coarse] = self.strategy_k.prepare(self, coarse, target) if corrected else None
        return True

    def ascend(self, coarse: str, fine: str) -> None:
        cl, fl = self.levels[coarse], self.levels[fine]
        tr = self.c.transfer(coarse, fine)
        with torch.no_grad():
            step = torch._foreach_sub([p.detach() for p in cl.params], self.anchor[coarse])
            moved = any(bool(s.any()) for s in step)
            if moved:
                up = tr.prolongate(dict(zip(cl.names, step)))  # P s_{l-1}
                fl.add_to_params([up[n] for n in fl.names])
                self.started[fine] = False
        if self.spec.optimizer_state == "transfer" and cl.optimizer is not None:
            m = get_first_moment(cl.optimizer, cl.params)
            if m is not None:
                if fl.optimizer is None:
                    fl.new_optimizer()
                pm = tr.prolongate(dict(zip(cl.names, m)))
                set_first_moment(fl.optimizer, fl.params, [pm[n] for n in fl.names])
        if moved and self.spec.bn_recalibration > 0 and bn.has_batchnorm(fl.model):
            with distributed.local_batchnorm(fl.model):  # the same images on every rank
                if bn.recalibrate(fl.model, fl.data.train_x,
                                  images=self.spec.bn_recalibration,
                                  batch_size=fl.batch_size, generator=self.generator):
                    fl.version += 1
        if moved and fine == self.finest and self.eval_every in ("epoch", "level"):
            self._event(fine, "prolongated", evaluate=True)

    def smooth(self, level: str) -> None:
        lv = self.levels[level]
        if self.sgd or self.spec.optimizer_state != "reset":
            if lv.optimizer is None:
                lv.new_optimizer()
        else:
            lv.new_optimizer()
        epochs = lv.epochs
        if self.sgd:
            epochs = min(1.0, self.sgd_total - self.cycle)
        angle = None
        if self.angle_gradient is not None and not self.sgd:
            spec = self.spec.angle
            angle = AngleCheck(
                gradient=self.angle_gradient, mu=spec.mu, every=spec.every,
                prolongate=(self._to_finest(level).prolongate
                            if level != self.finest else None),
                level_names=lv.names, fine_names=self.levels[self.finest].names,
                anchor=self.anchor[level], pending=self.pending.get(level))
        lam = self._lam(level)
        visit = Visit(epochs=epochs, correction=self.corr.get(level),
                      anchor=self.anchor.get(level), lam=lam if level in self.anchor else 0.0,
                      angle=angle)
        result = train_visit(lv, visit, self)
        if result.steps:
            self.started[level] = False
        if result.status == "diverged":
            if result.nan and level == self.finest:
                stats = result.stats[-1] if result.stats else None
                raise RunError(
                    f"the loss became {stats.loss if stats else 'NaN'} on the finest level "
                    f"{level!r} in cycle {self.cycle}, epoch {result.epoch_index} of the "
                    f"visit; {rundir.checkpoint_note(self.out_dir, self.cycles_done)}",
                    file=getattr(self.c, "file", None))
            if self.spec.divergence.action == "stop":
                self.stop_reason = f"diverged on level {level} in cycle {self.cycle}"
        elif result.status == "time":
            self.stop_reason = "time budget"

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, completed: int) -> None:
        if self.h.report.checkpoint == "none" or not self.is_main:
            return
        with self.excluded():
            keep = self.sgd or self.spec.optimizer_state != "reset"
            payload = {
                "format": CHECKPOINT_FORMAT,
                "config_hash": self.config_hash,
                "seed": self.spec.seed,
                "data_seed": self.h.data.seed,
                "world_size": self.world,
                "cycles_done": completed,
                "rows": self.log.rows_written if self.log else 0,
                "global_epoch": self.global_epoch,
                "level_epochs": {n: lv.epochs_done for n, lv in self.levels.items()},
                "train_time": self._now_train(),
                "wall_time": self._now_wall(),
                "finest": self.levels[self.finest].model.state_dict(),
                "optimizers": {n: lv.optimizer.state_dict() for n, lv in self.levels.items()
                               if keep and lv.optimizer is not None},
                "optimizer_kinds": {n: type(lv.optimizer).__name__
                                    for n, lv in self.levels.items()
                                    if keep and lv.optimizer is not None},
                "rng": rng_state(),
                "generator": self.generator.get_state(),
                "stop_reason": self.stop_reason,
                "schedule": {"kind": self.spec.schedule.kind,
                             "total_epochs": self.total_epochs},
            }
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, payload)

    def _load_resume_checkpoint(self) -> dict[str, Any]:
        """Rank 0 reads the checkpoint; every rank gets it (or the same error)."""
        ck, error = None, None
        if self.is_main:
            try:
                ck = self._read_resume_checkpoint()
            except UserError as exc:
                error = exc
        ck, message = distributed.broadcast_object((ck, str(error) if error else None))
        if error is not None:
            raise error
        if message is not None:
            raise RunError(message)
        return ck

    def _read_resume_checkpoint(self) -> dict[str, Any]:
        """``checkpoint.pt``, or ``checkpoint.prev.pt`` when the newer one cannot be loaded (a
        message says so, and the bad file is set aside as ``checkpoint.pt.corrupt``)."""
        run_dir = self.resume_dir
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
            if current.is_file():  # set aside in the folder this run writes (start())
                self._set_aside = current
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"checkpoint format {ck.get('format')!r} is not "
                           f"{CHECKPOINT_FORMAT}", file=str(path))
        # first: a different network is refused even with --force (it cannot be loaded)
        problem = network_mismatch(ck.get("finest"),
                                   self.levels[self.finest].model.state_dict())
        if problem:
            raise RunError(
                f"this checkpoint holds a different network than level {self.finest!r} of "
                f"{getattr(self.c, 'file', 'this hierarchy')} ({problem}); --force accepts "
                "changed settings, never a different network: start a new run instead",
                file=str(path))
        if ck.get("config_hash") != self.config_hash and not self.force:
            raise RunError(
                f"the hierarchy changed since this checkpoint (config hash "
                f"{ck.get('config_hash')} → {self.config_hash}); resume with --force to "
                "continue anyway", file=str(path))
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
                lv = self.levels[name]
                opt = lv.new_optimizer()
                if kinds.get(name, type(opt).__name__) != type(opt).__name__:
                    continue  # a forced resume changed the optimiser: it starts afresh
                try:
                    opt.load_state_dict(state)
                except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                    raise RunError(f"the optimiser state of level {name!r} does not fit this "
                                   f"hierarchy's level ({exc}); --force accepts changed "
                                   "settings, never a different network",
                                   file=str(self.resume_dir / CHECKPOINT_NAME)) from None
        for name, epochs in ck.get("level_epochs", {}).items():
            if name in self.levels:
                self.levels[name].epochs_done = float(epochs)
        self.global_epoch = float(ck["global_epoch"])
        self.train_time0 = float(ck["train_time"])
        self.wall_time0 = float(ck["wall_time"])
        # a run stopped early (time budget, divergence) continues when resumed explicitly;
        # the budget counts the training time of all sessions
        set_rng_state(ck["rng"])
        self.generator.set_state(ck["generator"].to("cpu", torch.uint8))
        if self.is_main:
            self.log = MetricsLog(self.out_dir, resume_rows=int(ck["rows"]))
        return int(ck["cycles_done"])

    # ------------------------------------------------------------------ the run

    def _write_config(self) -> None:
        cfg = _config(self.c)
        atomic_write_bytes(self.out_dir / "resolved.json",
                           (json.dumps(cfg, indent=2) + "\n").encode("utf-8"))
        atomic_write_bytes(self.out_dir / "resolved.toml",
                           (toml_dumps(cfg) + "\n").encode("utf-8"))

    def start(self) -> int:
        """Open the run folder (or restore the checkpoint); return the first cycle to run."""
        opened, error = None, None
        if self.is_main:  # rank 0 creates the folder; every rank learns its name (or the error)
            try:
                opened = str(rundir.open_folder(self.folder))
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
        self.out_dir = Path(opened)
        if self.resume_dir is not None:
            start = self._restore()
        else:
            self.log = MetricsLog(self.out_dir) if self.is_main else None
            start = 0
        self._t0 = time.perf_counter()
        self._excluded = 0.0
        if self.is_main:
            self._write_config()
        if start == 0 and self.resume_dir is None:
            self._checkpoint(0)
        return start

    def fit(self) -> dict[str, Any]:
        """Train all cycles, then evaluate and write the summary; returns the summary."""
        try:
            start = self.start()
            self._emit("mlsgd_run_start", run=self)
            self._train(start)
            return self._finish()
        finally:
            torch.set_flush_denormal(self._flush_before)
            distributed.teardown(self._owns_group)

    def _train(self, start: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=round(self.total_epochs, 6), initial=round(self.global_epoch, 6),
                        unit="ep", disable=self.quiet or not self.is_main,
                        dynamic_ncols=True, leave=False,
                        file=sys.stderr, desc=self.h.name)
        k = start
        try:
            while k < self.n_cycles and self.stop_reason is None:
                self.begin_cycle(k)
                if self.sgd:
                    self.smooth(self.finest)
                else:
                    run_cycle_recursion(self, self.c.path(k), self.spec.cycle)
                if self.stop_reason == "time budget":
                    break  # an interrupted cycle is not a completed one
                k += 1
                self.cycles_done = k
                if self.eval_every == "cycle":
                    self._event(self.finest, "cycle", evaluate=True)
                self._checkpoint(k)
                self._emit("mlsgd_cycle_end", run=self, cycle=k - 1)
        except KeyboardInterrupt:
            # cycles counted as in metrics.csv (from 0); the checkpoint by completed cycles
            raise RunError(
                f"interrupted during cycle {self.cycle} (counted from 0, as in metrics.csv); "
                f"{rundir.checkpoint_note(self.out_dir, self.cycles_done)}") from None
        finally:
            self.bar.close()

    def _finish(self) -> dict[str, Any]:
        from .summary import build_summary, write_summary

        fin = self.levels[self.finest]
        spec = self.spec
        with self.excluded():
            d = fin.data
            train_loss, train_acc = self._evaluate(fin, d.train_x, d.train_y)
            val_loss, val_acc = self._evaluate(fin, d.val_x, d.val_y) \
                if len(d.val_x) else (float("nan"), float("nan"))
            test_loss, test_acc = self._evaluate(fin, d.test_x, d.test_y)
        rows = read_rows(self.out_dir) if self.log is not None and self.log.rows_written \
            else []
        final = {
            "train_acc": train_acc, "val_acc": val_acc, "test_acc": test_acc,
            "train_loss": train_loss, "val_loss": val_loss, "test_loss": test_loss,
            "training_time": self._now_train(), "wall_time": self._now_wall(),
            "cycles": self.cycles_done, "stopped": self.stop_reason,
            "global_epochs": self.global_epoch,
            "lr": spec.lr if not isinstance(spec.lr, dict) else json.dumps(spec.lr),
            "schedule": spec.schedule.kind,
            "correction": self.strategy.describe() if not self.sgd else "none",
            "variance_reduction": bool(getattr(self.strategy, "variance_reduction", False)),
            "cycle_kind": None if self.sgd else spec.cycle,
            "config_hash": self.config_hash,
        }
        if not self.is_main:  # rank 0 writes the run folder; the others report its place
            return {**final, "run_dir": str(self.out_dir), "rank": self.rank}
        summary = build_summary(rows, name=self.h.name, method=spec.method,
                                thresholds=list(self.h.report.thresholds), final=final)
        summary["run_dir"] = str(self.out_dir)
        write_summary(self.out_dir, summary)
        if self.h.report.plot and rows:
            try:
                from .plots import plot_accuracy

                plot_accuracy(rows, self.out_dir / "accuracy.png",
                              title=f"{self.h.name} ({spec.method})")
            except ImportError:  # matplotlib missing: the numbers are in the summary
                pass
        self._emit("mlsgd_run_end", run=self, summary=summary)
        return summary


def run(compiled: Any, *, out_dir: Path | str | None = None, resume: Path | str | None = None,
        device: str | None = None, quiet: bool = False, validate: bool = True,
        force: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``compiled`` and return the run summary (also written to the run folder).

    ``resume``: a run folder; training continues after its last checkpoint (no cycle repeated
    or lost). A changed configuration is refused (:class:`~mlsgd_dsl.errors.RunError`) unless
    ``force``. ``device``: "auto" | "cpu" | "cuda" (default: ``mlsgd.device``).
    ``out_dir`` must be new or empty; a folder holding a run is replaced only with
    ``overwrite``. ``resume`` with a different ``out_dir`` forks the run into ``out_dir``
    (see :mod:`mlsgd_dsl.runner.rundir`).
    """
    owned = not distributed.initialized()
    flush_before = flush_denormal_enabled()
    try:
        trainer = Trainer(compiled, out_dir=out_dir, resume=resume, device=device,
                          quiet=quiet, validate=validate, force=force, overwrite=overwrite)
        return trainer.fit()
    finally:  # also when the trainer could not be built (a refused resume, a bad file)
        torch.set_flush_denormal(flush_before)  # the Trainer turned it on before refusing
        distributed.teardown(owned)
