"""Learning-rate schedules spanning the whole run (``[mlsgd.schedule]``).

Time is counted in *epochs on all levels* (``global_epoch``): every epoch of every level counts
one, a fraction of an epoch its fraction — the thesis' convention for its step schedule
("×0.7 every N epochs, counting the coarse epochs too"). Cosine and one-cycle use the same
counter; their horizon is the planned total of epochs of the run (every level visit of every
cycle, as planned before training: an early stop, a rejected step or a time budget ends the run
before the schedule's end). Each level scales its own base learning rate ``lr_l``:

* ``constant``: ``lr_l``;
* ``step``: ``lr_l · factor^⌊E / every⌋``;
* ``cosine``: ``min_lr + (lr_l − min_lr)·(1 + cos(π p))/2``, ``p = (E − warmup)/(total − warmup)``;
* ``onecycle``: linear ramp from ``lr_l/25`` to ``lr_l`` over ``warmup`` epochs (0: the first
  30 % of the run, as PyTorch's ``OneCycleLR``), then cosine down to ``min_lr``.

``warmup > 0`` adds a linear warm-up from 0 to the schedule's value to constant, step and
cosine. The value is set before every step from the position ``E`` before that step (so all
steps of an epoch share a step schedule's rate); the warm-up ramp is evaluated at the position
after the step, so the first step is not a zero step.
"""

from __future__ import annotations

import math

from ..schema import ScheduleSpec

ONECYCLE_START_DIV = 25.0
ONECYCLE_WARMUP = 0.3


class Schedule:
    def __init__(self, spec: ScheduleSpec, total_epochs: float) -> None:
        self.spec = spec
        self.kind = spec.kind
        self.total = max(float(total_epochs), 1e-12)
        self.warmup = float(spec.warmup)
        if self.kind == "onecycle" and self.warmup <= 0:
            self.warmup = ONECYCLE_WARMUP * self.total

    def lr(self, base: float, epoch: float, step: float = 0.0) -> float:
        """Learning rate of a level with base rate ``base`` at global epoch ``epoch``;
        ``step`` is the length of one step in epochs (for the warm-up ramp)."""
        s = self.spec
        e = max(float(epoch), 0.0)
        ramp = min(1.0, (e + step) / self.warmup) if self.warmup > 0 else 1.0
        if self.kind == "onecycle":
            if e < self.warmup:
                start = base / ONECYCLE_START_DIV
                return start + (base - start) * ramp
            return self._cosine(base, e)
        if self.kind == "constant":
            value = base
        elif self.kind == "step":
            value = base * s.factor ** math.floor(e / s.every + 1e-9)
        else:  # cosine
            value = self._cosine(base, e)
        return value * ramp

    def _cosine(self, base: float, e: float) -> float:
        span = self.total - self.warmup
        p = min(max((e - self.warmup) / span, 0.0), 1.0) if span > 0 else 1.0
        low = min(self.spec.min_lr, base)
        return low + (base - low) * 0.5 * (1.0 + math.cos(math.pi * p))

    def constant_within(self, base: float) -> bool:
        """True when the rate never changes (no per-step update needed)."""
        return self.kind == "constant" and self.warmup <= 0
