"""Gradient-correction strategies: the protocol and the built-in ones (thesis 3.2.2, 3.3.2–3.3.5).

Everything is in Euclidean coordinates (what autograd gives). The level gradient is
``∇_l = ∇/h_l``, so the first-order coherent target of level ``l`` at its restricted start point
``w_{l,0} = R w_{l+1}`` is ``h_l·P*∇_{l+1}H_{l+1}(w_{l+1}) = Pᵀ∇H_{l+1}(w_{l+1})`` (Euclidean);
the runner computes it (``target``) and hands it to :meth:`Correction.prepare`, which returns the
:class:`LevelCorrection` used for the level's visit. Composition over several levels (thesis
eq. (3.1)) follows: the target of level ``l−1`` is computed from the gradient of ``H_l`` (not
``F_l``) at ``w_{l,0}``, which equals ``target_l`` by construction.

Per step, the level solver forms the gradient of ``H_l`` from the stochastic gradient of
``F_l`` on the batch as

* plain (3.3.2 / 3.3.4): ``g_l(w_t, ξ) + vector`` with the constant ``vector = target −
  ĝ_l(w_{l,0})`` (``ĝ``: full gradient, or estimated on a sample);
* variance reduced (3.3.3 / 3.3.5, eq. (3.21)): ``g_l(w_t, ξ) − g_l(w_{l,0}, ξ) + target``: the
  same batch through a frozen copy of the model at ``w_{l,0}`` (``snapshot``) is subtracted —
  no gradient of ``F_l`` over the data is ever needed on the coarse levels. On the finest
  level the same rule with ``target = ĝ_L(w_{L,k,0})`` is SVRG (the thesis states (3.21) for
  ``l = 0, …, L``).

The step-size regularisation ``λ h_l (w − w_{l,0})`` is added by the runner for every
strategy (it belongs to the level, not to the correction).

A third-party strategy subclasses :class:`Correction` (or implements the same methods), sees the
run only through :class:`CorrectionHost` (as the built-in ``delayed`` does) and is registered
with the ``mlsgd_corrections`` hook; see :mod:`mlsgd_dsl.builtins.corrections`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

# --------------------------------------------------------------------------- what the runner offers


@dataclass(frozen=True)
class Sample:
    """Training-set indices ζ of a gradient estimate; the same indices on every level (the
    coarsened data sets are index-aligned), drawn once per cycle and fraction."""

    indices: Tensor
    fraction: float
    cycle: int

    @property
    def key(self) -> tuple:
        return ("sample", self.cycle, self.fraction)


class LevelView(Protocol):
    """Read access to one level (:class:`mlsgd_dsl.runner.level.Level` implements it)."""

    @property
    def name(self) -> str: ...

    @property
    def h(self) -> float:
        """The level's mesh size ``h_l`` (inner product ``⟨u, v⟩_l = h_l·⟨u, v⟩``)."""

    @property
    def names(self) -> Sequence[str]:
        """Names of the trained parameters, in the order of :attr:`params`."""

    @property
    def params(self) -> Sequence[Tensor]:
        """The live parameters (read them; the runner alone changes them)."""

    @property
    def version(self) -> int:
        """Bumped whenever the weights change: equal versions mean equal weights."""


class TransferView(Protocol):
    """The compiled operators between two levels, on ``{parameter name: tensor}`` dicts."""

    def restrict(self, fine: dict[str, Tensor]) -> dict[str, Tensor]:
        """``R``: fine weights → coarse weights."""

    def prolongate(self, coarse: dict[str, Tensor]) -> dict[str, Tensor]:
        """``P``: coarse steps (or weights) → fine."""

    def adjoint(self, fine: dict[str, Tensor]) -> dict[str, Tensor]:
        """``P* = (h_fine/h_coarse)·Pᵀ``: fine level gradients → coarse level gradients."""


class CorrectionHost(Protocol):
    """Everything the runner offers a strategy — the built-in ones use nothing else.

    Implemented by :class:`mlsgd_dsl.runner.driver.Driver`; valid during one cycle.
    """

    @property
    def cycle(self) -> int:
        """The cycle in progress (0-based)."""

    @property
    def finest(self) -> str:
        """The finest level's name."""

    @property
    def path(self) -> Sequence[str]:
        """This cycle's levels, coarsest first, ending with the finest."""

    def level(self, name: str) -> LevelView:
        """Read access to a level of this cycle's path."""

    def transfer(self, coarse: str, fine: str) -> TransferView:
        """The operators between two levels of the path (composed when not adjacent)."""

    def gradient(self, level: str, sample: Sample | None = None, *,
                 model: nn.Module | None = None) -> list[Tensor]:
        """Euclidean ``∇F_l`` at the level's current weights (or at ``model``'s), over all
        training data of the level (``sample=None``) or over ``sample``; no augmentation,
        chunks of ``mlsgd.full_batch_size``, BatchNorm as the strategy's ``batchnorm`` says
        (default: batch statistics, running statistics left untouched; see
        :meth:`mlsgd_dsl.runner.objective.Objective.gradient`). Results are cached per
        (level, weights version, sample), so the angle condition and a correction that need
        the same gradient share one pass; treat them as read-only."""

    def sample(self, fraction: float) -> Sample:
        """The cycle's sample of ``fraction`` of the training set (one per fraction and cycle)."""

    def snapshot(self, level: str) -> nn.Module:
        """A frozen copy of the level's model at its current weights (for variance reduction)."""

    def at_start(self, level: str) -> bool:
        """True while the level's weights are still its restricted start point ``w_{l,0}``."""

    def record(self, level: str, event: str) -> None:
        """Write an event row (``event`` text, no losses) of ``level`` to the run's metrics;
        the ``mlsgd_epoch_end`` hooks see it like any row."""


