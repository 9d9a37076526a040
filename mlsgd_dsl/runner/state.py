"""The runner's two kinds of state: the run's counters (:class:`Progress`, checkpointed) and
one cycle's working state (:class:`CycleState`, created fresh at the start of every cycle and
dropped at its end — nothing in it crosses a cycle boundary, which is why a checkpoint after
a cycle needs none of it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .corrections import Correction, LevelCorrection, Sample


@dataclass
class Progress:
    """Counters of the whole run (all in the checkpoint)."""

    cycle: int = 0  # the cycle in progress (0-based)
    cycles_done: int = 0
    global_epoch: float = 0.0  # epochs over all levels: the metrics' x axis, the schedule's
    stop_reason: str | None = None


@dataclass
class CycleState:
    """What one cycle ``k`` works with; see :class:`~mlsgd_dsl.runner.driver.Driver`."""

    cycle: int
    #: the levels of this cycle, coarsest first (a level graph may alternate paths)
    path: list[str]
    #: the strategy of this cycle (``none`` during ``mlsgd.uncorrected_cycles``)
    strategy: Correction
    #: the coarse-to-fine pass of a cascade / fmg run: levels train ``pass_epochs``
    passing: bool = False
    #: w_{l,0}: each visited level's weights where the cycle reached it
    anchor: dict[str, list[Tensor]] = field(default_factory=dict)
    #: the correction of each level's visits in this cycle
    corr: dict[str, LevelCorrection | None] = field(default_factory=dict)
    #: True while a level still sits at its start point w_{l,0}
    started: dict[str, bool] = field(default_factory=dict)
    #: displacement of the levels above, prolongated to the finest (angle condition)
    pending: dict[str, list[Tensor] | None] = field(default_factory=dict)
    #: −∇F_L(w_{L,k,0})'s gradient for the angle condition (None: no angle condition)
    angle_gradient: list[Tensor] | None = None
    #: gradients by (level, weights version, sample): shared by correction and angle check
    grad_cache: dict[tuple, list[Tensor]] = field(default_factory=dict)
    #: the cycle's samples by fraction (one per fraction, the same indices on every level)
    samples: dict[float, Sample] = field(default_factory=dict)
