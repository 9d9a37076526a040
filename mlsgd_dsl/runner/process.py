"""The process-wide settings of a run, entered and restored as one (:class:`RunProcess`).

A run changes four things that belong to the whole Python process: torch's intra-op thread
count (``mlsgd.threads``), flush-denormal (on: evaluating a freshly initialised network ran 13x
slower on a 2-core x86 CPU without flushing; time one evaluation with and without to
re-measure), the global random generators (Python
``random``, torch CPU and CUDA; seeded with ``mlsgd.seed``) and, under torchrun, the process
group. :class:`RunProcess` sets them on entry and puts the caller's values back on exit, so
constructing a :class:`~mlsgd_dsl.runner.run.Trainer`, a failed validation or a finished run
leaves the process as it found it. The run's own random streams are carried from one entry to
the next: the generators continue where the run left them, not where the caller is.

The process group is the exception that cannot be swapped: DistributedDataParallel modules are
bound to it, so it is joined on the first entry and left by :meth:`RunProcess.close` (at the
end of ``fit()``, or when building the trainer fails). With one process there is no group.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from . import distributed
from .checkpoint import rng_state, set_rng_state


def flush_denormal_enabled() -> bool:
    """Whether the CPU flushes denormal floats to zero (torch has no getter: probe it)."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


class RunProcess:
    """Threads, flush-denormal, global RNG states and the process group of one run.

    Re-entrant: nested ``with`` blocks share the outer one's settings.
    """

    def __init__(self, *, threads: int | None, seed: int, device: torch.device) -> None:
        self.threads = threads
        self.seed_value = int(seed)
        self.device = device
        self._depth = 0
        self._caller: tuple[int, bool, dict[str, Any]] | None = None
        self._run_rng: dict[str, Any] | None = None  # the run's streams between entries
        self._owns_group = False
        self._joined = False

    def __enter__(self) -> RunProcess:
        self._depth += 1
        if self._depth > 1:
            return self
        self._caller = (torch.get_num_threads(), flush_denormal_enabled(), rng_state())
        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            torch.set_flush_denormal(True)
            if self._run_rng is not None:
                set_rng_state(self._run_rng)
            if not self._joined:
                self._joined = True
                self._owns_group = distributed.setup(self.device)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth > 0 or self._caller is None:
            return
        threads, flush, caller_rng = self._caller
        self._caller = None
        self._run_rng = rng_state()
        set_rng_state(caller_rng)
        torch.set_flush_denormal(flush)
        torch.set_num_threads(threads)

    def seed(self) -> None:
        """Seed the global generators with ``mlsgd.seed`` (inside the ``with`` block)."""
        if self._depth == 0:
            raise RuntimeError("RunProcess.seed() outside its with-block would change the "
                               "caller's generators")
        torch.manual_seed(self.seed_value)
        random.seed(self.seed_value)

    def close(self) -> None:
        """Leave the process group this run joined (a no-op with one process)."""
        if self._owns_group:
            self._owns_group = False
            distributed.teardown(True)
