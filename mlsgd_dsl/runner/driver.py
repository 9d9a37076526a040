"""The cycle driver: descend / ascend / smooth over :mod:`.cycle`'s recursion.

:class:`Driver` implements the three steps of a cycle and is the host the level solver
(:class:`~mlsgd_dsl.runner.level.LevelHost`) and the correction strategies
(:class:`~mlsgd_dsl.runner.corrections.CorrectionHost`) see. It owns nothing that outlives a
cycle except the levels' weights and optimisers: everything else a cycle works with is a
:class:`~mlsgd_dsl.runner.state.CycleState`, made fresh by :meth:`Driver.begin_cycle`. Rows,
evaluation, clocks and hooks belong to the run's I/O (:class:`~mlsgd_dsl.runner.io.RunIO`); the
run's counters to :class:`~mlsgd_dsl.runner.state.Progress`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import RunError
from . import bn, distributed
from .corrections import Correction, Sample, TransferView
from .cycle import is_pass
from .level import AngleCheck, EpochStats, Level, Visit, train_visit
from .objective import norm
from .optim import get_first_moment, set_first_moment
from .rundir import checkpoint_note
from .schedule import Schedule
from .state import CycleState, Progress


class Driver:
    """One run's cycles over ``levels`` (see the module doc)."""

    def __init__(self, *, compiled: Any, levels: dict[str, Level], strategy: Correction,
                 schedule: Schedule, progress: Progress, io: Any,
                 generator: torch.Generator, device: torch.device, sgd_total: float | None
                 ) -> None:
        self.c = compiled
        self.spec = compiled.hierarchy.mlsgd
        self.levels = levels
        self.finest: str = compiled.finest
        self.strategy = strategy
        self.no_correction = Correction()
        self.schedule = schedule
        self.progress = progress
        self.io = io
        self.generator = generator
        self.device = device
        self.sgd = sgd_total is not None
        self.sgd_total = sgd_total
        # BatchNorm in gradient passes: batch statistics (default) or running statistics
        self.batchnorm = getattr(strategy, "batchnorm", "batch")
        self.divergence_factor = self.spec.divergence.factor
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self._transfers: dict[tuple[str, ...], Any] = {}  # composed P, kept across cycles
        self.state = CycleState(cycle=0, path=[self.finest], strategy=self.no_correction)

    # ------------------------------------------------------------------ one cycle

    def begin_cycle(self, k: int) -> None:
        """A fresh :class:`CycleState`; the finest level's start point and correction."""
        self.progress.cycle = k
        strategy = self.strategy if k >= self.spec.uncorrected_cycles else self.no_correction
        path = [self.finest] if self.sgd else list(self.c.path(k))
        self.state = st = CycleState(cycle=k, path=path, strategy=strategy,
                                     passing=not self.sgd and is_pass(self.spec.cycle, k))
        if self.sgd:
            return
        fin = self.levels[self.finest]
        st.anchor[self.finest] = fin.detached_params()  # w_{L,k,0}
        st.started[self.finest] = True
        st.pending[self.finest] = None
        st.corr[self.finest] = strategy.prepare(self, self.finest, None)
        angle = self.spec.angle
        if angle is not None:
            sample = None if angle.gradient == "full" else self.sample(angle.fraction)
            st.angle_gradient = self.gradient(self.finest, sample)

    def end_cycle(self, k: int) -> None:
        """After a completed cycle: the strategy's turn (before the checkpoint)."""
        if not self.sgd:
            self.strategy.end_cycle(self, k)

    def stopped(self) -> bool:
        return self.progress.stop_reason is not None

    def lam(self, level: str) -> float:
        """λ of ``level``: the step regularisation applies below the finest level."""
        return self.spec.step_regularization if level != self.finest else 0.0

    def descend(self, fine: str, coarse: str) -> bool:
        st = self.state
        fl, cl = self.levels[fine], self.levels[coarse]
        corrected = st.strategy.needs_fine_gradient(st.cycle)
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
                    self.io.event(fine, f"early_stop:{coarse}")
                    return False
            if corrected:
                target = [cl.h * t for t in pstar]
        if self.spec.angle is not None:
            pend = st.pending.get(fine)
            if not self.at_start(fine):
                with torch.no_grad():
                    d = torch._foreach_sub([p.detach() for p in fl.params], st.anchor[fine])
                    if fine != self.finest:
                        up = self._to_finest(fine).prolongate(dict(zip(fl.names, d)))
                        d = [up[n] for n in self.levels[self.finest].names]
                    pend = d if pend is None else torch._foreach_add(pend, d)
            st.pending[coarse] = pend
        with torch.no_grad():
            cl.load_state(tr.restrict(fl.model.state_dict()))
        st.anchor[coarse] = cl.detached_params()  # w_{l,0} = R w_{l+1}
        st.started[coarse] = True
        if self.spec.optimizer_state == "transfer" and fl.optimizer is not None:
            m = get_first_moment(fl.optimizer, fl.params)
            if m is not None:
                if cl.optimizer is None:
                    cl.new_optimizer()
                rm = tr.restrict(dict(zip(fl.names, m)))
                set_first_moment(cl.optimizer, cl.params, [rm[n] for n in cl.names])
        st.corr[coarse] = st.strategy.prepare(self, coarse, target) if corrected else None
        return True

    def ascend(self, coarse: str, fine: str) -> None:
        st = self.state
        cl, fl = self.levels[coarse], self.levels[fine]
        tr = self.c.transfer(coarse, fine)
        with torch.no_grad():
            step = torch._foreach_sub([p.detach() for p in cl.params], st.anchor[coarse])
            moved = any(bool(s.any()) for s in step)
            if moved:
                up = tr.prolongate(dict(zip(cl.names, step)))  # P s_{l-1}
                fl.add_to_params([up[n] for n in fl.names])
                st.started[fine] = False
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
                    if fine == self.finest and \
                            self.spec.bn_recalibration >= self.spec.eval.recalibrate:
                        self.io.statistics_estimated(fl.version)  # as good as an evaluation's
        if moved and fine == self.finest and self.spec.eval.every in ("epoch", "level"):
            self.io.event(fine, "prolongated", evaluate=True)

    def smooth(self, level: str) -> None:
        st = self.state
        lv = self.levels[level]
        if self.sgd or self.spec.optimizer_state != "reset":
            if lv.optimizer is None:
                lv.new_optimizer()
        else:
            lv.new_optimizer()
        epochs = lv.pass_epochs if st.passing else lv.epochs
        if self.sgd:
            epochs = min(1.0, self.sgd_total - st.cycle)
        angle = None
        if st.angle_gradient is not None and not self.sgd:
            spec = self.spec.angle
            angle = AngleCheck(
                gradient=st.angle_gradient, mu=spec.mu, every=spec.every,
                prolongate=(self._to_finest(level).prolongate
                            if level != self.finest else None),
                level_names=lv.names, fine_names=self.levels[self.finest].names,
                anchor=st.anchor[level], pending=st.pending.get(level))
        lam = self.lam(level)
        visit = Visit(epochs=epochs, correction=st.corr.get(level),
                      anchor=st.anchor.get(level), lam=lam if level in st.anchor else 0.0,
                      angle=angle)
        result = train_visit(lv, visit, self)
        if result.steps:
            st.started[level] = False
        if result.status == "diverged":
            if result.nan and level == self.finest:
                stats = result.stats[-1] if result.stats else None
                raise RunError(
                    f"the loss became {stats.loss if stats else 'NaN'} on the finest level "
                    f"{level!r} in cycle {st.cycle}, epoch {result.epoch_index} of the "
                    f"visit; {checkpoint_note(self.io.out_dir, self.progress.cycles_done)}",
                    file=getattr(self.c, "file", None))
            if self.spec.divergence.action == "stop":
                self.progress.stop_reason = f"diverged on level {level} in cycle {st.cycle}"
        elif result.status == "time":
            self.progress.stop_reason = "time budget"

    def _level_gradient(self, level: str) -> list[Tensor]:
        """Estimate of Euclidean ∇H_l at the level's current weights (λ term included)."""
        st = self.state
        g = st.strategy.level_gradient(self, level, st.corr.get(level))
        lam = self.lam(level)
        if lam and not self.at_start(level) and level in st.anchor:
            lv = self.levels[level]
            with torch.no_grad():
                g = [a + lam * lv.h * (p.detach() - w0)
                     for a, p, w0 in zip(g, lv.params, st.anchor[level])]
        return g

    def _to_finest(self, level: str) -> Any:
        """P_{L←l} composed along this cycle's path (a graph may have several paths)."""
        path = self.state.path if level in self.state.path else [level, self.finest]
        return self._composed(tuple(path[path.index(level):]))

    def _composed(self, key: tuple[str, ...]) -> Any:
        if key not in self._transfers:
            try:
                self._transfers[key] = self.c.transfer(key[0], key[-1], via=list(key))
            except TypeError:  # a Compiled without `via`: its default path
                self._transfers[key] = self.c.transfer(key[0], key[-1])
        return self._transfers[key]

    # ------------------------------------------------------------------ LevelHost

    @property
    def global_epoch(self) -> float:
        return self.progress.global_epoch

    def lr(self, base: float, epoch: float, step: float = 0.0) -> float:
        return self.schedule.lr(base, epoch, step)

    def schedule_constant(self) -> bool:
        return self.schedule.constant_within(0.0)

    def deadline(self) -> float | None:
        return self.io.clock.deadline(self.spec.time_budget)

    def epoch_end(self, level: Level, stats: EpochStats) -> None:
        self.progress.global_epoch = stats.global_epoch
        self.io.epoch(level, stats)

    # ------------------------------------------------------------------ CorrectionHost

    @property
    def cycle(self) -> int:
        return self.state.cycle

    @property
    def path(self) -> Sequence[str]:
        return tuple(self.state.path)

    def level(self, name: str) -> Level:
        return self.levels[name]

    def transfer(self, coarse: str, fine: str) -> TransferView:
        path = self.state.path
        if coarse in path and fine in path and path.index(fine) - path.index(coarse) > 1:
            return self._composed(tuple(path[path.index(coarse):path.index(fine) + 1]))
        return self.c.transfer(coarse, fine)

    def gradient(self, level: str, sample: Sample | None = None, *,
                 model: nn.Module | None = None) -> list[Tensor]:
        lv = self.levels[level]
        cache = self.state.grad_cache
        key = (level, lv.version if model is None else ("model", id(model)),
               sample.key if sample is not None else "full")
        if model is None and key in cache:
            return cache[key]
        # gradient passes are training work: they count as training time
        shared = {"shard": (self.rank, self.world), "reduce": distributed.all_reduce_} \
            if self.world > 1 else {}
        with distributed.local_batchnorm(model or lv.model):
            g = lv.objective.gradient(lv.data.train_x, lv.data.train_y,
                                      batch_size=self.spec.full_batch_size,
                                      indices=sample.indices if sample is not None else None,
                                      batchnorm=self.batchnorm, model=model, **shared)
        if model is None:
            cache[key] = g
        return g

    def sample(self, fraction: float) -> Sample:
        fraction = float(fraction)
        samples = self.state.samples
        if fraction not in samples:
            n = len(self.levels[self.finest].data.train_x)
            m = max(1, min(n, round(fraction * n)))
            idx = torch.randperm(n, generator=self.generator)[:m].sort().values
            samples[fraction] = Sample(indices=idx.to(self.device), fraction=fraction,
                                       cycle=self.state.cycle)
        return samples[fraction]

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
        return self.state.started.get(level, False)

    def record(self, level: str, event: str) -> None:
        self.io.event(level, event)
