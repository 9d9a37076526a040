"""The records a plugin hands to mlsgd-dsl.

Every hook in :mod:`mlsgd_dsl.hookspecs` returns lists of these records. Each record has a
``name`` (how a hierarchy file refers to it), an ``options`` pydantic model (how its options in
the file are validated; ``extra="forbid"`` is expected) and the callable that does the work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

#: Version of the plugin API. A plugin states what it needs with a PEP 440 specifier,
#: ``MLSGD_DSL_API = ">=1.0"`` (a module attribute next to its hook implementations; a bare
#: ``"1.0"`` means ``"~=1.0"``); a plugin whose specifier this version does not satisfy is
#: refused by name instead of failing later. 1.1: event hooks receive a read-only
#: ``RunView`` (``mlsgd_dsl.runner.events``) as ``run``, no longer the trainer.
API_VERSION = "1.1"


class NoOptions(BaseModel):
    """Options model of a component that takes no options."""

    model_config = ConfigDict(extra="forbid")


class TransferBindError(ValueError):
    """Raised by :meth:`TransferRule.bind` when the matched tensors do not fit the rule."""


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class ModelContext:
    """What a level tells an architecture factory besides the family's own options."""

    in_channels: int
    image_size: tuple[int, int]
    num_classes: int
    h: float  # the level's h_l (inner-product weight; default time step of residual blocks)


@dataclass(frozen=True)
class Architecture:
    """A model family: ``build(options, context)`` returns a fresh, initialised module."""

    name: str
    options: type[BaseModel]
    build: Callable[[Any, ModelContext], nn.Module]
    description: str = ""


# --------------------------------------------------------------------------- transfers


@dataclass(frozen=True)
class GroupSpec:
    """The tensors one transfer rule is bound to on one coarse→fine edge.

    ``coarse`` and ``fine`` map the matched state-dict names (parameters and buffers, in
    state-dict order) to their shapes.
    """

    pattern: str
    coarse: Mapping[str, torch.Size]
    fine: Mapping[str, torch.Size]
    coarse_level: str
    fine_level: str
    h_coarse: float
    h_fine: float
    #: Per-tensor facts a model publishes in its ``transfer_hints`` attribute, e.g.
    #: ``{"fc.weight": {"input_shape": (C, H, W)}}`` for the final linear layer.
    coarse_hints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fine_hints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class GroupOperator:
    """Linear maps between the coarse and the fine tensors of one parameter group.

    ``prolongate`` (P) takes the coarse tensors by name and returns the fine ones; ``restrict``
    (R) goes the other way. ``transpose`` is the Euclidean transpose Pᵀ; the framework turns it
    into the adjoint ``P* = (h_fine/h_coarse)·Pᵀ``. The default ``transpose`` differentiates
    ``prolongate`` (exact for a linear P); override it when a closed form is cheaper. All three
    must be pure tensor operations (batched, differentiable, no dense n×n matrices).
    """

    #: True when R∘P = I holds exactly; ``validate`` then checks it numerically.
    left_inverse: bool = True

    def __init__(self, spec: GroupSpec) -> None:
        self.spec = spec

    def prolongate(self, coarse: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def restrict(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        names = list(self.spec.coarse)
        ref = next(iter(fine.values()))
        with torch.enable_grad():
            coarse = {
                n: torch.zeros(self.spec.coarse[n], dtype=ref.dtype, device=ref.device,
                               requires_grad=True)
                for n in names
            }
            out = self.prolongate(coarse)
            total = sum((out[n] * fine[n]).sum() for n in out)
            grads = torch.autograd.grad(total, [coarse[n] for n in names], allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(coarse[n]).detach())
                for n, g in zip(names, grads)}


@dataclass(frozen=True)
class TransferRule:
    """A named transfer rule: ``bind(spec, options)`` returns a :class:`GroupOperator`.

    ``bind`` raises :class:`TransferBindError` with a readable message when the matched
    tensors do not fit (wrong count, wrong shapes).
    """

    name: str
    options: type[BaseModel]
    bind: Callable[[GroupSpec, Any], GroupOperator]
    description: str = ""


# --------------------------------------------------------------------------- data


@dataclass
class RawData:
    """What a data source returns: images ``(N, C, H, W)`` (uint8 or float) and int labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    classes: list[str] | None = None


#: ``json_schema_extra`` of a data source option that names a file or folder: a relative value
#: is taken from the hierarchy file's folder (the compiler makes it absolute before ``load``),
#: and the value is left out of the configuration hash (where the data lies does not change
#: the training; moving a project must not block ``--resume``).
FILE_PATH: dict[str, Any] = {"file_path": True}


@dataclass(frozen=True)
class DataContext:
    seed: int
    cache_dir: str | None = None


@dataclass(frozen=True)
class DataSource:
    """A named data source: ``load(options, context)`` returns :class:`RawData`.

    A missing data set raises :class:`mlsgd_dsl.errors.DataNotFound` saying where it looked
    and how to get it. ``shape(options)`` returns ``(C, H, W, num_classes)`` without loading,
    so ``validate`` can check shapes before any data is read.
    """

    name: str
    options: type[BaseModel]
    load: Callable[[Any, DataContext], RawData]
    shape: Callable[[Any], tuple[int, int, int, int]]
    description: str = ""


@dataclass(frozen=True)
class Coarsening:
    """A named data coarsening applied once to whole image tensors.

    ``apply(x, options)`` maps ``(N, C, H, W)`` to the coarse images; ``output_shape((C, H, W),
    options)`` returns the coarse shape or raises ``ValueError`` with a readable reason.
    """

    name: str
    options: type[BaseModel]
    apply: Callable[[Tensor, Any], Tensor]
    output_shape: Callable[[tuple[int, int, int], Any], tuple[int, int, int]]
    description: str = ""


# --------------------------------------------------------------------------- corrections


@dataclass(frozen=True)
class CorrectionStrategy:
    """A named gradient-correction strategy (see :mod:`mlsgd_dsl.runner.corrections`).

    ``create(options)`` returns an object implementing the runner's correction protocol.
    """

    name: str
    options: type[BaseModel]
    create: Callable[[Any], Any]
    description: str = ""


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class CheckRow:
    name: str
    status: str  # "pass" | "warn" | "fail"
    detail: str = ""


@dataclass(frozen=True)
class Check:
    """A validation check contributed by a plugin: ``run(compiled)`` returns rows."""

    name: str
    run: Callable[[Any], list[CheckRow]]
    description: str = ""


@dataclass
class Provided:
    """Everything one plugin registered, for ``mlsgd-dsl plugins``."""

    plugin: str
    distribution: str | None = None
    version: str | None = None
    items: dict[str, list[str]] = field(default_factory=dict)
