"""One recursive function for V-, W- and F-cycles (in the style of PyAMG's ``multilevel.py``).

The thesis' MLSGD cycle (Algorithm 4, Figure 3.2) does no training on the way down: the finest
iterate is restricted level by level to the coarsest, and the levels train *after* the coarse
step has been prolongated to them (post-smoothing only). A cycle is one visit of the finest
level. On a path ``[l_0 (coarsest), …, l_L (finest)]``, :func:`cycle` at level ``i > 0`` makes
``γ_i`` recursive calls on level ``i − 1``; each call is: restrict ``w_i`` down, run the
coarser cycle, prolongate its step ``s = w_{i−1} − R w_i`` and add it to ``w_i``, then train
level ``i`` for ``T_i`` epochs. The coarsest level only trains.

* **V**: ``γ = 1`` everywhere — ``coarse, mid, fine``.
* **W**: ``γ = 2`` on every level strictly between the coarsest and the finest (the finest
  makes one call: a cycle is one visit of it) — 3 levels: ``coarse, mid, coarse, mid, fine``;
  4 levels: ``c0 c1 c0 c1 c2 c0 c1 c0 c1 c2 fine``.
* **F**: like W, but the second of the two calls is a V-cycle — 3 levels: ``coarse, mid,
  coarse, mid, fine`` (the same as W); 4 levels: ``c0 c1 c0 c1 c2 c0 c1 c2 fine``.

These are PyAMG's W and F cycles (there the finest makes two calls and the level above the
coarsest one, because its coarse solve is exact) with pre-smoothing removed; for the
post-smoothing-only cycle both placements of γ give the same visit order.

If the early-termination test (3.4)/(3.5) refuses the descent from a level, that level trains
on its own and the recursion at that level ends (no second call).

Two run kinds are built from these shapes (:func:`shape`, docs/schedules.md):

* **cascade** — cycle 0 is one coarse-to-fine pass (the V shape: restrict to the coarsest, then
  train every level once on the way up, for ``cascade_epochs``); every later cycle is a visit
  of the finest level alone. With nested initialisation and ``R∘P = I`` the pass is nested
  iteration: each level starts from ``P`` of the trained coarser one — progressive resizing
  on a resolution hierarchy, progressive stacking / growth on a depth hierarchy.
* **fmg** — full multigrid: the same pass, then V-cycles. Classical FMG runs a V-cycle on every
  intermediate sub-hierarchy; with post-smoothing only such a V-cycle right after a
  prolongation would restrict ``P w`` back to ``w`` and train the coarse level again, i.e. the
  same as a longer first visit there, which ``cascade_epochs`` already expresses.
"""

from __future__ import annotations

from typing import Protocol


class CycleDriver(Protocol):
    """What the recursion calls; :class:`~mlsgd_dsl.runner.driver.Driver` implements it (and
    tests use a recorder)."""

    def descend(self, fine: str, coarse: str) -> bool:
        """Restrict the iterate of ``fine`` to ``coarse`` and set up ``coarse``'s objective;
        False refuses the descent (early termination)."""

    def ascend(self, coarse: str, fine: str) -> None:
        """Prolongate the step of ``coarse`` and add it to ``fine``."""

    def smooth(self, level: str) -> None:
        """Train ``level`` for its epochs (Algorithm 5)."""

    def stopped(self) -> bool:
        """True once the run must end (time budget, stop on divergence)."""


SHAPES = ("V", "W", "F")
KINDS = (*SHAPES, "cascade", "fmg")


def shape(kind: str, k: int) -> str | None:
    """The recursive shape of cycle ``k`` of a ``kind`` run; None: the finest level alone."""
    if kind in SHAPES:
        return kind
    if kind == "cascade":
        return "V" if k == 0 else None
    if kind == "fmg":
        return "V"
    raise ValueError(f"unknown cycle kind {kind!r}")


def is_pass(kind: str, k: int) -> bool:
    """True for the coarse-to-fine pass that starts a cascade or fmg run (``cascade_epochs``)."""
    return kind in ("cascade", "fmg") and k == 0


def gamma(kind: str, index: int, finest: int) -> int:
    """Number of recursive calls of level ``index`` (0 = coarsest) in a ``kind`` cycle."""
    if index == 0:
        return 0
    if index == finest or kind == "V":
        return 1
    return 2


def cycle(driver: CycleDriver, path: list[str], kind: str = "V", index: int | None = None,
          finest: int | None = None) -> None:
    """Run one cycle of shape ``kind`` ("V", "W", "F") on ``path`` (coarsest first)."""
    if kind not in SHAPES:
        raise ValueError(f"unknown cycle shape {kind!r}")
    finest = len(path) - 1 if finest is None else finest
    i = finest if index is None else index
    level = path[i]
    if driver.stopped():
        return
    if i == 0:
        driver.smooth(level)
        return
    for call in range(gamma(kind, i, finest)):
        if driver.stopped():
            return
        # F-cycle: the first call recurses as F, the second as V.
        sub = "V" if (kind == "F" and call == 1) else kind
        if not driver.descend(level, path[i - 1]):
            driver.smooth(level)  # early termination: this level only
            return
        cycle(driver, path, sub, i - 1, finest)
        if driver.stopped():
            return
        driver.ascend(path[i - 1], level)
        driver.smooth(level)


class _Recorder:
    def __init__(self) -> None:
        self.visits: list[str] = []

    def descend(self, fine: str, coarse: str) -> bool:
        return True

    def ascend(self, coarse: str, fine: str) -> None:
        pass

    def smooth(self, level: str) -> None:
        self.visits.append(level)

    def stopped(self) -> bool:
        return False


def run_cycle(driver: CycleDriver, path: list[str], kind: str = "V", k: int = 0) -> None:
    """Cycle ``k`` of a run of kind ``kind`` (V, W, F, cascade, fmg) on ``path``."""
    form = shape(kind, k)
    if form is None:
        if not driver.stopped():
            driver.smooth(path[-1])
        return
    cycle(driver, path, form)


def visit_order(path: list[str], kind: str = "V", k: int = 0) -> list[str]:
    """The levels in the order they train during cycle ``k`` (no early termination)."""
    rec = _Recorder()
    run_cycle(rec, list(path), kind, k)
    return rec.visits
