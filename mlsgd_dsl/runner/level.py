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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..schema import OptimizerSpec
from . import distributed
from .corrections import LevelCorrection, snapshot_params
from .objective import Objective, dot, norm

# --------------------------------------------------------------------------- optimisers


def make_optimizer(params: Sequence[Tensor], spec: OptimizerSpec, lr: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """SGD (± momentum, Nesterov), Adam or AdamW from ``mlsgd.optimizer`` for one level."""
    foreach = True  # grouped kernels on CPU too (the default picks them on CUDA only)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum,
                               nesterov=spec.nesterov and spec.momentum > 0,
                               weight_decay=spec.weight_decay, foreach=foreach)
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(spec.betas), eps=spec.eps,
               weight_decay=spec.weight_decay, foreach=foreach)


def first_moment_key(optimizer: torch.optim.Optimizer) -> str:
    return "momentum_buffer" if isinstance(optimizer, torch.optim.SGD) else "exp_avg"


def get_first_moment(optimizer: torch.optim.Optimizer,
                     params: Sequence[Tensor]) -> list[Tensor] | None:
    """The first moment (SGD momentum buffer / Adam exp_avg) per parameter, or None."""
    key = first_moment_key(optimizer)
    out = []
    for p in params:
        value = optimizer.state.get(p, {}).get(key)
        if value is None:
            return None
        out.append(value)
    return out


def set_first_moment(optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                     values: Sequence[Tensor]) -> bool:
    """Overwrite the first moment. SGD: creates the buffer; Adam: only where a state exists
    (a fresh Adam state has no second moment to go with it). Returns whether it was set."""
    key = first_moment_key(optimizer)
    if isinstance(optimizer, torch.optim.SGD):
        if not optimizer.defaults.get("momentum"):
            return False
        for p, v in zip(params, values):
            optimizer.state[p][key] = v.detach().clone()
        return True
    if any(key not in optimizer.state.get(p, {}) for p in params):
        return False
    for p, v in zip(params, values):
        optimizer.state[p][key].copy_(v)
    return True


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
                 smoothness: float, device: torch.device, augment: Augment | None = None
                 ) -> None:
        self.name = name
        self.model = model
        self.train_model = model  # what the training steps call: DDP(model) under torchrun
        self.data = data
        self.h = float(h)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.epochs = float(epochs)
        self.optimizer_spec = optimizer
        self.device = device
        self.augment = augment or Augment()
        self.objective = Objective(model, l2=l2, smoothness=smoothness)
        self.names = self.objective.names
        self.params = self.objective.params
        self.optimizer: torch.optim.Optimizer | None = None
        self.version = 0  # bumped whenever the weights change (gradient cache key)
        self.epochs_done = 0.0  # this level's epochs over the run

    # ------------------------------------------------------------------ weights

    def param_dict(self) -> dict[str, Tensor]:
        """Live parameters by name (no copy)."""
        return dict(zip(self.names, self.params))

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


class AngleCheck:
    """(3.3): −⟨∇F_L(w_{L,k,0}), w̃^L − w_{L,k,0}⟩ ≥ μ ‖∇F_L‖ ‖w̃^L − w_{L,k,0}‖.

    ``w̃^L − w_{L,k,0} = pending + P_{L←l}(w̃_l − w_{l,0})``; ``pending`` is the displacement of
    the levels above (non-zero only when a level above has moved since it descended, e.g. the
    second descent of a W-cycle).
    """

    def __init__(self, *, gradient: Sequence[Tensor], mu: float, every: int,
                 prolongate: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None,
                 level_names: Sequence[str], fine_names: Sequence[str],
                 anchor: Sequence[Tensor], pending: Sequence[Tensor] | None = None) -> None:
        self.gradient = list(gradient)
        self.gnorm = norm(self.gradient)
        self.mu = float(mu)
        self.every = max(1, int(every))
        self.prolongate = prolongate
        self.level_names = list(level_names)
        self.fine_names = list(fine_names)
        self.anchor = list(anchor)
        self.pending = list(pending) if pending is not None else None
        self.last_cos: float | None = None

    @torch.no_grad()
    def displacement(self, params: Sequence[Tensor]) -> list[Tensor]:
        d = torch._foreach_sub(list(params), self.anchor)
        if self.prolongate is not None:
            fine = self.prolongate(dict(zip(self.level_names, d)))
            d = [fine[n] for n in self.fine_names]
        if self.pending is not None:
            d = torch._foreach_add(d, self.pending)
        return d

    def ok(self, params: Sequence[Tensor]) -> bool:
        d = self.displacement(params)
        dn = norm(d)
        if dn == 0.0 or self.gnorm == 0.0:
            self.last_cos = None
            return True
        cos = -dot(self.gradient, d) / (self.gnorm * dn)
        self.last_cos = cos
        return cos >= self.mu


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


@dataclass
class VisitResult:
    status: str = "done"  # done | rejected:angle | diverged | time
    epochs: float = 0.0
    steps: int = 0
    nan: bool = False
    epoch_index: int = 0  # the epoch (1-based) the visit ended in
    stats: list[EpochStats] = field(default_factory=list)


class Host:
    """What a visit asks of the trainer (implemented by it; tests use a minimal one)."""

    generator: torch.Generator
    global_epoch: float

    def lr(self, base: float, epoch: float, step: float = 0.0) -> float:
        return base

    def schedule_constant(self) -> bool:
        return True

    def deadline(self) -> float | None:
        """``time.perf_counter()`` value after which the visit must stop (None: none)."""
        return None

    def epoch_end(self, level: Level, stats: EpochStats) -> None:
        pass

    divergence_factor: float = 3.0


def _grads(params: Sequence[Tensor]) -> list[Tensor]:
    grads = []
    for p in params:
        if p.grad is None:  # a parameter the forward did not use: its F-gradient is 0
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    return grads


def train_visit(level: Level, visit: Visit, host: Host) -> VisitResult:
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
        host.global_epoch = epoch0 + epoch_frac
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
                           last=diverged or result.status != "done" or e + 1 == n_epochs)
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
