"""``width-cnn``: a plain (or residual) conv–BN–ReLU network whose stages differ only in width.

The thesis' symmetric residual layer ``x − h·Kᵀσ(N(Kx))`` uses one kernel as ``K`` and ``Kᵀ``:
duplicating its output channels also duplicates its input channels, so a widened copy cannot
compute the same function. This family is built from layers that widen exactly:

* stage ``s`` starts with ``stages.{s}.entry`` — conv (``c_{s-1} → c_s``, no bias) → BN → ReLU,
  preceded by 2×2 average pooling for ``s > 0``;
* then ``blocks[s]`` blocks of width ``c_s``: ``stages.{s}.blocks.{b}.conv`` → ``bn`` → ReLU
  (plain), or with ``residual = true``
  ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))`` (``conv1``, ``bn1``, ``conv2``, ``bn2``);
* global average pooling and ``fc`` (``c_last → classes``).

Parameter names (patterns match on them):

- ``stages.{s}.entry.conv.weight`` (c_s, c_{s-1}, k, k), ``stages.{s}.entry.bn.*``
- ``stages.{s}.blocks.{b}.conv.weight``, ``…bn.*`` (plain) or ``…conv1/bn1/conv2/bn2`` (residual)
- ``fc.weight`` (classes, c_last), ``fc.bias``

The model publishes ``transfer_hints[name]["width"] = {"out": axis, "in": axis}`` for every
tensor, which ``width.net2wider`` reads (``fc`` has no out axis: the classes never widen).
"""

from __future__ import annotations

from typing import Any

import torch
from mlsgd_dsl.api import Architecture, ModelContext
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn


class WidthCNNOptions(BaseModel):
    """Options of the ``width-cnn`` family."""

    model_config = ConfigDict(extra="forbid")

    channels: list[int] = Field(
        min_length=1, max_length=8,
        description="Channels of each stage, e.g. [16, 32]; a width hierarchy changes only "
                    "these (e.g. [4, 8] / [8, 16] / [16, 32]).")
    blocks: int | list[int] = Field(
        1, description="Blocks per stage after its entry layer: one count for every stage or "
                       "one per stage (0 allowed).")
    residual: bool = Field(False, description="Residual blocks (conv1-bn1-relu-conv2-bn2 + "
                                              "skip, relu) instead of plain conv-bn-relu.")
    kernel_size: int = Field(3, ge=1, le=7, description="Odd kernel size of every conv.")

    @field_validator("channels")
    @classmethod
    def _positive_channels(cls, value: list[int]) -> list[int]:
        if any(c < 1 for c in value):
            raise ValueError(f"every channel count must be >= 1, got {value}")
        return value

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, value: int | list[int]) -> int | list[int]:
        counts = [value] if isinstance(value, int) else value
        if not counts or any(n < 0 or n > 64 for n in counts):
            raise ValueError(f"must be a count 0..64 or a list of them, got {value}")
        return value

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd (same padding), got {value}")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> WidthCNNOptions:
        if isinstance(self.blocks, list) and len(self.blocks) != len(self.channels):
            raise ValueError(f"blocks has {len(self.blocks)} entries but channels has "
                             f"{len(self.channels)}; give one count per stage or one integer")
        return self

    def block_counts(self) -> list[int]:
        if isinstance(self.blocks, int):
            return [self.blocks] * len(self.channels)
        return list(self.blocks)


class ConvBNReLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, blocks: int, residual: bool, k: int,
                 pool: bool) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()
        self.entry = ConvBNReLU(c_in, c_out, k)
        self.blocks = nn.ModuleList(
            ResidualBlock(c_out, k) if residual else ConvBNReLU(c_out, c_out, k)
            for _ in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        x = self.entry(self.pool(x))
        for block in self.blocks:
            x = block(x)
        return x


class WidthCNN(nn.Module):
    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 options: WidthCNNOptions) -> None:
        super().__init__()
        channels = options.channels
        halvings = len(channels) - 1
        if min(image_size) >> halvings < 1:
            raise ValueError(f"image size {image_size[0]}x{image_size[1]} is too small for "
                             f"{len(channels)} stages ({halvings} halvings)")
        widths = [in_channels, *channels]
        self.stages = nn.ModuleList(
            Stage(widths[s], widths[s + 1], n, options.residual, options.kernel_size, s > 0)
            for s, n in enumerate(options.block_counts()))
        self.fc = nn.Linear(channels[-1], num_classes)
        self.transfer_hints: dict[str, dict[str, Any]] = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            if name.startswith("fc."):
                axes = {"out": None, "in": 1} if tensor.dim() == 2 else {"out": None}
            elif tensor.dim() == 4:
                axes = {"out": 0, "in": 1}
            elif tensor.dim() == 1:
                axes = {"out": 0}
            else:
                continue  # num_batches_tracked
            self.transfer_hints[name] = {"width": axes}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean(dim=(2, 3)))


def build(options: WidthCNNOptions | dict[str, Any], context: ModelContext) -> nn.Module:
    """A fresh, initialised :class:`WidthCNN` for one level (``context.h`` is not used)."""
    if not isinstance(options, WidthCNNOptions):
        options = WidthCNNOptions.model_validate(options)
    return WidthCNN(context.in_channels, tuple(context.image_size), context.num_classes,
                    options)


ARCHITECTURE = Architecture(
    name="width-cnn",
    options=WidthCNNOptions,
    build=build,
    description="Conv-BN-ReLU stages (optionally residual) with 2x2 average pooling between "
                "stages, global average pooling and a linear head; options channels (per "
                "stage), blocks, residual, kernel_size. Widens exactly with width.net2wider.",
)
