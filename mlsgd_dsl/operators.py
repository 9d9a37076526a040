"""Operator bundles: P, R and P* over whole state dicts, composed along paths.

An :class:`EdgeTransfer` holds, for one coarse→fine edge, the bound group operators of every
rule. Each group is bound twice: over parameters *and* buffers (whole state dicts: weights,
nested initialisation) and over parameters only (steps, gradients). :class:`Transfer` composes
edges along a path: ``P = P_L ⋯ P_{l+1}``, ``R = R_{l+1} ⋯ R_L``, ``P* = P*_{l+1} ⋯ P*_L``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from .api import GroupOperator


@dataclass
class BoundGroup:
    pattern: str
    rule: str
    operator: GroupOperator


@dataclass
class EdgeTransfer:
    coarse: str
    fine: str
    h_coarse: float
    h_fine: float
    full: list[BoundGroup]        # parameters + buffers
    params: list[BoundGroup]      # parameters only
    coarse_names: tuple[str, ...]
    fine_names: tuple[str, ...]
    coarse_params: tuple[str, ...]
    fine_params: tuple[str, ...]

    def _groups(self, sd: Mapping[str, Tensor], side: str) -> list[BoundGroup]:
        names = set(sd)
        full = set(self.coarse_names if side == "coarse" else self.fine_names)
        params = set(self.coarse_params if side == "coarse" else self.fine_params)
        if names == full:
            return self.full
        if names == params:
            return self.params
        level = self.coarse if side == "coarse" else self.fine
        missing = sorted(params - names)[:3]
        extra = sorted(names - full)[:3]
        raise KeyError(f"state dict does not fit level {level!r}: expected its parameters "
                       f"or its whole state dict (missing {missing}, unknown {extra})")

    def prolongate(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for g in self._groups(sd, "coarse"):
            out.update(g.operator.prolongate({n: sd[n] for n in g.operator.spec.coarse}))
        return out

    def restrict(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for g in self._groups(sd, "fine"):
            out.update(g.operator.restrict({n: sd[n] for n in g.operator.spec.fine}))
        return out

    def transpose(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for g in self._groups(sd, "fine"):
            out.update(g.operator.transpose({n: sd[n] for n in g.operator.spec.fine}))
        return out

    def adjoint(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # P* = (h_fine / h_coarse) Pᵀ  (thesis 3.2.1)
        scale = self.h_fine / self.h_coarse
        return {n: (t * scale if t.is_floating_point() else t)
                for n, t in self.transpose(sd).items()}


class Transfer:
    """P, R, P* between two levels, composed along ``edges`` (coarse→fine order)."""

    def __init__(self, edges: Sequence[EdgeTransfer]) -> None:
        if not edges:
            raise ValueError("a transfer needs at least one edge")
        self.edges = list(edges)
        self.coarse = self.edges[0].coarse
        self.fine = self.edges[-1].fine
        self.h_coarse = self.edges[0].h_coarse
        self.h_fine = self.edges[-1].h_fine

    @property
    def path(self) -> list[str]:
        return [self.coarse] + [e.fine for e in self.edges]

    def prolongate(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = dict(sd)
        for edge in self.edges:
            out = edge.prolongate(out)
        return out

    def restrict(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = dict(sd)
        for edge in reversed(self.edges):
            out = edge.restrict(out)
        return out

    def transpose(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = dict(sd)
        for edge in reversed(self.edges):
            out = edge.transpose(out)
        return out

    def adjoint(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = dict(sd)
        for edge in reversed(self.edges):
            out = edge.adjoint(out)
        return out

    @property
    def left_inverse(self) -> bool:
        return all(g.operator.left_inverse for e in self.edges for g in e.full)

    def __repr__(self) -> str:
        return f"Transfer({' -> '.join(self.path)})"
