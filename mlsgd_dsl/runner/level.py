"""The level solver: Algorithm 5 of the thesis (aSGD with the angle check), one level visit.

A visit trains level ``l`` for ``T_l`` epochs (fractions allowed: ``2.5`` = two epochs and half
the batches of a third). Batches are slices of a seeded permutation of the level's training
tensors (already on the device); augmentation runs on whole batches. The objective is ``H_l``:
autograd gives the gradient of ``F_l`` on the batch, the correction (a constant vector, and
with variance reduction the gradient of a frozen copy of the model at ``w_{l,0}`` on the same
batch) and the step-size regularisation ``λ h_l (w − w_{l,0})`` are added to ``.grad`` before the
optimiser step — no extra autograd work, no per-step state-dict copies, and the loss and accuracy
are accumulated as tensors and read once per epoch. Under torchrun each rank steps on its slice
of every global batch through ``level.train_model`` (DDP); see :mod:`.distributed`.

Safeguards:

* angle condition (3.3): every ``angle.every`` steps the candidate iterate, prolongated to the
  finest level, is tested against ``−∇F_L(w_{L,k,0})``; if it fails, the step is undone (the
  iterate before it is restored) and the visit ends (status ``rejected:angle``). The
  optimiser state keeps the rejected step's update (the visit ends anyway).
* divergence: an epoch whose mean loss is NaN/Inf or above ``factor ×`` the visit's starting
  loss (the mean loss of its first ``min(10, ⌈batches/10⌉)`` batches) restores the level's
  state at the start of the visit (weights and buffers), clears its optimiser state and ends
  the visit (status ``diverged``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..schema import OptimizerSpec
from . import distributed
from .angle import AngleCheck
from .corrections import LevelCorrection, snapshot_params
from .objective import Objective
from .optim import make_optimizer

# --------------------------------------------------------------------------- a level


@dataclass
class Augment:
    flip: bool = False
    crop: float = 0.0
    fill: Any = 0.0

    @property
    def active(self) -> bool:
        return self.flip or self.crop > 0


class Level:
    """One level of the hierarchy on the device: model, objective, data, optimiser."""

    def __init__(self, name: str, model: nn.Module, data: Any, *, h: float, lr: float,
                 batch_size: int, epochs: float, optimizer: OptimizerSpec, l2: float,
                 smoothness: float, device: torch.device, augment: Augment | None = None,
                 pass_epochs: float | None = None) -> None:
        self.name = name
        self.model = model
        self.train_model = model  # what the training steps call: DDP(model) under torchrun
        self.data = data
        self.h = float(h)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.epochs = float(epochs)
        # epochs in the coarse-to-fine pass of a cascade / fmg run (cascade_epochs)
        self.pass_epochs = self.epochs if pass_epochs is None else float(pass_epochs)
        self.optimizer_spec = optimizer
        self.device = device
        self.augment = augment or Augment()
        self.objective = Objective(model, l2=l2, smoothness=smoothness)
        self.names = self.objective.names
        self.params = self.objective.params
        self.optimizer: torch.optim.Optimizer | None = None
        self.version = 0  # bumped whenever the weights change (gradient cache key)
        self.epochs_done = 0.0  # this level's epochs over the run
        self.compiled = False  # mlsgd.compile
        self.channels_last = False  # mlsgd.channels_last

    def accelerate(self, *, compile: bool = False, channels_last: bool = False) -> None:
        """Make the training steps faster (``mlsgd.compile``, ``mlsgd.channels_last``).

        Only ``train_model`` is compiled: the weights stay ``model``'s own tensors, so
        transfers, state dicts and checkpoints see the plain network (what torch.compile's
        wrapper would otherwise prefix with ``_orig_mod.``)."""
        if channels_last and not self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile and not self.compiled:
            self.train_model = torch.compile(self.train_model)
            self.compiled = True

    # ------------------------------------------------------------------ weights

    def detached_params(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def set_params(self, values: Sequence[Tensor]) -> None:
        torch._foreach_copy_(self.params, list(values))
        self.version += 1

    @torch.no_grad()
    def add_to_params(self, values: Sequence[Tensor]) -> None:
        torch._foreach_add_(self.params, list(values))
        self.version += 1

    @torch.no_grad()
    def load_state(self, sd: dict[str, Tensor]) -> None:
        """Copy a full state dict (parameters and buffers) into the model in place."""
        own = self.model.state_dict()
        for k, v in sd.items():
            own[k].copy_(v)
        self.version += 1

    def state_copy(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def new_optimizer(self) -> torch.optim.Optimizer:
        self.optimizer = make_optimizer(self.params, self.optimizer_spec, self.lr, self.device)
        return self.optimizer

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.data.train_x)
        return max(1, n // self.batch_size) if n >= self.batch_size else 1


# --------------------------------------------------------------------------- a visit


@dataclass
class Visit:
    """What one visit of a level needs besides the level itself."""

    epochs: float
    correction: LevelCorrection | None = None
    anchor: list[Tensor] | None = None  # w_{l,0}: λ term
    lam: float = 0.0
    angle: AngleCheck | None = None


@dataclass
class EpochStats:
    visit_epoch: float
    fraction: float
    loss: float
    acc: float
    lr: float
    batches: int
    event: str = ""
    last: bool = False  # the visit's last epoch
    global_epoch: float = 0.0  # the run's epochs over all levels after this one


@dataclass
class VisitResult:
    status: str = "done"  # done | rejected:angle | diverged | time
    epochs: float = 0.0
    steps: int = 0
    nan: bool = False
    epoch_index: int = 0  # the epoch (1-based) the visit ended in
    stats: list[EpochStats] = field(default_factory=list)


class LevelHost(Protocol):
    """What a visit asks of the runner (:class:`~mlsgd_dsl.runner.driver.Driver`; tests and
    benchmarks use :class:`FixedHost`). The visit reads it and reports every epoch through
    :meth:`epoch_end`; it never writes into it."""

    @property
    def generator(self) -> torch.Generator:
        """The run's generator: batch order, augmentation draws."""

    @property
    def global_epoch(self) -> float:
        """Epochs trained over all levels so far (the schedule's clock)."""

    @property
    def divergence_factor(self) -> float:
        """An epoch whose mean loss exceeds this × the visit's starting loss diverged."""

    def lr(self, base: float, epoch: float, step: float = 0.0) -> float:
        """The learning rate at ``epoch`` (global epochs) for a level whose base rate is
        ``base``; ``step`` is one batch's share of an epoch."""

    def schedule_constant(self) -> bool:
        """True when :meth:`lr` returns ``base`` throughout (no per-step update needed)."""

    def deadline(self) -> float | None:
        """``time.perf_counter()`` value after which the visit must stop (None: none)."""

    def epoch_end(self, level: Level, stats: EpochStats) -> None:
        """One (possibly partial) epoch of ``level`` ended; ``stats.global_epoch`` is the run's
        epoch count after it."""


