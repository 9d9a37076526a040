"""2×2 ↔ 3×3 convolution kernels through the thesis' kernel basis (thesis 4.3.2).

A 2×2 kernel k on the half-resolution level approximately acts like the 3×3 kernel
Σ_{a,b∈{0,1}} k[a,b]·B_ab on the full-resolution level, where B_ab is 1/4 on the 2×2 block
of the 3×3 kernel whose top-left corner is (a, b) (the thesis' ¼(c_{i,j} + … ) kernels).
The thesis completes the four B's with the unit kernels e_01, e_10, e_11, e_12, e_21 (its
c_{1,2}, c_{2,1}, c_{2,2}, c_{2,3}, c_{3,2}; 0-based here) to a basis of all 3×3 kernels and
orders the fine coordinates as

    (e_01, e_10, e_11, e_12, e_21, B_00, B_01, B_10, B_11).

P puts k into the four B-coordinates (zeros elsewhere), R reads them back: R∘P = I. On a
plain 3×3 kernel that is a 9×9 change of basis, applied per kernel with ``einsum`` over the
two spatial dimensions. Each corner of the 3×3 kernel lies in exactly one block, so R works
out to k[a, b] = 4·K[2a, 2b]: it reads the corners only, and Pᵀ (¼ of each block's sum) is
not R. Only the 2×2 → 3×3 pair is supported.

A fine model may also train its kernels in these coordinates (the thesis' construction) with
:class:`KernelBasisParametrization`; its state dict then holds
``….parametrizations.weight.original`` of shape (Co, Ci, 9) and the rule works on the
coefficients directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..api import GroupOperator, GroupSpec, NoOptions, TransferBindError

#: the unit kernels completing the basis, in the thesis' order
UNIT_POSITIONS: tuple[tuple[int, int], ...] = ((0, 1), (1, 0), (1, 1), (1, 2), (2, 1))
#: top-left corners of the four ¼-blocks, row-major like the 2×2 kernel's entries
BLOCK_CORNERS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1))
NUM_UNITS = len(UNIT_POSITIONS)
NUM_COEFFS = 9


def _basis_float64() -> Tensor:
    """The nine basis kernels, ``(9, 3, 3)``, in coefficient order."""
    basis = torch.zeros(NUM_COEFFS, 3, 3, dtype=torch.float64)
    for c, (i, j) in enumerate(UNIT_POSITIONS):
        basis[c, i, j] = 1.0
    for c, (a, b) in enumerate(BLOCK_CORNERS, start=NUM_UNITS):
        basis[c, a:a + 2, b:b + 2] = 0.25
    return basis


_BASIS = _basis_float64()
#: dual kernels: coefficient c of a kernel K is Σ_ij DUAL[c, i, j]·K[i, j]
_DUAL = torch.linalg.inv(_BASIS.reshape(NUM_COEFFS, 9).T).reshape(NUM_COEFFS, 3, 3)


def basis_kernels(like: Tensor) -> Tensor:
    """The basis kernels ``(9, 3, 3)`` in the dtype and on the device of ``like``."""
    return _BASIS.to(dtype=like.dtype, device=like.device)


def dual_kernels(like: Tensor) -> Tensor:
    """The rows of the inverse change of basis as kernels ``(9, 3, 3)``."""
    return _DUAL.to(dtype=like.dtype, device=like.device)


def kernel_from_coefficients(coeffs: Tensor) -> Tensor:
    """``(..., 9)`` coordinates → ``(..., 3, 3)`` kernels."""
    return torch.einsum("...c,cij->...ij", coeffs, basis_kernels(coeffs))


def coefficients_from_kernel(kernel: Tensor) -> Tensor:
    """``(..., 3, 3)`` kernels → ``(..., 9)`` coordinates (inverse of the above)."""
    return torch.einsum("...ij,cij->...c", kernel, dual_kernels(kernel))


class KernelBasisParametrization(nn.Module):
    """Train a 3×3 kernel in the thesis' basis, for ``torch.nn.utils.parametrize``::

        parametrize.register_parametrization(conv, "weight", KernelBasisParametrization())

    ``conv.weight`` stays a ``(Co, Ci, 3, 3)`` kernel; the trained tensor is
    ``conv.parametrizations.weight.original`` with its nine coordinates ``(Co, Ci, 9)``.
    Holds no state (nothing extra in the state dict).
    """

    def forward(self, coeffs: Tensor) -> Tensor:
        return kernel_from_coefficients(coeffs)

    def right_inverse(self, kernel: Tensor) -> Tensor:
        return coefficients_from_kernel(kernel)


# --------------------------------------------------------------------------- transfer rule

_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.original$")


def plain_name(name: str) -> str:
    """``conv.parametrizations.weight.original`` → ``conv.weight``; other names unchanged."""
    return _PARAMETRIZED.sub(r".\1", name)


@dataclass(frozen=True)
class KernelPair:
    coarse: str
    fine: str
    coefficients: bool  # the fine tensor holds the nine coordinates, not the 3×3 kernel


def plan_kernel_pairs(spec: GroupSpec) -> list[KernelPair]:
    fine_by_plain = {plain_name(n): n for n in spec.fine}
    if not spec.coarse:
        raise TransferBindError(f"kernel_basis: pattern '{spec.pattern}' matched no tensor")
    pairs = []
    for name, shape in spec.coarse.items():
        shape = tuple(shape)
        if len(shape) < 2 or shape[-2:] != (2, 2):
            raise TransferBindError(
                f"kernel_basis: '{name}' on level '{spec.coarse_level}' has shape {shape}; "
                "the coarse side must be a 2×2 kernel (only 2×2 → 3×3 is supported)")
        fine_name = fine_by_plain.pop(name, None)
        if fine_name is None:
            raise TransferBindError(
                f"kernel_basis: '{name}' exists on level '{spec.coarse_level}' but neither it "
                f"nor its parametrized form exists on '{spec.fine_level}'")
        fine_shape = tuple(spec.fine[fine_name])
        lead = shape[:-2]
        if fine_shape == lead + (3, 3):
            pairs.append(KernelPair(name, fine_name, coefficients=False))
        elif fine_shape == lead + (NUM_COEFFS,):
            pairs.append(KernelPair(name, fine_name, coefficients=True))
        else:
            raise TransferBindError(
                f"kernel_basis: '{fine_name}' on level '{spec.fine_level}' has shape "
                f"{fine_shape}; for the coarse {shape} it must be {lead + (3, 3)} (kernel) "
                f"or {lead + (NUM_COEFFS,)} (basis coefficients)")
    if fine_by_plain:
        extra = next(iter(fine_by_plain.values()))
        raise TransferBindError(
            f"kernel_basis: '{extra}' exists on level '{spec.fine_level}' but not on "
            f"'{spec.coarse_level}'")
    return pairs


class KernelBasisOperator(GroupOperator):
    """P: k ↦ Σ k[a,b]·B_ab; R: the B-coordinates of the fine kernel; R∘P = I."""

    left_inverse = True

    def __init__(self, spec: GroupSpec, pairs: list[KernelPair]) -> None:
        super().__init__(spec)
        self.pairs = pairs

    @staticmethod
    def _blocks(like: Tensor) -> Tensor:
        return basis_kernels(like)[NUM_UNITS:].reshape(2, 2, 3, 3)

    def prolongate(self, coarse: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for pair in self.pairs:
            k = coarse[pair.coarse]
            if pair.coefficients:
                units = k.new_zeros(*k.shape[:-2], NUM_UNITS)
                out[pair.fine] = torch.cat([units, k.flatten(-2)], dim=-1)
            else:
                out[pair.fine] = torch.einsum("...ab,abij->...ij", k, self._blocks(k))
        return out

    def restrict(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for pair in self.pairs:
            w = fine[pair.fine]
            if pair.coefficients:
                out[pair.coarse] = w[..., NUM_UNITS:].unflatten(-1, (2, 2))
            else:
                dual = dual_kernels(w)[NUM_UNITS:].reshape(2, 2, 3, 3)
                out[pair.coarse] = torch.einsum("...ij,abij->...ab", w, dual)
        return out

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for pair in self.pairs:
            w = fine[pair.fine]
            if pair.coefficients:
                out[pair.coarse] = w[..., NUM_UNITS:].unflatten(-1, (2, 2))
            else:  # Pᵀ: ¼ × the sum over each 2×2 block
                out[pair.coarse] = torch.einsum("...ij,abij->...ab", w, self._blocks(w))
        return out


def bind_kernel_basis(spec: GroupSpec, options: NoOptions) -> KernelBasisOperator:
    return KernelBasisOperator(spec, plan_kernel_pairs(spec))
