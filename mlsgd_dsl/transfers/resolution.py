"""The fully connected layer between image resolutions (thesis 4.3.2, "fully connected layer").

The weight ``(out, C·H·W)`` of the final linear layer is reshaped to ``(out, C, H, W)`` and
each ``(H, W)`` slice is treated like an image: R is average pooling (factor = fine H /
coarse H, the same for W), P is nearest (constant) or bilinear interpolation, times ``scale``.

Scale and function preservation: if the fine network's last feature maps are the
nearest-upsampled coarse ones, the fine layer sums factor² copies of each coarse pixel, so
P = nearest·s computes factor²·s times the coarse output. ``scale = 1/factor²`` (``"auto"``)
preserves the function; ``scale = 1`` is the thesis' operator (its P replicates each pixel, its
R averages). With P = s·nearest, R = avgpool/s, so R∘P = I for every s; i.e. for
``"auto"`` R is sum pooling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor

from ..api import GroupOperator, GroupSpec, TransferBindError
from .identity import require_same_names


class ResolutionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: prolongation of each (H, W) slice: constant ("nearest", the thesis' image P) or bilinear
    mode: Literal["nearest", "bilinear"] = "nearest"
    #: P = scale·interpolation, R = avgpool/scale; "auto" = 1/factor² (function-preserving)
    scale: float | Literal["auto"] = 1.0
    #: (C, H, W) of the layer's input when the model publishes no ``input_shape`` hint
    coarse_shape: tuple[int, int, int] | None = None
    fine_shape: tuple[int, int, int] | None = None

    @field_validator("scale")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not value > 0:
            raise ValueError(f"must be positive or 'auto', got {value}")
        return value


@dataclass(frozen=True)
class ImageWeight:
    """One weight matrix and the feature-map shape its columns are laid out in."""

    name: str
    out: int
    coarse: tuple[int, int, int]  # (C, H, W)
    fine: tuple[int, int, int]


def _input_shape(spec: GroupSpec, name: str, fine: bool,
                 option: tuple[int, int, int] | None) -> tuple[int, int, int]:
    hints = spec.fine_hints if fine else spec.coarse_hints
    level = spec.fine_level if fine else spec.coarse_level
    hinted = hints.get(name, {}).get("input_shape")
    if hinted is not None and option is not None and tuple(hinted) != tuple(option):
        raise TransferBindError(
            f"resolution: '{name}' on level '{level}': the model says its input is "
            f"{tuple(hinted)}, the option '{'fine' if fine else 'coarse'}_shape' says "
            f"{tuple(option)}")
    shape = hinted if hinted is not None else option
    if shape is None:
        raise TransferBindError(
            f"resolution: '{name}' on level '{level}' needs the (C, H, W) of its input: the "
            f"model publishes no transfer_hints['{name}']['input_shape'] and the rule has no "
            f"'{'fine' if fine else 'coarse'}_shape' option")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise TransferBindError(
            f"resolution: '{name}' on level '{level}': input shape must be (C, H, W), "
            f"got {shape}")
    return shape  # type: ignore[return-value]


def plan_image_weights(spec: GroupSpec, options: ResolutionOptions) -> tuple[
        list[ImageWeight], int]:
    """Check every matched weight and return them with the common pooling factor."""
    weights, factors = [], set()
    for name in require_same_names(spec, "resolution"):
        coarse, fine = tuple(spec.coarse[name]), tuple(spec.fine[name])
        if len(coarse) != 2 or len(fine) != 2 or coarse[0] != fine[0]:
            raise TransferBindError(
                f"resolution: '{name}' has shapes {coarse} and {fine}; expected the weight of a "
                "linear layer (out, C·H·W) with the same 'out' on both levels (match biases "
                "with 'identity')")
        c_in = _input_shape(spec, name, False, options.coarse_shape)
        f_in = _input_shape(spec, name, True, options.fine_shape)
        for level, shape, size in [(spec.coarse_level, c_in, coarse[1]),
                                   (spec.fine_level, f_in, fine[1])]:
            if shape[0] * shape[1] * shape[2] != size:
                raise TransferBindError(
                    f"resolution: '{name}' on level '{level}' has {size} inputs, but its "
                    f"input shape {shape} has {shape[0] * shape[1] * shape[2]}")
        if c_in[0] != f_in[0]:
            raise TransferBindError(
                f"resolution: '{name}': {c_in[0]} channels on level '{spec.coarse_level}' "
                f"but {f_in[0]} on '{spec.fine_level}'; only H and W may change")
        if f_in[1] % c_in[1] or f_in[2] % c_in[2] or f_in[1] // c_in[1] != f_in[2] // c_in[2]:
            raise TransferBindError(
                f"resolution: '{name}': fine input {f_in[1:]} is not an integer multiple, "
                f"equal in H and W, of the coarse {c_in[1:]}")
        factors.add(f_in[1] // c_in[1])
        weights.append(ImageWeight(name, coarse[0], c_in, f_in))
    if len(factors) != 1:
        raise TransferBindError(
            f"resolution: the matched weights change resolution by different factors "
            f"{sorted(factors)}; bind them with separate patterns")
    return weights, factors.pop()


class ResolutionOperator(GroupOperator):
    """P = scale·interpolation, R = avgpool/scale, on each (H, W) slice of the weights."""

    def __init__(self, spec: GroupSpec, weights: list[ImageWeight], factor: int,
                 scale: float) -> None:
        super().__init__(spec)
        self.weights = weights
        self.factor = factor
        self.scale = scale

    def interpolate(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def prolongate(self, coarse: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for w in self.weights:
            image = coarse[w.name].reshape(w.out, *w.coarse)
            fine = self.interpolate(image, w.fine[1:]) * self.scale
            out[w.name] = fine.reshape(w.out, -1)
        return out

    def _pool(self, fine: Mapping[str, Tensor], factor: float) -> dict[str, Tensor]:
        """``factor`` × the average over each factor×factor block."""
        f, out = self.factor, {}
        for w in self.weights:
            c, h, width = w.coarse
            blocks = fine[w.name].reshape(w.out, c, h, f, width, f)
            out[w.name] = (blocks.mean(dim=(3, 5)) * factor).reshape(w.out, -1)
        return out

    def restrict(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._pool(fine, 1.0 / self.scale)


class NearestResolutionOperator(ResolutionOperator):
    """Constant interpolation: R∘P = avgpool∘nearest = I, with the scales cancelling."""

    left_inverse = True

    def interpolate(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        return image.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor,
                                                                              dim=-1)

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # nearestᵀ is sum pooling = factor²·avgpool
        return self._pool(fine, self.scale * self.factor**2)


class BilinearResolutionOperator(ResolutionOperator):
    """Bilinear interpolation (half-pixel centres); avgpool∘bilinear smooths, so R∘P ≠ I.

    Pᵀ is left to the autograd default.
    """

    left_inverse = False

    def interpolate(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def bind_resolution(spec: GroupSpec, options: ResolutionOptions) -> ResolutionOperator:
    weights, factor = plan_image_weights(spec, options)
    scale = 1.0 / factor**2 if options.scale == "auto" else float(options.scale)
    operator = (NearestResolutionOperator if options.mode == "nearest"
                else BilinearResolutionOperator)
    return operator(spec, weights, factor, scale)
