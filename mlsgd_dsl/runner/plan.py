"""The budget planner (``mlsgd.plan``): a wall-clock budget turned into cycles and epochs.

A cosine or one-cycle schedule needs a horizon in epochs, and a run under ``time_budget``
only ends where the schedule does if the two agree. With ``plan = "auto"`` the runner measures
what one training batch of every trained level costs on this machine (a few batches of the
real training step on a copy of the level: the run's weights, RNG streams and BatchNorm
statistics are untouched), then chooses

* the number of cycles ``K`` whose planned training time is closest to ``time_budget``, and
* one factor ``s`` applied to every level's ``epochs`` (and ``cascade_epochs``) so that the
  planned time equals the budget exactly — the file's ratios between the levels are kept;

``method = "sgd"`` gets ``sgd_epochs = budget / seconds per finest epoch``. The schedule's
horizon is the planned run, so cosine reaches its end when the budget does; ``time_budget``
still stops the run if the machine turns out slower than measured.

What the plan counts: training batches of every visit, the forward passes that re-estimate
BatchNorm statistics after each prolongation (``bn_recalibration`` images at a third of a
training batch's cost per image), and with ``mlsgd.compile`` what compiling each level will
still cost in the run: when the timing copy compiled it from scratch (planning time), the
run's compilation finds dynamo's and inductor's caches filled, and a second copy's first
batches beyond their steady cost measure what is left; a plan from cached costs reserves the
from-scratch compilation. What it does not count, and the budget then cuts short: the
gradient passes of a correction, the angle condition and early termination (``plan.json``
says so when one is configured). Planning time is not training time.

Measured costs are cached (``$MLSGD_DSL_CACHE``, else ``$XDG_CACHE_HOME/mlsgd-dsl``, else
``~/.cache/mlsgd-dsl``; file ``costs.json``) by machine, torch version, threads, device and
the level's network, batch, optimiser and augmentation; ``plan = "measure"`` measures anew
and replaces the cached entries. A resumed run uses the plan its checkpoint holds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_bytes, rng_state, set_rng_state
from .cycle import is_pass, shape, visit_order
from .level import FixedHost, Level, Visit, train_visit

WARMUP_BATCHES = 2
TIMED_BATCHES = 8
FORWARD_SHARE = 1.0 / 3.0  # a forward pass ≈ a third of forward + backward + update
MAX_PLANNED_CYCLES = 100_000


@dataclass
class Plan:
    """What the planner chose; ``plan.json`` in the run folder and the checkpoint hold it."""

    budget: float
    cycles: int
    scale: float
    epochs: dict[str, float]
    pass_epochs: dict[str, float]
    sgd_epochs: float | None
    seconds_per_epoch: dict[str, float]
    planned_seconds: float
    horizon: float = 0.0  # epochs on all levels (the schedule's), set by the trainer
    sources: dict[str, str] = field(default_factory=dict)  # level -> "measured" | "cache"
    planning_seconds: float = 0.0
    not_counted: list[str] = field(default_factory=list)
    once_seconds: float = 0.0  # paid once inside the budget: mlsgd.compile's compilation

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def describe(self, kind: str) -> str:
        per = ", ".join(f"{n} {s:.2f}" for n, s in self.seconds_per_epoch.items())
        cached = [n for n, src in self.sources.items() if src == "cache"]
        head = (f"plan for a {self.budget:g} s budget: "
                + (f"{self.sgd_epochs:.2f} epochs of SGD" if self.sgd_epochs is not None
                   else f"{self.cycles} {kind} cycle(s), every level's epochs x{self.scale:.3f} "
                        f"({', '.join(f'{n} {e:.3g}' for n, e in self.epochs.items())})"))
        return (f"{head}; the schedule spans {self.horizon:.2f} epochs on all levels; "
                f"measured seconds per epoch: {per}"
                + (f" ({', '.join(cached)} from the cache)" if cached else "")
                + (f"; {self.once_seconds:.1f} s of compilation reserved"
                   if self.once_seconds else "")
                + (f"; not counted: {'; '.join(self.not_counted)}" if self.not_counted else ""))


# --------------------------------------------------------------------------- costs


def cache_dir() -> Path:
    explicit = os.environ.get("MLSGD_DSL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlsgd-dsl"


def cost_key(level: Level) -> str:
    """What a batch's cost depends on: machine, torch, threads, device, network, batch."""
    x = level.data.train_x
    parts = {
        "machine": platform.node(), "processor": platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(level.device) + (f":{torch.cuda.get_device_name(level.device)}"
                                       if level.device.type == "cuda" else ""),
        "network": type(level.model).__name__,
        "tensors": [[n, list(t.shape), str(t.dtype)]
                    for n, t in level.model.state_dict().items()],
        "input": [list(x.shape[1:]), str(x.dtype)], "batch": level.batch_size,
        "optimizer": level.optimizer_spec.model_dump(mode="json"),
        "augment": [level.augment.flip, level.augment.crop],
        "objective": [level.objective.l2, level.objective.smoothness],
        "compile": level.compiled, "channels_last": level.channels_last,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(entries, indent=1, sort_keys=True) + "\n")
                           .encode("utf-8"))
    except OSError:  # a read-only home: plan without a cache
        pass


