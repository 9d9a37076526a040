"""The residual network of thesis section 4.1.1 (after Ruthotto & Haber, [RH20]).

Opening conv + BN + ReLU, residual blocks of symmetric layers
``x + h·(−Kᵀ σ(N(K x)))`` (thesis (2.10)), connecting 1×1 conv + BN + ReLU + 2×2 average
pooling between blocks, and a fully connected layer on the flattened last feature map.

Parameter names are a contract with the transfer rules (patterns match on them):

- ``opening.conv.{weight,bias}``, ``opening.bn.*``
- ``blocks.{b}.layers.{i}.conv.weight`` (C, C, k, k) — the kernel K of residual layer i
- ``blocks.{b}.layers.{i}.norm.{weight,bias}`` (C,) — TV-normalisation scale / shift
- ``connect.{b}.conv.{weight,bias}``, ``connect.{b}.bn.*`` between block b and b+1
- ``fc.{weight,bias}``
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..api import Architecture, ModelContext

# --------------------------------------------------------------------------- the operator K


def _same_padding(k: int) -> tuple[int, int]:
    """(before, after) zero padding that keeps the size; an even kernel pads more after."""
    return (k - 1) // 2, k // 2


def convolve(x: Tensor, kernel: Tensor) -> Tensor:
    """``K x``: zero-padded "same" convolution (extra row/col at the bottom/right for even k)."""
    k_h, k_w = kernel.shape[-2:]
    if k_h % 2 and k_w % 2:
        return F.conv2d(x, kernel, padding=(k_h // 2, k_w // 2))
    top, bottom = _same_padding(k_h)
    left, right = _same_padding(k_w)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), kernel)


def convolve_transpose(y: Tensor, kernel: Tensor) -> Tensor:
    """``Kᵀ y``: the exact adjoint of :func:`convolve` (⟨K x, y⟩ = ⟨x, Kᵀ y⟩).

    The adjoint of "pad then valid conv" is "full transposed conv then crop what was padded".
    """
    k_h, k_w = kernel.shape[-2:]
    if k_h % 2 and k_w % 2:
        return F.conv_transpose2d(y, kernel, padding=(k_h // 2, k_w // 2))
    top, _ = _same_padding(k_h)
    left, _ = _same_padding(k_w)
    full = F.conv_transpose2d(y, kernel)
    return full[..., top:top + y.shape[-2], left:left + y.shape[-1]]


# --------------------------------------------------------------------------- layers


def tv_norm(x: Tensor, eps: float) -> Tensor:
    """Ruthotto & Haber's total-variation normalisation across channels (no affine part)."""
    x = x - x.mean(dim=1, keepdim=True)
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + eps)


