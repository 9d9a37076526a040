"""The identity transfer: tensors whose shape is the same on both levels (thesis 4.2.2, 4.3.2).

Opening and connecting convolutions, normalisation layers, biases and BatchNorm buffers
(``num_batches_tracked`` included) "can be transferred directly": P = R = Pᵀ = I.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..api import GroupOperator, GroupSpec, NoOptions, TransferBindError


def require_same_names(spec: GroupSpec, rule: str) -> list[str]:
    """The matched names, which must be the same on both levels; else a readable error."""
    coarse, fine = list(spec.coarse), list(spec.fine)
    missing_fine = [n for n in coarse if n not in spec.fine]
    missing_coarse = [n for n in fine if n not in spec.coarse]
    if missing_fine:
        raise TransferBindError(
            f"{rule}: '{missing_fine[0]}' exists on level '{spec.coarse_level}' but not on "
            f"'{spec.fine_level}' (pattern '{spec.pattern}')")
    if missing_coarse:
        raise TransferBindError(
            f"{rule}: '{missing_coarse[0]}' exists on level '{spec.fine_level}' but not on "
            f"'{spec.coarse_level}' (pattern '{spec.pattern}')")
    if not coarse:
        raise TransferBindError(f"{rule}: pattern '{spec.pattern}' matched no tensor")
    return coarse


class IdentityOperator(GroupOperator):
    """P = R = Pᵀ = I. Returns copies so a caller updating the result in place is safe."""

    left_inverse = True

    def prolongate(self, coarse: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: coarse[n].clone() for n in self.spec.fine}

    def restrict(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: fine[n].clone() for n in self.spec.coarse}

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.restrict(fine)


def bind_identity(spec: GroupSpec, options: NoOptions) -> IdentityOperator:
    for name in require_same_names(spec, "identity"):
        if tuple(spec.coarse[name]) != tuple(spec.fine[name]):
            raise TransferBindError(
                f"identity: '{name}' has shape {tuple(spec.coarse[name])} on level "
                f"'{spec.coarse_level}' but {tuple(spec.fine[name])} on '{spec.fine_level}'; "
                "a tensor whose shape changes between levels needs another rule")
    return IdentityOperator(spec)