def _twin(level: Level) -> Level:
    """A copy of ``level`` to time: its own network (deep copy) and optimiser."""
    twin = Level(level.name, copy.deepcopy(level.model), level.data, h=level.h, lr=level.lr,
                 batch_size=level.batch_size, epochs=level.epochs,
                 optimizer=level.optimizer_spec, l2=level.objective.l2,
                 smoothness=level.objective.smoothness, device=level.device,
                 augment=level.augment)
    for p in twin.params:
        p.requires_grad_(True)
    twin.accelerate(compile=level.compiled, channels_last=level.channels_last)
    return twin


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Cost:
    """What training ``level`` costs: seconds per batch once running, and seconds paid once
    before that (``mlsgd.compile``'s compilation, beyond its batches' own time)."""

    batch_seconds: float
    once_seconds: float = 0.0
    cold_seconds: float = 0.0  # compiling from scratch: what a run planned from the cache pays


def measure_batch_seconds(level: Level, batches: int = TIMED_BATCHES) -> Cost:
    """The cost of ``level``'s training batches (the real step, on a copy)."""
    twin = _twin(level)
    host = FixedHost(torch.Generator(device=level.data.train_x.device).manual_seed(0)
                     if level.data.train_x.device.type == "cuda"
                     else torch.Generator().manual_seed(0))
    nb = twin.batches_per_epoch
    warm = min(WARMUP_BATCHES, nb)
    start = time.perf_counter()
    train_visit(twin, Visit(epochs=warm / nb), host)
    _sync(level.device)
    warm_seconds = time.perf_counter() - start
    timed = max(1, min(batches, nb))
    start = time.perf_counter()
    result = train_visit(twin, Visit(epochs=timed / nb), host)
    _sync(level.device)
    per_batch = (time.perf_counter() - start) / max(1, result.steps)
    once = cold = 0.0
    if level.compiled:
        # the copy's first batches compiled it from scratch; the run's level compiles after
        # it, finding its graphs in dynamo's and inductor's caches: a second copy's first
        # batches are what that costs
        again = _twin(level)
        start = time.perf_counter()
        train_visit(again, Visit(epochs=warm / nb), host)
        _sync(level.device)
        once = max(0.0, time.perf_counter() - start - warm * per_batch)
        cold = max(once, warm_seconds - warm * per_batch)
    return Cost(per_batch, once, cold)


