"""The angle condition (3.3) of Algorithm 5: a candidate iterate of level ``l``, prolongated to
the finest level, must make an acute enough angle with the finest level's negative gradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .objective import dot, norm


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
