"""``delayed``: start uncorrected, switch the gradient correction on later (thesis 4.4).

The thesis' discussion (section 4.4) found the gradient correction slow in practice and proposes
"to start without gradient correction and integrate it later on in the training process when
the method is close to a minimum". This strategy does exactly that: cycles run as with
``correction = "none"`` until a switching condition holds, then every later cycle runs with the
inner strategy (``deterministic`` or ``stochastic``, with or without variance reduction, with
all of that strategy's options). The switch is one-way (once on, the correction stays on).

The conditions are tested at the start of every cycle ``k`` (0-based), before the descent;
the first that holds switches the correction on for cycle ``k`` itself:

* ``after_cycle = n``: ``k ≥ n`` — cycles ``0 … n−1`` run uncorrected (like
  ``uncorrected_cycles = n``, which also still applies before any of these conditions);
* ``gradient_norm_below = ε``: ``‖P*∇_L F_L(w_{L,k,0})‖_{L−1} < ε`` — the norm of the
  restricted gradient of the finest objective, in the next coarser level's norm
  ``‖v‖_{L−1} = √h_{L−1}·‖v‖`` with ``∇_L = ∇/h_L`` (the quantity of the early-termination
  test (3.5)); ``L−1`` is the next coarser level on this cycle's path (a one-level path: the
  finest level's own ``‖∇_L F_L‖_L``);
* ``angle_below = μ``: ``cos ∠(P s_{k−1}, −∇F_L(w_{L,k−1,0})) < μ`` — the angle between the
  last cycle's prolongated coarse step (what the ascent added to the finest level,
  ``P(w_{L−1} − R w_{L,k−1,0})``) and the negative finest gradient where that cycle started:
  the quantity of the angle condition (3.3), measured once per cycle. A cycle whose coarse
  levels did not move (early termination, a rejected visit) gives no angle.

The gradient both measurements need is estimated on ``measure_fraction`` of the training set
(default: the inner strategy's data — all of it for ``deterministic``, the cycle's sample for
``stochastic``); once the correction is on, the inner strategy reuses that very gradient (the
runner caches gradients per level, weights and sample), so the switching cycle pays nothing
extra. While off, each cycle pays one gradient pass of the finest level for the measurement
(none with ``after_cycle`` alone).

What happened is written to the run's metrics as event rows of the finest level:
``switched:correction (gradient norm 0.012 < 0.02)`` in the cycle that switched, and (with
``log_checks``) ``delayed:uncorrected (gradient norm 0.031 >= 0.02; cos 0.42 >= 0.1)`` in every
cycle that measured and stayed off. The switch, its reason, the measurements and the angle
waiting for the next cycle are the strategy's :meth:`~DelayedCorrection.state_dict`, saved in
every checkpoint, so a resumed run stays switched (and measures the same angle).

The strategy sees the run only through
:class:`~mlsgd_dsl.runner.corrections.CorrectionHost` (levels, the cycle's path, transfers,
gradients, event rows): a third-party strategy can do all it does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .corrections import (
    Correction,
    CorrectionHost,
    DeterministicCorrection,
    LevelCorrection,
    Sample,
    StochasticCorrection,
    StochasticOptions,
)
from .objective import dot, norm

SWITCHED = "switched:correction"
WAITING = "delayed:uncorrected"


class DelayedOptions(StochasticOptions):
    """Options of ``delayed``: the inner strategy's options plus the switching conditions."""

    inner: Literal["deterministic", "stochastic"] = Field(
        "stochastic", description="The correction switched on: 'deterministic' (full "
                                  "gradients) or 'stochastic' (a sampled fraction).")
    after_cycle: int | None = Field(
        None, ge=0, le=100_000, description="Switch on at the start of this cycle (0-based): "
                                            "cycles 0 … n−1 run uncorrected.")
    gradient_norm_below: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Switch on when ‖P*∇_L F_L‖_{L−1} at the start of a cycle is below this.")
    angle_below: float | None = Field(
        None, gt=-1, le=1, allow_inf_nan=False,
        description="Switch on when the cosine between the last cycle's prolongated coarse "
                    "step and −∇F_L (at that cycle's start) is below this.")
    measure_fraction: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False,
        description="Data fraction of the gradient the measurements use (default: the inner "
                    "strategy's data).")
    log_checks: bool = Field(
        True, description="Write an event row with the measured values in every cycle that "
                          "measured and stayed uncorrected.")

    @model_validator(mode="after")
    def _coherent(self) -> DelayedOptions:
        if self.after_cycle is None and self.gradient_norm_below is None \
                and self.angle_below is None:
            raise ValueError("set at least one switching condition: after_cycle, "
                             "gradient_norm_below or angle_below")
        if self.inner == "deterministic":
            given = sorted({"fraction", "coarse_gradient"} & self.model_fields_set)
            if given:
                raise ValueError(f"{', '.join(given)}: only for inner = \"stochastic\"")
        return self