def level_costs(levels: Mapping[str, Level], *, remeasure: bool = False,
                measure: Callable[[Level], Cost | float] | None = None
                ) -> tuple[dict[str, Cost], dict[str, str]]:
    """The cost of every level's training, and where each number came from."""
    measure = measure or measure_batch_seconds
    path = cache_dir() / "costs.json"
    cache = _read_cache(path)
    costs: dict[str, Cost] = {}
    sources: dict[str, str] = {}
    changed = False
    state = rng_state()  # a dropout layer would draw from the global RNG
    try:
        for name, lv in levels.items():
            key = cost_key(lv)
            entry = cache.get(key)
            if not remeasure and isinstance(entry, dict) and \
                    isinstance(entry.get("batch_seconds"), (int, float)) and \
                    entry["batch_seconds"] > 0:
                # nothing compiled in this process: the run's compilation starts from scratch
                # (inductor's disk cache may still serve part of it)
                cold = entry.get("cold_seconds", 0.0)
                cold = float(cold) if isinstance(cold, (int, float)) else 0.0
                costs[name] = Cost(float(entry["batch_seconds"]), cold, cold)
                sources[name] = "cache"
                continue
            cost = measure(lv)
            costs[name] = cost if isinstance(cost, Cost) else Cost(float(cost))
            sources[name] = "measured"
            cache[key] = {"batch_seconds": costs[name].batch_seconds,
                          "once_seconds": costs[name].once_seconds,
                          "cold_seconds": costs[name].cold_seconds, "level": name,
                          "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
            changed = True
    finally:
        set_rng_state(state)
    if changed:
        _write_cache(path, cache)
    return costs, sources


# --------------------------------------------------------------------------- the plan


def cycle_seconds(path: Sequence[str], kind: str, k: int, *, epoch_seconds: Mapping[str, float],
                  epochs: Mapping[str, float], pass_epochs: Mapping[str, float],
                  ascend_seconds: Mapping[str, float]) -> tuple[float, float]:
    """Planned training seconds of cycle ``k``: (its visits, the BatchNorm re-estimations
    after its prolongations — a cost that does not scale with the epochs)."""
    order = visit_order(list(path), kind, k)
    first = is_pass(kind, k)
    visits = sum(epoch_seconds[n] * (pass_epochs[n] if first else epochs[n]) for n in order)
    fixed = 0.0
    if shape(kind, k) is not None:  # every visit above the coarsest follows a prolongation
        fixed = sum(ascend_seconds.get(n, 0.0) for n in order if n != path[0])
    return visits, fixed


def make_plan(budget: float, *, kind: str, paths: Callable[[int], Sequence[str]],
              epoch_seconds: Mapping[str, float], epochs: Mapping[str, float],
              pass_epochs: Mapping[str, float], ascend_seconds: Mapping[str, float],
              sgd_finest: str | None = None, max_cycles: int = MAX_PLANNED_CYCLES,
              once_seconds: float = 0.0) -> Plan:
    """Cycles and one epoch factor whose planned time is ``budget`` (see the module doc);
    ``once_seconds`` (compilation) is taken off the budget before the epochs are fitted."""
    if sgd_finest is not None:
        total = max(budget - once_seconds, 0.01 * budget) / epoch_seconds[sgd_finest]
        return Plan(budget=budget, cycles=max(1, math.ceil(total - 1e-9)), scale=1.0,
                    epochs=dict(epochs), pass_epochs=dict(pass_epochs), sgd_epochs=total,
                    seconds_per_epoch=dict(epoch_seconds), planned_seconds=budget,
                    once_seconds=once_seconds)
    visits, fixed = [0.0], [once_seconds]
    k = 0
    while k < max_cycles and visits[-1] + fixed[-1] < budget:
        v, f = cycle_seconds(paths(k), kind, k, epoch_seconds=epoch_seconds, epochs=epochs,
                             pass_epochs=pass_epochs, ascend_seconds=ascend_seconds)
        visits.append(visits[-1] + v)
        fixed.append(fixed[-1] + f)
        k += 1
    # the cycle count whose unscaled time is closest to the budget (on a log scale) ...
    candidates = [c for c in (k - 1, k) if c >= 1 and visits[c] > 0]
    cycles = min(candidates, key=lambda c: abs(math.log(budget / (visits[c] + fixed[c]))))
    # ... then the visits stretched or shrunk so that visits + re-estimations = budget
    scale = max(budget - fixed[cycles], 0.01 * budget) / visits[cycles]
    return Plan(budget=budget, cycles=cycles, scale=scale,
                epochs={n: e * scale for n, e in epochs.items()},
                pass_epochs={n: e * scale for n, e in pass_epochs.items()}, sgd_epochs=None,
                seconds_per_epoch=dict(epoch_seconds),
                planned_seconds=visits[cycles] * scale + fixed[cycles],
                once_seconds=once_seconds)


def plan_run(c: Any, levels: Mapping[str, Level], *, sgd: bool) -> Plan:
    """Measure (or look up) the levels' costs and plan ``mlsgd.time_budget``."""
    from . import bn

    spec = c.hierarchy.mlsgd
    started = time.perf_counter()
    costs, sources = level_costs(levels, remeasure=spec.plan == "measure")
    batch_costs = {n: cost.batch_seconds for n, cost in costs.items()}
    epoch_seconds = {n: batch_costs[n] * lv.batches_per_epoch for n, lv in levels.items()}
    ascend: dict[str, float] = {}
    if spec.bn_recalibration > 0 and not sgd:
        for n, lv in levels.items():
            if bn.has_batchnorm(lv.model):
                images = min(spec.bn_recalibration, len(lv.data.train_x))
                ascend[n] = batch_costs[n] * FORWARD_SHARE * images / lv.batch_size
    plan = make_plan(float(spec.time_budget), kind=spec.cycle, paths=c.path,
                     epoch_seconds=epoch_seconds,
                     epochs={n: lv.epochs for n, lv in levels.items()},
                     pass_epochs={n: lv.pass_epochs for n, lv in levels.items()},
                     ascend_seconds=ascend, sgd_finest=c.finest if sgd else None,
                     once_seconds=sum(cost.once_seconds for cost in costs.values()))
    plan.sources = sources
    if not sgd:
        strategy = spec.correction if isinstance(spec.correction, str) \
            else spec.correction.strategy
        for present, what in ((strategy != "none", f"the {strategy} correction's gradient "
                               "passes"),
                              (spec.angle is not None, "the angle condition's gradients"),
                              (spec.early_stop is not None, "early termination's gradients")):
            if present:
                plan.not_counted.append(what)
    plan.planning_seconds = time.perf_counter() - started
    return plan
