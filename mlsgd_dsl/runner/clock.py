"""The run's clocks: training time (what the plots, ``train_time`` and ``time_budget`` count)
and wall time, both continued across resumes.

Training time excludes evaluation, checkpoint writing and the event hooks (blocks entered with
:meth:`RunClock.excluded`, which nest); gradient passes of corrections are training work and
count. ``wall_time`` counts everything since the run started.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class RunClock:
    def __init__(self, *, train_time0: float = 0.0, wall_time0: float = 0.0) -> None:
        self.train_time0 = float(train_time0)
        self.wall_time0 = float(wall_time0)
        self.restart()

    def restart(self, *, train_time0: float | None = None,
                wall_time0: float | None = None) -> None:
        """Start counting now, from the given times of earlier sessions (resume)."""
        if train_time0 is not None:
            self.train_time0 = float(train_time0)
        if wall_time0 is not None:
            self.wall_time0 = float(wall_time0)
        self._t0 = time.perf_counter()
        self._excluded = 0.0
        self._depth = 0
        self._excluded_start = 0.0

    def train_time(self) -> float:
        return self.train_time0 + (time.perf_counter() - self._t0) - self._excluded

    def wall_time(self) -> float:
        return self.wall_time0 + (time.perf_counter() - self._t0)

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """A block whose time does not count as training time."""
        self._depth += 1
        if self._depth == 1:
            self._excluded_start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._excluded += time.perf_counter() - self._excluded_start

    def deadline(self, budget: float | None) -> float | None:
        """``time.perf_counter()`` value at which the training time reaches ``budget``."""
        if budget is None:
            return None
        return self._t0 + self._excluded + (budget - self.train_time0)
