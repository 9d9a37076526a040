"""Resolution coarsening of whole image tensors (applied once per run, never per batch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..api import Coarsening


class AvgPoolOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factor: int = Field(2, ge=1, description="Pooling window and stride: each factor x factor "
                                             "block of pixels becomes one pixel (its mean).")


def avgpool_shape(shape: tuple[int, int, int], options: AvgPoolOptions) -> tuple[int, int, int]:
    c, h, w = shape
    f = options.factor
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not divisible by factor {f}")
    return c, h // f, w // f


def avgpool(x: Tensor, options: AvgPoolOptions) -> Tensor:
    avgpool_shape(tuple(x.shape[1:]), options)  # type: ignore[arg-type]
    if not x.is_floating_point():
        x = x.float()  # uint8 images: pool in float (the caller scales to [0, 1] or not)
    if options.factor == 1:
        return x.clone()
    # Pooling commutes with per-channel affine normalisation, so pooling normalised images
    # equals normalising pooled ones.
    return F.avg_pool2d(x, options.factor)


AVGPOOL = Coarsening(
    name="avgpool", options=AvgPoolOptions, apply=avgpool, output_shape=avgpool_shape,
    description="Average pooling by an integer factor (the thesis' resolution coarsening).",
)


def coarsen_shape(shape: tuple[int, int, int],
                  steps: Sequence[tuple[Coarsening, Any]]) -> tuple[int, int, int]:
    """The shape after all ``steps``; ``ValueError`` names the step that does not fit."""
    for i, (step, options) in enumerate(steps):
        try:
            shape = step.output_shape(shape, options)
        except ValueError as exc:
            raise ValueError(f"coarsening step {i + 1} ({step.name}): {exc}") from None
    return shape


def coarsen(x: Tensor, steps: Sequence[tuple[Coarsening, Any]]) -> Tensor:
    """Apply ``steps`` (coarsening, validated options) in order to ``(N, C, H, W)`` images."""
    coarsen_shape(tuple(x.shape[1:]), steps)  # type: ignore[arg-type]  # fail before work
    for step, options in steps:
        x = step.apply(x, options)
    return x
