"""Depth transfers: interpolation along the layer index of residual blocks (thesis 4.2.2).

A coarse residual block has n layers with time step h_l, the fine one factor·n layers with
h_{l+1} = h_l/factor. The layers of one block are stacked along a new leading axis and
interpolated in one batched operation (never a dense matrix over all weights).

With factor 2 and 1-based indices as in the thesis:

* constant: w2_{2i-1} = w2_{2i} = w1_i, R = ½Pᵀ (the mean of each pair; R∘P = I);
* linear:   w2_{2i-1} = w1_i, w2_{2i} = ½(w1_i + w1_{i+1}), the last fine layer = w1_n;
  the thesis' R = ½Pᵀ is not a left inverse here, so injection (keep the fine layers that
  copy a coarse layer) is offered as well.

For a general factor f the linear rule puts fine layer f·i + j (0-based) at the fraction j/f
between coarse layers i and i+1, with the last coarse layer repeated past the end; R = Pᵀ/f.
Integer tensors (BatchNorm ``num_batches_tracked``) are copied, never interpolated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..api import GroupOperator, GroupSpec, TransferBindError


class DepthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: the name component directly followed by the layer number (``blocks.0.layers.3.conv``)
    index: str = Field("layers", min_length=1)
    #: fine layers per coarse layer
    factor: int = Field(2, ge=1)


class LinearDepthOptions(DepthOptions):
    #: "transpose": R = Pᵀ/factor as in the thesis (not a left inverse);
    #: "injection": R keeps the fine layers that copy coarse ones (R∘P = I).
    restriction: Literal["transpose", "injection"] = "transpose"


@dataclass(frozen=True)
class LayerStack:
    """One tensor of a residual block on both levels, its layers in index order."""

    key: str  # the name with the layer number replaced by '#'
    coarse: tuple[str, ...]
    fine: tuple[str, ...]


def split_layer_index(name: str, index: str) -> tuple[str, int] | None:
    """``blocks.0.layers.3.conv.weight`` → (``blocks.0.layers.#.conv.weight``, 3)."""
    parts = name.split(".")
    for k in range(len(parts) - 1):
        if parts[k] == index and parts[k + 1].isdigit():
            return ".".join(parts[: k + 1] + ["#"] + parts[k + 2:]), int(parts[k + 1])
    return None


def _group(names: Mapping[str, torch.Size], index: str, rule: str,
           level: str) -> dict[str, list[str]]:
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        split = split_layer_index(name, index)
        if split is None:
            raise TransferBindError(
                f"{rule}: '{name}' on level '{level}' has no '{index}.<number>' component; "
                f"set the rule's 'index' option or match it with another rule")
        key, layer = split
        groups.setdefault(key, []).append((layer, name))
    return {key: [n for _, n in sorted(items)] for key, items in groups.items()}


def plan_layer_stacks(spec: GroupSpec, options: DepthOptions, rule: str) -> list[LayerStack]:
    """Pair coarse and fine layers by name; every check that can fail at bind time is here."""
    coarse = _group(spec.coarse, options.index, rule, spec.coarse_level)
    fine = _group(spec.fine, options.index, rule, spec.fine_level)
    if not coarse and not fine:
        raise TransferBindError(f"{rule}: pattern '{spec.pattern}' matched no tensor")
    for have, lack, level, other in [(coarse, fine, spec.coarse_level, spec.fine_level),
                                     (fine, coarse, spec.fine_level, spec.coarse_level)]:
        for key in have:
            if key not in lack:
                raise TransferBindError(
                    f"{rule}: '{key}' has layers on level '{level}' but none on '{other}'")
    stacks = []
    for key, coarse_names in coarse.items():
        fine_names = fine[key]
        if len(fine_names) != options.factor * len(coarse_names):
            raise TransferBindError(
                f"{rule}: '{key}' has {len(coarse_names)} layers on level "
                f"'{spec.coarse_level}' and {len(fine_names)} on '{spec.fine_level}'; "
                f"factor {options.factor} needs {options.factor * len(coarse_names)}")
        shape = tuple(spec.coarse[coarse_names[0]])
        for name, level, shapes in [(n, spec.coarse_level, spec.coarse) for n in coarse_names] \
                + [(n, spec.fine_level, spec.fine) for n in fine_names]:
            if tuple(shapes[name]) != shape:
                raise TransferBindError(
                    f"{rule}: '{name}' on level '{level}' has shape {tuple(shapes[name])}, "
                    f"but '{coarse_names[0]}' on '{spec.coarse_level}' has {shape}; "
                    "all layers of a residual block must have the same shape on both levels")
        stacks.append(LayerStack(key, tuple(coarse_names), tuple(fine_names)))
    return stacks


class DepthOperator(GroupOperator):
    """Applies per-stack maps to every layer stack of the group.

    Subclasses implement the maps on a stacked tensor: coarse ``(n, *shape)`` ↔ fine
    ``(factor·n, *shape)``.
    """

    def __init__(self, spec: GroupSpec, stacks: list[LayerStack], factor: int) -> None:
        super().__init__(spec)
        self.stacks = stacks
        self.factor = factor

    # the maps on one stack ----------------------------------------------------------------
    def prolongate_stack(self, coarse: Tensor) -> Tensor:
        raise NotImplementedError

    def restrict_stack(self, fine: Tensor) -> Tensor:
        raise NotImplementedError

    def transpose_stack(self, fine: Tensor) -> Tensor:
        raise NotImplementedError

    # helpers --------------------------------------------------------------------------------
    def pairs(self, fine: Tensor) -> Tensor:
        """``(factor·n, *shape)`` → ``(n, factor, *shape)``: the fine layers of each coarse one."""
        return fine.reshape(-1, self.factor, *fine.shape[1:])

    def copy_stack(self, coarse: Tensor) -> Tensor:
        """Constant interpolation: each coarse layer repeated ``factor`` times."""
        return coarse.repeat_interleave(self.factor, dim=0)

    # GroupOperator --------------------------------------------------------------------------
    def prolongate(self, coarse: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for stack in self.stacks:
            layers = torch.stack([coarse[n] for n in stack.coarse])
            if layers.is_floating_point() or layers.is_complex():
                fine = self.prolongate_stack(layers)
            else:  # integer buffers are counters, not weights: copy them
                fine = self.copy_stack(layers)
            out.update(zip(stack.fine, fine.unbind(0)))
        return out

    def _to_coarse(self, fine: Mapping[str, Tensor], transpose: bool) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for stack in self.stacks:
            layers = torch.stack([fine[n] for n in stack.fine])
            if not (layers.is_floating_point() or layers.is_complex()):
                coarse = self.pairs(layers)[:, 0]
            elif transpose:
                coarse = self.transpose_stack(layers)
            else:
                coarse = self.restrict_stack(layers)
            out.update(zip(stack.coarse, coarse.unbind(0)))
        return out

    def restrict(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._to_coarse(fine, transpose=False)

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._to_coarse(fine, transpose=True)


class ConstantDepthOperator(DepthOperator):
    """P repeats each coarse layer; Pᵀ sums each group of fine layers; R = Pᵀ/factor."""

    left_inverse = True

    def prolongate_stack(self, coarse: Tensor) -> Tensor:
        return self.copy_stack(coarse)

    def transpose_stack(self, fine: Tensor) -> Tensor:
        return self.pairs(fine).sum(dim=1)

    def restrict_stack(self, fine: Tensor) -> Tensor:
        return self.pairs(fine).mean(dim=1)


class LinearDepthOperator(DepthOperator):
    """Linear interpolation between neighbouring coarse layers, the last one held constant.

    R = Pᵀ/factor as in the thesis; it mixes neighbouring layers, so R∘P ≠ I.
    """

    left_inverse = False

    def _fractions(self, like: Tensor) -> Tensor:
        """t_j = j/factor, shaped to broadcast over ``(n, factor, *shape)``."""
        t = torch.arange(self.factor, dtype=like.dtype, device=like.device) / self.factor
        return t.reshape(1, self.factor, *([1] * (like.dim() - 1)))

    def prolongate_stack(self, coarse: Tensor) -> Tensor:
        following = torch.cat([coarse[1:], coarse[-1:]])  # w_{i+1}, with w_{n+1} := w_n
        t = self._fractions(coarse)
        fine = (1 - t) * coarse.unsqueeze(1) + t * following.unsqueeze(1)
        return fine.reshape(-1, *coarse.shape[1:])

    def transpose_stack(self, fine: Tensor) -> Tensor:
        groups = self.pairs(fine)
        t = self._fractions(fine)
        own = ((1 - t) * groups).sum(dim=1)   # weight of w_i in its own group
        ahead = (t * groups).sum(dim=1)       # weight of w_{i+1} in group i
        zeros = torch.zeros_like(ahead)
        # group i feeds w_{i+1}; the last group feeds w_n again (the repeated end)
        return (own + torch.cat([zeros[:1], ahead[:-1]])
                + torch.cat([zeros[1:], ahead[-1:]]))

    def restrict_stack(self, fine: Tensor) -> Tensor:
        return self.transpose_stack(fine) / self.factor


class LinearInjectionDepthOperator(LinearDepthOperator):
    """Linear P; R keeps fine layer factor·i, which is an exact copy of coarse layer i."""

    left_inverse = True

    def restrict_stack(self, fine: Tensor) -> Tensor:
        return self.pairs(fine)[:, 0]


def bind_constant(spec: GroupSpec, options: DepthOptions) -> ConstantDepthOperator:
    return ConstantDepthOperator(spec, plan_layer_stacks(spec, options, "depth.constant"),
                                 options.factor)


def bind_linear(spec: GroupSpec, options: LinearDepthOptions) -> LinearDepthOperator:
    operator = (LinearInjectionDepthOperator if options.restriction == "injection"
                else LinearDepthOperator)
    return operator(spec, plan_layer_stacks(spec, options, "depth.linear"), options.factor)
