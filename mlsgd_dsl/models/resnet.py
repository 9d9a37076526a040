"""torchvision's ResNets with a residual step per level (family ``torchvision-resnet``).

The network is torchvision's ``ResNet`` with ``BasicBlock`` stages — the same modules and the
same state-dict names (``conv1``, ``bn1``, ``layer{k}.{i}.conv1``/``bn1``/``conv2``/``bn2``,
``layer{k}.0.downsample.{0,1}``, ``fc``; BatchNorm buffers included) — with two changes a
multilevel hierarchy needs:

* every block whose input and output have the same shape computes ``relu(x + h·F(x))``,
  ``F`` the block's residual branch and ``h`` the level's step: a stage with twice the blocks
  and half the step is the same ODE discretised more finely. The first block of a stage that
  changes the width or the resolution (it carries ``downsample``) is no step of that ODE and
  keeps torchvision's ``relu(downsample(x) + F(x))``;
* ``small_images = true`` (the default) replaces the 7×7 stride-2 stem and the max pooling,
  which would shrink a 28×28 or 32×32 image to 7×7 or 8×8 before the first stage, with a 3×3
  stride-1 convolution (the CIFAR adaptation of He et al.).

``arch`` names torchvision's model (``resnet18``: blocks [2, 2, 2, 2], ``resnet34``: [3, 4, 6,
3]); ``layers`` overrides the blocks per stage; ``width`` is the first stage's channels (64 in
torchvision; each stage doubles it). With ``width = 64``, ``small_images = false`` and ``h =
1`` the module computes what ``torchvision.models.resnet18`` computes, with the same names and
shapes.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from ..api import Architecture, ModelContext
from . import residual_step

ARCHS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
MAX_BLOCKS = 128


@functools.cache
def _basic_block() -> type[nn.Module]:
    # torchvision is imported when a level is built, not when the plugin registers
    from torchvision.models.resnet import BasicBlock

    class ScaledBasicBlock(BasicBlock):
        """torchvision's ``BasicBlock`` with the residual branch scaled by ``h`` (blocks
        without ``downsample`` only)."""

        def __init__(self, inplanes: int, planes: int, stride: int = 1,
                     downsample: nn.Module | None = None, h: float = 1.0) -> None:
            super().__init__(inplanes, planes, stride, downsample)
            self.h = 1.0 if downsample is not None else float(h)

        def forward(self, x: Tensor) -> Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(identity + self.h * out)

    return ScaledBasicBlock


class ResNet(nn.Module):
    """See the module docstring."""

    def __init__(self, in_channels: int, num_classes: int, *, layers: list[int], width: int,
                 small_images: bool, h: float) -> None:
        super().__init__()
        block = _basic_block()
        if small_images:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for k, blocks in enumerate(layers, start=1):
            planes = width * 2 ** (k - 1)
            stride = 1 if k == 1 else 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes))
            stage = [block(inplanes, planes, stride, downsample, h=h)]
            stage += [block(planes, planes, h=h) for _ in range(1, blocks)]
            setattr(self, f"layer{k}", nn.Sequential(*stage))
            inplanes = planes
        self.stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for k in range(1, self.stages + 1):
            x = getattr(self, f"layer{k}")(x)
        return self.fc(self.avgpool(x).flatten(1))


class ResNetOptions(BaseModel):
    """Options of the ``torchvision-resnet`` family."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["resnet18", "resnet34"] = Field(
        "resnet18", description="torchvision's model whose stages this level copies.")
    layers: list[int] | None = Field(
        None, min_length=1, max_length=4, description="Blocks per stage (default: arch's).")
    width: int = Field(64, ge=1, le=1024, description="Channels of the first stage "
                       "(torchvision: 64); each further stage doubles them.")
    small_images: bool = Field(True, description="3x3 stride-1 stem without max pooling "
                               "(28x28 / 32x32 images); false: torchvision's ImageNet stem.")
    h: float | None = Field(None, gt=0, description="Step of the residual branches; default: "
                            "the level's h.")

    @field_validator("layers")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 1 <= n <= MAX_BLOCKS for n in value):
            raise ValueError(f"every stage needs 1 to {MAX_BLOCKS} blocks, got {value}")
        return value

    def stage_blocks(self) -> list[int]:
        return list(self.layers) if self.layers is not None else list(ARCHS[self.arch])


def build(options: ResNetOptions | dict[str, Any], context: ModelContext) -> nn.Module:
    """A fresh :class:`ResNet` for one level."""
    if not isinstance(options, ResNetOptions):
        options = ResNetOptions.model_validate(options)
    h = residual_step(options.h, context)
    return ResNet(context.in_channels, context.num_classes, layers=options.stage_blocks(),
                  width=options.width, small_images=options.small_images, h=h)


ARCHITECTURE = Architecture(
    name="torchvision-resnet",
    options=ResNetOptions,
    build=build,
    description="torchvision's ResNet-18/34 (BasicBlock stages, torchvision's state-dict "
                "names) with relu(x + h·F(x)) in every block that keeps its shape, and a 3x3 "
                "stem for small images.",
)