# --------------------------------------------------------------------------- per visit


@dataclass
class LevelCorrection:
    """The correction of one level for one visit.

    ``target``: Euclidean ``∇H_l(w_{l,0})`` (what first-order coherence demands: ``Pᵀ∇H_{l+1}``;
    on the finest level the estimate of ``∇F_L(w_{L,k,0})``).
    ``vector``: constant added to every stochastic gradient of ``F_l`` (or None).
    ``snapshot``: variance reduction: a copy of the model at ``w_{l,0}`` whose gradient on the
    same batch is subtracted at every step (or None).
    """

    target: list[Tensor] | None
    vector: list[Tensor] | None = None
    snapshot: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def variance_reduced(self) -> bool:
        return self.snapshot is not None


def snapshot_params(snapshot: nn.Module) -> list[Tensor]:
    return [p for p in snapshot.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- strategies


class Correction:
    """Protocol of a correction strategy, with the behaviour of ``none`` (H_l = F_l).

    The runner calls, per cycle ``k`` (``cycle`` counts from 0):

    * :meth:`needs_fine_gradient` — does the cycle need ``∇F_L(w_{L,k,0})``?
    * :meth:`level_gradient` — an estimate of ``∇H_l`` at the level's current weights (for the
      descent to the next coarser level and the early-termination test (3.4)/(3.5));
    * :meth:`prepare` — the :class:`LevelCorrection` of a level for its visit, given the target
      ``Pᵀ∇H_{l+1}`` (``target=None`` for the finest level at the start of the cycle);
    * :meth:`end_cycle` — after the cycle completed;

    and :meth:`state_dict` for every checkpoint, :meth:`load_state_dict` on ``--resume``.
    Every ``host`` is a :class:`CorrectionHost`, the whole of what a strategy can use.
    """

    name = "none"
    variance_reduction = False
    #: BatchNorm in gradient passes: "batch" (statistics of each chunk, as in training) or
    #: "running" (eval mode). Running statistics are never changed by a gradient pass.
    batchnorm = "batch"

    def needs_fine_gradient(self, cycle: int) -> bool:
        return False

    def sample(self, host: CorrectionHost) -> Sample | None:
        """Data of this strategy's gradient estimates: None = the whole training set."""
        return None

    def level_gradient(self, host: CorrectionHost, level: str,
                       current: LevelCorrection | None) -> list[Tensor]:
        """Estimate of Euclidean ``∇H_l`` (without the λ term) at the level's current weights."""
        if current is not None and current.target is not None and host.at_start(level):
            return [t.clone() for t in current.target]  # exact: first-order coherence
        sample = self.sample(host)
        g = host.gradient(level, sample)
        if current is None:
            return [t.clone() for t in g]
        if current.snapshot is not None:
            g0 = host.gradient(level, sample, model=current.snapshot)
            return [a - b + t for a, b, t in zip(g, g0, current.target)]
        if current.vector is not None:
            return [a + v for a, v in zip(g, current.vector)]
        return [t.clone() for t in g]

    def prepare(self, host: CorrectionHost, level: str,
                target: Sequence[Tensor] | None) -> LevelCorrection | None:
        return None

    def end_cycle(self, host: CorrectionHost, cycle: int) -> None:
        """Called after every completed cycle (before its checkpoint is written)."""

    def state_dict(self) -> dict[str, Any]:
        """What the strategy must carry across a resume; saved in every checkpoint.

        Only what weights-only loading accepts (tensors, numbers, strings, None and lists,
        tuples, dicts of them); stateless strategies return ``{}``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called once, before the first resumed
        cycle)."""

    def describe(self) -> str:
        return self.name


class GradientCorrection(Correction):
    """``deterministic`` and ``stochastic``: the thesis' gradient correction (± VR)."""

    def __init__(self, *, variance_reduction: bool = False, batchnorm: str = "batch",
                 svrg_finest: bool = True) -> None:
        self.variance_reduction = bool(variance_reduction)
        self.batchnorm = batchnorm
        self.svrg_finest = bool(svrg_finest)

    def needs_fine_gradient(self, cycle: int) -> bool:
        return True

    def coarse_sample(self, host: CorrectionHost) -> Sample | None:
        return self.sample(host)

    def prepare(self, host: CorrectionHost, level: str,
                target: Sequence[Tensor] | None) -> LevelCorrection | None:
        if target is None:  # the finest level: H_L = F_L; SVRG around w_{L,k,0} with VR
            if not (self.variance_reduction and self.svrg_finest):
                return None
            g = [t.clone() for t in host.gradient(level, self.sample(host))]
            return LevelCorrection(target=g, vector=g, snapshot=host.snapshot(level))
        target = list(target)
        if self.variance_reduction:  # (3.21): g(w_t,ξ) − g(w_0,ξ) + Pᵀ∇H_{l+1}
            return LevelCorrection(target=target, vector=target, snapshot=host.snapshot(level))
        # (3.15)/(3.16): constant Pᵀ∇H_{l+1} − ∇F_l(w_{l,0})
        g0 = host.gradient(level, self.coarse_sample(host))
        return LevelCorrection(target=target, vector=[t - g for t, g in zip(target, g0)])

    def describe(self) -> str:
        return self.name + (" + variance reduction" if self.variance_reduction else "")


class DeterministicCorrection(GradientCorrection):
    """Full gradients (whole training set of each level) in the correction (thesis 3.3.2/3.3.3)."""

    name = "deterministic"


class StochasticCorrection(GradientCorrection):
    """Gradients estimated on a sampled fraction ζ of the data (thesis 3.3.4/3.3.5).

    One sample per cycle, the same image indices on every level, so the estimates of
    ``Pᵀ g_{l+1}(ζ)`` and ``g_l(ζ)`` are coupled (their noise largely cancels in the
    correction). ``coarse_gradient = "full"`` uses the full coarse gradient instead, exactly
    as written in (3.16) (thesis 3.3.4).
    """

    name = "stochastic"

    def __init__(self, *, fraction: float = 0.03125, variance_reduction: bool = False,
                 coarse_gradient: str = "sample", batchnorm: str = "batch",
                 svrg_finest: bool = True) -> None:
        super().__init__(variance_reduction=variance_reduction, batchnorm=batchnorm,
                         svrg_finest=svrg_finest)
        self.fraction = float(fraction)
        self.coarse_gradient = coarse_gradient

    def sample(self, host: CorrectionHost) -> Sample | None:
        return None if self.fraction >= 1.0 else host.sample(self.fraction)

    def coarse_sample(self, host: CorrectionHost) -> Sample | None:
        return None if self.coarse_gradient == "full" else self.sample(host)

    def describe(self) -> str:
        return f"stochastic ({self.fraction:g})" + (
            " + variance reduction" if self.variance_reduction else "")


# --------------------------------------------------------------------------- option models


class NoneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeterministicOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variance_reduction: bool = Field(
        False, description="SVRG-type steps g(w_t) − g(w_0) + P*∇H (thesis 3.3.3): no full "
                           "gradient on the coarse levels, a second forward/backward per step.")
    svrg_finest: bool = Field(
        True, description="With variance_reduction: also the finest level steps with "
                          "g(w_t) − g(w_{L,k,0}) + ∇F_L(w_{L,k,0}) (SVRG; (3.21) for l = L).")
    batchnorm: Literal["batch", "running"] = Field(
        "batch", description="BatchNorm in the gradient passes of the correction: 'batch' "
                             "(statistics of each chunk, as in the training steps) or 'running' "
                             "(eval mode). Running statistics are never updated by them.")


class StochasticOptions(DeterministicOptions):
    fraction: float = Field(0.03125, gt=0, le=1, allow_inf_nan=False,
                            description="Fraction of the training set the gradients in the "
                                        "correction are estimated on (thesis: 3.125 %).")
    coarse_gradient: Literal["sample", "full"] = Field(
        "sample", description="Gradient of the coarse level at its start point: on the same "
                              "sample (default) or on all its data (thesis (3.16)).")


def create_none(options: Any) -> Correction:
    return Correction()


def create_deterministic(options: DeterministicOptions) -> Correction:
    return DeterministicCorrection(variance_reduction=options.variance_reduction,
                                   batchnorm=options.batchnorm,
                                   svrg_finest=options.svrg_finest)


def create_stochastic(options: StochasticOptions) -> Correction:
    return StochasticCorrection(fraction=options.fraction,
                                variance_reduction=options.variance_reduction,
                                coarse_gradient=options.coarse_gradient,
                                batchnorm=options.batchnorm,
                                svrg_finest=options.svrg_finest)