def _fmt(x: float) -> str:
    return f"{x:.3g}"


class DelayedCorrection(Correction):
    """Uncorrected until a switching condition holds, then ``inner`` (see the module doc)."""

    name = "delayed"

    def __init__(self, inner: Correction, *, after_cycle: int | None = None,
                 gradient_norm_below: float | None = None, angle_below: float | None = None,
                 measure_fraction: float | None = None, log_checks: bool = True) -> None:
        self.inner = inner
        self.variance_reduction = bool(getattr(inner, "variance_reduction", False))
        self.batchnorm = getattr(inner, "batchnorm", "batch")
        self.after_cycle = after_cycle
        self.gradient_norm_below = gradient_norm_below
        self.angle_below = angle_below
        self.measure_fraction = measure_fraction
        self.log_checks = log_checks
        #: cycle from which the correction is on (None: still off)
        self.switched_at: int | None = None
        self.reason: str | None = None
        #: (cycle, event text) of every row written (also kept when the host has no log)
        self.events: list[tuple[int, str]] = []
        #: per cycle: the measured values {"gradient_norm": …, "cos": …}
        self.measurements: dict[int, dict[str, float | None]] = {}
        self._decided: int | None = None
        self._last: dict[str, Any] | None = None  # what this cycle's angle needs at its end
        self._cos: float | None = None  # the last completed cycle's angle (None: none)

    # ------------------------------------------------------------------ the protocol

    def active(self, cycle: int) -> bool:
        return self.switched_at is not None and cycle >= self.switched_at

    def needs_fine_gradient(self, cycle: int) -> bool:
        return self.active(cycle)

    def sample(self, host: CorrectionHost) -> Sample | None:
        return self.inner.sample(host)

    def level_gradient(self, host: CorrectionHost, level: str,
                       current: LevelCorrection | None) -> list[Tensor]:
        return self.inner.level_gradient(host, level, current)

    def prepare(self, host: CorrectionHost, level: str,
                target: Sequence[Tensor] | None) -> LevelCorrection | None:
        if target is None:  # the finest level at the start of a cycle: decide first
            cycle = int(host.cycle)
            if self._decided != cycle:
                self._decided = cycle
                self._decide(host, level, cycle)
            if not self.active(cycle):
                return None
        return self.inner.prepare(host, level, target)

    def end_cycle(self, host: CorrectionHost, cycle: int) -> None:
        self._cos = self._cycle_cos(host) if self._last is not None else None
        self._last = None

    def state_dict(self) -> dict[str, Any]:
        return {"switched_at": self.switched_at, "reason": self.reason, "cos": self._cos,
                "measurements": {k: dict(v) for k, v in self.measurements.items()},
                "events": [list(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switched_at = state["switched_at"]
        self.reason = state["reason"]
        self._cos = state["cos"]
        self.measurements = {int(k): dict(v) for k, v in state["measurements"].items()}
        self.events = [(int(c), str(t)) for c, t in state["events"]]

    def describe(self) -> str:
        inner = self.inner.describe()
        if self.switched_at is None:
            return f"delayed {inner}, never switched on"
        return f"delayed {inner}, on from cycle {self.switched_at} ({self.reason})"

    # ------------------------------------------------------------------ the switching rule

    def _measure_sample(self, host: CorrectionHost) -> Sample | None:
        if self.measure_fraction is None:
            return self.inner.sample(host)
        return None if self.measure_fraction >= 1.0 else host.sample(self.measure_fraction)

    def _decide(self, host: CorrectionHost, finest: str, cycle: int) -> None:
        if self.switched_at is not None:
            return
        measured: dict[str, float | None] = {}
        reasons: list[str] = []
        waiting: list[str] = []
        if self.after_cycle is not None:
            if cycle >= self.after_cycle:
                reasons.append(f"after cycle {self.after_cycle}" if self.after_cycle
                               else "from the first cycle")
        need_gradient = self.gradient_norm_below is not None or self.angle_below is not None
        g: list[Tensor] | None = None
        if need_gradient:
            g = [t.detach() for t in host.gradient(finest, self._measure_sample(host))]
        if self.angle_below is not None:
            cos, self._cos = self._cos, None
            measured["cos"] = cos
            if cos is None:
                waiting.append("cos n/a")
            elif cos < self.angle_below:
                reasons.append(f"cos {_fmt(cos)} < {_fmt(self.angle_below)}")
            else:
                waiting.append(f"cos {_fmt(cos)} >= {_fmt(self.angle_below)}")
        if self.gradient_norm_below is not None:
            value = self._restricted_norm(host, finest, g)
            measured["gradient_norm"] = value
            if value < self.gradient_norm_below:
                reasons.append(f"gradient norm {_fmt(value)} < "
                               f"{_fmt(self.gradient_norm_below)}")
            else:
                waiting.append(f"gradient norm {_fmt(value)} >= "
                               f"{_fmt(self.gradient_norm_below)}")
        self.measurements[cycle] = measured
        if self.angle_below is not None and g is not None:
            self._remember(host, finest, g)
        if reasons:
            self.switched_at = cycle
            self.reason = "; ".join(reasons)
            self._last = None
            self._record(host, finest, cycle, f"{SWITCHED} ({self.reason})")
        elif waiting and self.log_checks:
            self._record(host, finest, cycle, f"{WAITING} ({'; '.join(waiting)})")

    def _restricted_norm(self, host: CorrectionHost, finest: str, g: list[Tensor]) -> float:
        """‖P*∇_L F_L‖_{L−1} (the next coarser level of this cycle's path), or ‖∇_L F_L‖_L."""
        fine = host.level(finest)
        path = list(host.path)
        if len(path) < 2 or path[-1] != finest:
            return math.sqrt(fine.h) * norm(g) / fine.h
        coarse = host.level(path[-2])
        tr = host.transfer(path[-2], finest)
        with torch.no_grad():
            pstar = tr.adjoint(dict(zip(fine.names, [t / fine.h for t in g])))
        return math.sqrt(coarse.h) * norm([pstar[n] for n in coarse.names])

    def _remember(self, host: CorrectionHost, finest: str, g: list[Tensor]) -> None:
        """What the end of this cycle needs to measure its angle."""
        path = list(host.path)
        if len(path) < 2:
            self._last = None
            return
        coarse = host.level(path[-2])
        self._last = {
            "coarse": path[-2], "finest": finest, "version": coarse.version,
            "w0": [p.detach().clone() for p in host.level(finest).params],
            "g0": [t.clone() for t in g],
        }

    def _cycle_cos(self, host: CorrectionHost) -> float | None:
        """cos ∠(P(w_{L−1} − R w_{L,k,0}), −∇F_L(w_{L,k,0})) of the cycle that just ended."""
        last = self._last
        coarse = host.level(last["coarse"])
        if coarse.version == last["version"]:
            return None  # the coarse level was not visited (early termination)
        fine = host.level(last["finest"])
        tr = host.transfer(last["coarse"], last["finest"])
        with torch.no_grad():
            start = tr.restrict(dict(zip(fine.names, last["w0"])))  # R w_{L,k,0}
            step = {n: p.detach() - start[n] for n, p in zip(coarse.names, coarse.params)}
            up = tr.prolongate(step)
            d = [up[n] for n in fine.names]
        dn, gn = norm(d), norm(last["g0"])
        if dn == 0.0 or gn == 0.0:
            return None
        return -dot(last["g0"], d) / (dn * gn)

    # ------------------------------------------------------------------ events

    def _record(self, host: CorrectionHost, finest: str, cycle: int, text: str) -> None:
        self.events.append((cycle, text))
        host.record(finest, text)


def create_delayed(options: DelayedOptions) -> DelayedCorrection:
    if options.inner == "deterministic":
        inner: Correction = DeterministicCorrection(
            variance_reduction=options.variance_reduction, batchnorm=options.batchnorm,
            svrg_finest=options.svrg_finest)
    else:
        inner = StochasticCorrection(
            fraction=options.fraction, variance_reduction=options.variance_reduction,
            coarse_gradient=options.coarse_gradient, batchnorm=options.batchnorm,
            svrg_finest=options.svrg_finest)
    return DelayedCorrection(inner, after_cycle=options.after_cycle,
                             gradient_norm_below=options.gradient_norm_below,
                             angle_below=options.angle_below,
                             measure_fraction=options.measure_fraction,
                             log_checks=options.log_checks)
