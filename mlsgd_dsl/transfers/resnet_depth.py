"""Depth transfer for torchvision's ResNet layout (rule ``resnet.depth``).

torchvision names a ResNet's blocks ``layer{k}.{i}.…`` (stage k, block i: ``conv1``, ``bn1``,
``conv2``, ``bn2`` with their BatchNorm buffers, and ``downsample.{0,1}`` on the first block
of a stage that changes width or resolution). Along one stage the rule is the thesis'
constant depth interpolation (``depth.constant``) on the blocks that are steps of the
stage's ODE — each coarse block becomes ``factor`` fine blocks, R averages them, R∘P = I —
with one difference: a block carrying ``downsample`` (a *transition*) maps between different
shapes and is no such step, so it is copied once (identity), never duplicated. A stage of
``n`` blocks with a transition becomes ``1 + factor·(n − 1)`` blocks (resnet18's [2, 2, 2, 2]
→ [4, 3, 3, 3] with factor 2), one without becomes ``factor·n``.

Integer buffers (``num_batches_tracked``) are copied, as in ``depth.constant``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..api import GroupSpec, TransferBindError
from .depth import ConstantDepthOperator, LayerStack

BLOCK = re.compile(r"^(?P<stage>(?:.*\.)?layer\d+)\.(?P<index>\d+)\.(?P<rest>.+)$")


class ResNetDepthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: fine blocks per coarse (non-transition) block
    factor: int = Field(2, ge=1)


def _stages(names: Mapping[str, torch.Size], level: str
            ) -> dict[str, dict[int, dict[str, str]]]:
    """stage → block index → tensor name inside the block → full name."""
    out: dict[str, dict[int, dict[str, str]]] = {}
    for name in names:
        m = BLOCK.match(name)
        if m is None:
            raise TransferBindError(
                f"resnet.depth: '{name}' on level '{level}' is not a block tensor "
                "'layerK.I.…' of torchvision's ResNet layout; match it with another rule")
        out.setdefault(m["stage"], {}).setdefault(int(m["index"]), {})[m["rest"]] = name
    return out


def _transitions(blocks: dict[int, dict[str, str]], stage: str, level: str) -> int:
    with_down = [i for i, tensors in blocks.items()
                 if any(rest.startswith("downsample.") for rest in tensors)]
    if with_down not in ([], [0]):
        raise TransferBindError(
            f"resnet.depth: stage '{stage}' on level '{level}' has downsample tensors in "
            f"block(s) {with_down}; only the first block of a stage may carry one")
    return len(with_down)


def plan(spec: GroupSpec, options: ResNetDepthOptions
         ) -> tuple[list[LayerStack], list[str]]:
    coarse, fine = _stages(spec.coarse, spec.coarse_level), _stages(spec.fine, spec.fine_level)
    if set(coarse) != set(fine):
        raise TransferBindError(f"resnet.depth: stages {sorted(coarse)} on level "
                                f"'{spec.coarse_level}' but {sorted(fine)} on "
                                f"'{spec.fine_level}'")
    stacks: list[LayerStack] = []
    copies: list[str] = []
    for stage in sorted(coarse):
        cb, fb = coarse[stage], fine[stage]
        for blocks, level in ((cb, spec.coarse_level), (fb, spec.fine_level)):
            if sorted(blocks) != list(range(len(blocks))):
                raise TransferBindError(f"resnet.depth: stage '{stage}' on level '{level}' "
                                        f"has blocks {sorted(blocks)}, not 0..n-1")
        t = _transitions(cb, stage, spec.coarse_level)
        if _transitions(fb, stage, spec.fine_level) != t:
            raise TransferBindError(
                f"resnet.depth: stage '{stage}' starts with a downsampling block on one level "
                "but not on the other")
        n, m = len(cb) - t, len(fb) - t
        if m != options.factor * n:
            raise TransferBindError(
                f"resnet.depth: stage '{stage}' has {len(cb)} blocks on level "
                f"'{spec.coarse_level}' and {len(fb)} on '{spec.fine_level}'; with "
                f"{'a transition block (copied once) and ' if t else ''}factor "
                f"{options.factor} it needs {t + options.factor * n}")
        if t:  # the transition block: the same tensors, copied
            if set(cb[0]) != set(fb[0]):
                raise TransferBindError(f"resnet.depth: block '{stage}.0' has different "
                                        "tensors on the two levels")
            for rest, name in cb[0].items():
                if tuple(spec.coarse[name]) != tuple(spec.fine[fb[0][rest]]):
                    raise TransferBindError(
                        f"resnet.depth: '{name}' has shape {tuple(spec.coarse[name])} on "
                        f"level '{spec.coarse_level}' but {tuple(spec.fine[fb[0][rest]])} on "
                        f"'{spec.fine_level}'")
                copies.append(name)
        regular_c = [cb[i] for i in range(t, len(cb))]
        regular_f = [fb[i] for i in range(t, len(fb))]
        keys = set(regular_c[0]) if regular_c else set()
        for tensors, level in [(b, spec.coarse_level) for b in regular_c] + \
                [(b, spec.fine_level) for b in regular_f]:
            if set(tensors) != keys:
                raise TransferBindError(f"resnet.depth: the blocks of stage '{stage}' on "
                                        f"level '{level}' do not all hold the same tensors")
        for rest in sorted(keys):
            cn = tuple(b[rest] for b in regular_c)
            fn = tuple(b[rest] for b in regular_f)
            shape = tuple(spec.coarse[cn[0]])
            if any(tuple(spec.coarse[x]) != shape for x in cn) or \
                    any(tuple(spec.fine[x]) != shape for x in fn):
                raise TransferBindError(f"resnet.depth: '{stage}.#.{rest}' changes shape "
                                        "between the blocks or the levels")
            stacks.append(LayerStack(f"{stage}.#.{rest}", cn, fn))
    return stacks, copies


class ResNetDepthOperator(ConstantDepthOperator):
    """``depth.constant`` on the stages' regular blocks; transition blocks copied."""

    def __init__(self, spec: GroupSpec, stacks: list[LayerStack], copies: list[str],
                 factor: int) -> None:
        super().__init__(spec, stacks, factor)
        self.copies = copies  # the same name on both levels

    def _with_copies(self, out: dict[str, Tensor], source: Mapping[str, Tensor]
                     ) -> dict[str, Tensor]:
        for name in self.copies:
            out[name] = source[name].clone()  # a copy: callers may update it in place
        return out

    def prolongate(self, coarse: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._with_copies(super().prolongate(coarse), coarse)

    def restrict(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._with_copies(super().restrict(fine), fine)

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._with_copies(super().transpose(fine), fine)


def bind_resnet_depth(spec: GroupSpec, options: ResNetDepthOptions) -> ResNetDepthOperator:
    stacks, copies = plan(spec, options)
    if not stacks and not copies:
        raise TransferBindError(f"resnet.depth: pattern '{spec.pattern}' matched no tensor")
    return ResNetDepthOperator(spec, stacks, copies, options.factor)