class TVNorm(nn.Module):
    """:func:`tv_norm` followed by a learnable per-channel scale (init 1) and shift (init 0)."""

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return tv_norm(x, self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ResidualLayer(nn.Module):
    """``x + h·(−Kᵀ relu(N(K x)))`` with one kernel K used for both K and Kᵀ (stable, thm 2.7).

    ``conv`` is only a container of ``conv.weight`` (so a parametrization can be registered
    on it); it is never called, because :func:`convolve` handles even kernels exactly.
    """

    def __init__(self, channels: int, kernel_size: int, h: float, norm_eps: float) -> None:
        super().__init__()
        self.h = float(h)
        self.conv = nn.Conv2d(channels, channels, kernel_size, bias=False)
        self.norm = TVNorm(channels, norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.conv.weight
        return x - self.h * convolve_transpose(torch.relu(self.norm(convolve(x, kernel))), kernel)


class ResidualBlock(nn.Module):
    def __init__(self, layers: list[ResidualLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ConvBNReLU(nn.Module):
    """Opening layer: conv (same size) → BatchNorm → ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding="same", bias=True)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Connect(ConvBNReLU):
    """Connecting layer: 1×1 conv (more channels) → BN → ReLU → 2×2 average pooling."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 1)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(super().forward(x))


class RuthottoResNet(nn.Module):
    """The network of thesis 4.1.1; see the module docstring for the parameter names."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int,
                 channels: list[int], layers: list[int], kernel_size: int,
                 opening_kernel: int, h: float, norm_eps: float) -> None:
        super().__init__()
        self.opening = ConvBNReLU(in_channels, channels[0], opening_kernel)
        self.blocks = nn.ModuleList(
            ResidualBlock([ResidualLayer(c, kernel_size, h, norm_eps) for _ in range(n)])
            for c, n in zip(channels, layers)
        )
        self.connect = nn.ModuleList(Connect(a, b) for a, b in zip(channels, channels[1:]))
        height, width = image_size
        for _ in channels[1:]:
            height, width = height // 2, width // 2  # AvgPool2d(2) floors
        if height < 1 or width < 1:
            raise ValueError(
                f"image size {image_size[0]}x{image_size[1]} is too small for {len(channels)} "
                f"stages ({len(channels) - 1} halvings)")
        self.output_shape = (channels[-1], height, width)
        self.fc = nn.Linear(channels[-1] * height * width, num_classes)
        # Read by the resolution FC transfer rule to reshape fc.weight into feature maps.
        self.transfer_hints: dict[str, dict[str, Any]] = {
            "fc.weight": {"input_shape": self.output_shape}}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Thesis init: Xavier normal, std √(2/(f_in+f_out)) with f = k·k·c; zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                if parametrize.is_parametrized(module, "weight"):
                    # Kernel-basis layers: draw the kernel, then store its coordinates.
                    kernel = nn.init.xavier_normal_(torch.empty_like(module.weight))
                    with torch.no_grad():
                        module.weight = kernel
                else:
                    nn.init.xavier_normal_(module.weight)  # fans include the receptive field
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | TVNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.opening(x)
        for b, block in enumerate(self.blocks):
            x = block(x)
            if b < len(self.connect):
                x = self.connect[b](x)
        return self.fc(x.flatten(1))

    def smoothness(self) -> Tensor:
        """Σ ‖K_{i+1} − K_i‖_F over consecutive residual layers of the same block (unscaled).

        Thesis 4.1.2 writes ``2e-3 Σ ‖w^{i+1} − w^i + 2e-3‖_F``; the inner ``+ 2e-3`` is read
        as a typo repeating the coefficient (a constant shift inside a norm of a difference
        has no meaning), so it is dropped. No smoothing ε is needed at ΔK = 0 (e.g. right
        after constant prolongation): torch's norm has subgradient 0 there. The runner
        multiplies by its coefficient.
        """
        terms = [
            torch.linalg.vector_norm(nxt.conv.weight - cur.conv.weight)
            for block in self.blocks
            for cur, nxt in zip(block.layers, block.layers[1:])
        ]
        if not terms:
            return self.fc.weight.new_zeros(())
        return torch.stack(terms).sum()


def smoothness_penalty(model: nn.Module, coefficient: float = 1.0) -> Tensor:
    """``coefficient · model.smoothness()`` (thesis 4.1.2 uses coefficient 2e-3)."""
    smoothness = getattr(model, "smoothness", None)
    if smoothness is None:
        raise TypeError(f"{type(model).__name__} has no smoothness() method")
    return coefficient * smoothness()


# --------------------------------------------------------------------------- options


# Caps keep a mistyped file from building (or tracing) an absurd network; far above the thesis.
MAX_CHANNELS = 4096
MAX_LAYERS = 256
MAX_TOTAL_LAYERS = 512


class RuthottoOptions(BaseModel):
    """Options of the ``ruthotto-resnet`` family."""

    model_config = ConfigDict(extra="forbid")

    channels: list[int] = Field(
        min_length=1, max_length=8,
        description="Channels of each stage (residual block), e.g. [16, 32, 64]; a connecting "
                    "layer (1x1 conv + 2x2 average pooling) sits between consecutive stages.")
    layers: int | list[int] = Field(
        description="Residual layers per block: one count for every block, or a list with one "
                    "count per block (same length as channels).")
    kernel_size: int = Field(
        3, ge=1, le=7,
        description="Kernel size of the residual layers; even sizes pad the extra row/column "
                    "at the bottom/right (e.g. 2 on a coarse resolution level).")
    opening_kernel: int = Field(3, ge=1, le=7, description="Kernel size of the opening conv.")
    h: float | None = Field(
        None, gt=0,
        description="Time step of the residual layers; default: the level's h.")
    norm_eps: float = Field(1e-3, gt=0, description="Epsilon of the TV normalisation.")
    kernel_basis: bool = Field(
        False,
        description="Train the 3x3 residual kernels in the thesis' 9-coordinate basis (5 "
                    "canonical 3x3 kernels + 4 prolongated 2x2 kernels); kernel_size 3 only.")
    in_channels: int | None = Field(
        None, ge=1, description="If given, must equal the data's number of channels.")
    image_size: int | tuple[int, int] | None = Field(
        None, description="If given, must equal the data's image size (int = square).")

    @field_validator("channels")
    @classmethod
    def _positive_channels(cls, value: list[int]) -> list[int]:
        if any(c < 1 for c in value):
            raise ValueError(f"every channel count must be >= 1, got {value}")
        if any(c > MAX_CHANNELS for c in value):
            raise ValueError(f"channel counts are capped at {MAX_CHANNELS}, got {value}")
        return value

    @field_validator("layers")
    @classmethod
    def _positive_layers(cls, value: int | list[int]) -> int | list[int]:
        counts = [value] if isinstance(value, int) else value
        if not counts or any(n < 1 for n in counts):
            raise ValueError(f"must be a positive integer or a list of them, got {value}")
        if any(n > MAX_LAYERS for n in counts):
            raise ValueError(f"residual layers per block are capped at {MAX_LAYERS}, "
                             f"got {value}")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> RuthottoOptions:
        if isinstance(self.layers, list) and len(self.layers) != len(self.channels):
            raise ValueError(
                f"layers has {len(self.layers)} entries but channels has "
                f"{len(self.channels)}; give one count per block or a single integer")
        if sum(self.layer_counts()) > MAX_TOTAL_LAYERS:
            raise ValueError(f"{sum(self.layer_counts())} residual layers in all; the cap is "
                             f"{MAX_TOTAL_LAYERS}")
        if self.kernel_basis and self.kernel_size != 3:
            raise ValueError(
                f"kernel_basis applies to 3x3 kernels only, got kernel_size {self.kernel_size}")
        return self

    def layer_counts(self) -> list[int]:
        if isinstance(self.layers, int):
            return [self.layers] * len(self.channels)
        return list(self.layers)


# --------------------------------------------------------------------------- factory


def _check_context(options: RuthottoOptions, context: ModelContext) -> None:
    if options.in_channels is not None and options.in_channels != context.in_channels:
        raise ValueError(
            f"in_channels is {options.in_channels} but the level's data has "
            f"{context.in_channels} channels")
    if options.image_size is not None:
        size = options.image_size
        expected = (size, size) if isinstance(size, int) else tuple(size)
        if expected != tuple(context.image_size):
            raise ValueError(
                f"image_size is {expected[0]}x{expected[1]} but the level's data is "
                f"{context.image_size[0]}x{context.image_size[1]}")


def _use_kernel_basis(model: RuthottoResNet) -> None:
    # Imported here: the basis lives with the transfers and is only needed on request.
    from ..transfers.kernel_basis import KernelBasisParametrization

    for block in model.blocks:
        for layer in block.layers:
            # right_inverse turns the Xavier-initialised kernel into its 9 coordinates.
            parametrize.register_parametrization(
                layer.conv, "weight", KernelBasisParametrization())


def build(options: RuthottoOptions | dict[str, Any], context: ModelContext) -> nn.Module:
    """A fresh, initialised :class:`RuthottoResNet` for one level."""
    if not isinstance(options, RuthottoOptions):
        options = RuthottoOptions.model_validate(options)
    _check_context(options, context)
    h = options.h if options.h is not None else context.h
    if not (h > 0 and math.isfinite(h)):
        raise ValueError(f"the residual time step h must be positive, got {h}")
    model = RuthottoResNet(
        in_channels=context.in_channels,
        image_size=tuple(context.image_size),
        num_classes=context.num_classes,
        channels=list(options.channels),
        layers=options.layer_counts(),
        kernel_size=options.kernel_size,
        opening_kernel=options.opening_kernel,
        h=h,
        norm_eps=options.norm_eps,
    )
    if options.kernel_basis:
        _use_kernel_basis(model)
    return model


ARCHITECTURE = Architecture(
    name="ruthotto-resnet",
    options=RuthottoOptions,
    build=build,
    description="Residual network of thesis 4.1.1 (Ruthotto & Haber): opening conv, blocks of "
                "symmetric residual layers x + h(-K^T relu(TVnorm(K x))), 1x1 connecting "
                "layers with 2x2 average pooling, fully connected output.",
)