class FixedHost:
    """A :class:`LevelHost` with a constant rate and no deadline, counting epochs itself."""

    def __init__(self, generator: torch.Generator | None = None, *,
                 divergence_factor: float = 3.0) -> None:
        self.generator = generator or torch.Generator().manual_seed(0)
        self.global_epoch = 0.0
        self.divergence_factor = divergence_factor

    def lr(self, base: float, epoch: float, step: float = 0.0) -> float:
        return base

    def schedule_constant(self) -> bool:
        return True

    def deadline(self) -> float | None:
        return None

    def epoch_end(self, level: Level, stats: EpochStats) -> None:
        self.global_epoch = stats.global_epoch


def _grads(params: Sequence[Tensor]) -> list[Tensor]:
    grads = []
    for p in params:
        if p.grad is None:  # a parameter the forward did not use: its F-gradient is 0
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    return grads


def train_visit(level: Level, visit: Visit, host: LevelHost) -> VisitResult:
    """Train ``level`` for ``visit.epochs`` epochs on H_l; Algorithm 5."""
    model, objective, params = level.model, level.objective, level.params
    data = level.data
    x_all, y_all = data.train_x, data.train_y
    n = len(x_all)
    bsz = level.batch_size
    nb_full = level.batches_per_epoch
    optimizer = level.optimizer if level.optimizer is not None else level.new_optimizer()
    gen = host.generator
    corr = visit.correction
    augment = level.augment
    if augment.active:
        from ..data.augment import augment_batch
    scheduled = not host.schedule_constant()
    world = distributed.world_size()  # > 1: this rank trains on its slice of every batch

    # ---- the constant part of the gradient of H_l, folded into one vector:
    #      vector (correction) − 2·l2·w_0 (VR: the snapshot's ℓ2 gradient) − λ h_l w_{l,0}
    lam_h = visit.lam * level.h if (visit.lam and visit.anchor is not None) else 0.0
    const: list[Tensor] | None = None
    snapshot = corr.snapshot if corr is not None else None
    snap_params = snapshot_params(snapshot) if snapshot is not None else None
    with torch.no_grad():
        if corr is not None and corr.vector is not None:
            const = [v.detach().clone() for v in corr.vector]
        if snapshot is not None and objective.l2:
            const = const or [torch.zeros_like(p) for p in params]
            objective.add_l2_gradient(const, snap_params, scale=-1.0)
        if lam_h:
            const = const or [torch.zeros_like(p) for p in params]
            torch._foreach_add_(const, visit.anchor, alpha=-lam_h)
    if snapshot is not None:
        snapshot.train()  # the same BatchNorm mode as the model's steps: batch statistics

    angle = visit.angle
    prev = [torch.empty_like(p) for p in params] if angle is not None else None
    start_state = level.state_copy()  # for a divergence rejection
    model.train()

    result = VisitResult()
    start_loss: float | None = None
    start_batches = 0
    step = 0
    total = level.epochs if visit.epochs is None else visit.epochs
    n_epochs = max(1, math.ceil(total - 1e-9))
    lr_now = optimizer.param_groups[0]["lr"]
    for e in range(n_epochs):
        frac = min(1.0, total - e)
        nb = nb_full if frac >= 1.0 else max(1, round(frac * nb_full))
        perm = torch.randperm(n, generator=gen, device=gen.device).to(x_all.device)
        deadline = host.deadline()
        loss_sum = torch.zeros((), device=x_all.device)
        correct = torch.zeros((), dtype=torch.int64, device=x_all.device)
        seen = 0
        done = 0
        event = ""
        k_start = min(10, max(1, math.ceil(nb / 10))) if start_loss is None else 0
        epoch0 = host.global_epoch
        for b in range(nb):
            if deadline is not None and distributed.any_rank(time.perf_counter() > deadline):
                result.status = "time"
                event = "time_budget"
                break
            idx = perm[b * bsz:(b + 1) * bsz]
            if world > 1:  # the loss weight makes DDP's average the global batch's gradient
                part = distributed.shard_slice(len(idx))
                share = (part.stop - part.start) / len(idx)
                if not augment.active:
                    idx = idx[part]
            x, y = x_all[idx], y_all[idx]
            if augment.active:  # of the global batch: the same random draws on every rank
                x = augment_batch(x, flip=augment.flip, crop=augment.crop, fill=augment.fill,
                                  generator=gen)
                if world > 1:
                    x, y = x[part], y[part]
            if scheduled:
                lr_now = host.lr(level.lr, epoch0 + b / nb_full, 1.0 / nb_full)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
            checking = angle is not None and (step + 1) % angle.every == 0
            if checking:
                torch._foreach_copy_(prev, [p.detach() for p in params])

            out = level.train_model(x)
            loss, ce = objective.loss(out, y)
            if world > 1:
                loss = loss * (share * world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if snapshot is not None or objective.l2 or const is not None or lam_h:
                grads = _grads(params)
                if snapshot is not None:  # VR: − g_l(w_0, ξ) on the same batch
                    snapshot.zero_grad(set_to_none=True)
                    loss0, _ = objective.loss(snapshot(x), y, model=snapshot)
                    if world > 1:
                        loss0 = loss0 * (share * world)
                    loss0.backward()
                    grads0 = _grads(snap_params)
                    distributed.all_reduce_(grads0, mean=True)  # DDP does it for the model
                    torch._foreach_sub_(grads, grads0)
                objective.add_l2_gradient(grads)
                if const is not None:
                    torch._foreach_add_(grads, const)
                if lam_h:
                    torch._foreach_add_(grads, [p.detach() for p in params], alpha=lam_h)
            optimizer.step()
            step += 1
            done += 1
            with torch.no_grad():
                loss_sum += ce.detach() if world == 1 else ce.detach() * share
                correct += (out.detach().argmax(1) == y).sum()
            seen += len(y)
            if b + 1 == k_start:
                start_loss = distributed.all_reduce_floats([loss_sum])[0] / k_start
                start_batches = k_start
            if checking and not angle.ok(params):
                with torch.no_grad():
                    torch._foreach_copy_(params, prev)
                result.status = event = "rejected:angle"
                break

        # ---- end of the (partial) epoch: one host sync
        level.version += 1
        epoch_frac = done / nb_full
        level.epochs_done += epoch_frac
        result.epochs += epoch_frac
        result.steps = step
        result.epoch_index = e + 1
        loss_total, correct_total, seen = distributed.all_reduce_floats(
            [loss_sum, correct, seen], like=loss_sum)  # one process: plain floats
        loss_value = loss_total / done if done else float("nan")
        acc_value = correct_total / seen if seen else float("nan")
        if done and start_loss is None:  # a visit shorter than k_start batches
            start_loss, start_batches = loss_value, done
        diverged = done > 0 and (not math.isfinite(loss_value) or (
            start_loss is not None and math.isfinite(start_loss) and start_batches
            and loss_value > host.divergence_factor * start_loss))
        if diverged:
            result.nan = not math.isfinite(loss_value)
            result.status = event = "diverged"
        stats = EpochStats(visit_epoch=e + epoch_frac if epoch_frac < 1 else e + 1,
                           fraction=epoch_frac, loss=loss_value, acc=acc_value, lr=lr_now,
                           batches=done, event=event,
                           last=diverged or result.status != "done" or e + 1 == n_epochs,
                           global_epoch=epoch0 + epoch_frac)
        result.stats.append(stats)
        if diverged:
            level.load_state(start_state)
            optimizer.state.clear()
            host.epoch_end(level, stats)
            break
        if done:
            host.epoch_end(level, stats)
        if result.status != "done":
            break
    return result
