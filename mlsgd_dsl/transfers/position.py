"""A transformer's position embedding between patch grids (rule ``position_embedding``).

A position embedding ``(1, prefix + H·W, D)`` holds ``prefix`` tokens without a position (a
class token's) followed by one vector per patch of an ``H × W`` grid. Between a coarse grid
and a fine one ``factor`` times larger in both directions (coarser images with the same patch
size, or larger patches on the same images), the grid part is treated as a ``D``-channel
image:

* P = ``scale`` · nearest upsampling (``mode = "nearest"``: every fine patch inside a coarse
  patch gets its position vector) or bilinear interpolation (``mode = "bilinear"``, the usual
  way to resize a ViT's position embedding);
* R = average pooling over ``factor × factor`` patches / ``scale``;
* Pᵀ: for nearest, sum pooling · ``scale`` (exact, closed form); for bilinear, autograd.

With nearest, R∘P = I. The prefix tokens move unchanged (identity) in all three maps. The
grid and prefix come from the model's ``transfer_hints[name] = {"grid": (H, W), "prefix": k}``
(the ``vit`` family publishes them) or from the options ``coarse_grid`` / ``fine_grid`` /
``prefix``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..api import GroupOperator, GroupSpec, TransferBindError
from .identity import require_same_names


class PositionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: interpolation of the grid part: nearest (R∘P = I) or bilinear
    mode: Literal["nearest", "bilinear"] = "nearest"
    #: P = scale · interpolation, R = average pooling / scale
    scale: float = Field(1.0, gt=0)
    #: (H, W) of the patch grids and the number of prefix tokens, when the model publishes none
    coarse_grid: tuple[int, int] | None = None
    fine_grid: tuple[int, int] | None = None
    prefix: int | None = Field(None, ge=0)


@dataclass(frozen=True)
class Embedding:
    name: str
    prefix: int
    dim: int
    coarse: tuple[int, int]
    fine: tuple[int, int]


def _layout(spec: GroupSpec, name: str, fine: bool, options: PositionOptions
            ) -> tuple[int, tuple[int, int]]:
    hints = (spec.fine_hints if fine else spec.coarse_hints).get(name, {})
    level = spec.fine_level if fine else spec.coarse_level
    grid = hints.get("grid")
    grid = tuple(grid) if grid is not None else (options.fine_grid if fine
                                                 else options.coarse_grid)
    prefix = hints.get("prefix", options.prefix)
    if grid is None or prefix is None:
        raise TransferBindError(
            f"position_embedding: '{name}' on level '{level}' needs its patch grid and prefix "
            f"count: the model publishes no transfer_hints['{name}'] with 'grid' and 'prefix' "
            f"and the rule has no '{'fine' if fine else 'coarse'}_grid' / 'prefix' options")
    return int(prefix), (int(grid[0]), int(grid[1]))


def plan_embeddings(spec: GroupSpec, options: PositionOptions) -> tuple[list[Embedding], int]:
    embeddings, factors = [], set()
    for name in require_same_names(spec, "position_embedding"):
        coarse, fine = tuple(spec.coarse[name]), tuple(spec.fine[name])
        if len(coarse) != 3 or len(fine) != 3 or coarse[0] != 1 or fine[0] != 1 \
                or coarse[2] != fine[2]:
            raise TransferBindError(
                f"position_embedding: '{name}' has shapes {coarse} and {fine}; expected "
                "(1, tokens, D) with the same D on both levels")
        c_prefix, c_grid = _layout(spec, name, False, options)
        f_prefix, f_grid = _layout(spec, name, True, options)
        if c_prefix != f_prefix:
            raise TransferBindError(
                f"position_embedding: '{name}' has {c_prefix} prefix token(s) on level "
                f"'{spec.coarse_level}' but {f_prefix} on '{spec.fine_level}'")
        for level, grid, tokens in [(spec.coarse_level, c_grid, coarse[1]),
                                    (spec.fine_level, f_grid, fine[1])]:
            if c_prefix + grid[0] * grid[1] != tokens:
                raise TransferBindError(
                    f"position_embedding: '{name}' on level '{level}' has {tokens} tokens, "
                    f"but a {grid[0]}x{grid[1]} grid and {c_prefix} prefix token(s) make "
                    f"{c_prefix + grid[0] * grid[1]}")
        if f_grid[0] % c_grid[0] or f_grid[1] % c_grid[1] or \
                f_grid[0] // c_grid[0] != f_grid[1] // c_grid[1]:
            raise TransferBindError(
                f"position_embedding: '{name}': the fine grid {f_grid} is not an integer "
                f"multiple, equal in both directions, of the coarse grid {c_grid}")
        factors.add(f_grid[0] // c_grid[0])
        embeddings.append(Embedding(name, c_prefix, coarse[2], c_grid, f_grid))
    if len(factors) != 1:
        raise TransferBindError(f"position_embedding: the matched embeddings change the grid "
                                f"by different factors {sorted(factors)}; bind them with "
                                "separate patterns")
    return embeddings, factors.pop()


class PositionOperator(GroupOperator):
    def __init__(self, spec: GroupSpec, embeddings: list[Embedding], factor: int,
                 options: PositionOptions) -> None:
        super().__init__(spec)
        self.embeddings = embeddings
        self.factor = factor
        self.mode = options.mode
        self.scale = float(options.scale)
        self.left_inverse = options.mode == "nearest"

    @staticmethod
    def _split(t: Tensor, e: Embedding, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(prefix tokens, the grid as a (1, D, H, W) image)."""
        image = t[:, e.prefix:].transpose(1, 2).reshape(1, e.dim, *grid)
        return t[:, :e.prefix], image

    @staticmethod
    def _join(prefix: Tensor, image: Tensor) -> Tensor:
        return torch.cat([prefix, image.flatten(2).transpose(1, 2)], dim=1)

    def prolongate(self, coarse: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for e in self.embeddings:
            prefix, image = self._split(coarse[e.name], e, e.coarse)
            if self.mode == "nearest":
                up = image.repeat_interleave(self.factor, dim=-2).repeat_interleave(
                    self.factor, dim=-1)
            else:
                up = F.interpolate(image, size=e.fine, mode="bilinear", align_corners=False)
            out[e.name] = self._join(prefix, up * self.scale)
        return out

    def _pool(self, fine: Mapping[str, Tensor], weight: float) -> dict[str, Tensor]:
        out = {}
        for e in self.embeddings:
            prefix, image = self._split(fine[e.name], e, e.fine)
            out[e.name] = self._join(prefix, F.avg_pool2d(image, self.factor) * weight)
        return out

    def restrict(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._pool(fine, 1.0 / self.scale)

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.mode != "nearest":
            return super().transpose(fine)
        return self._pool(fine, self.scale * self.factor ** 2)  # nearestᵀ = sum pooling


def bind_position(spec: GroupSpec, options: PositionOptions) -> PositionOperator:
    embeddings, factor = plan_embeddings(spec, options)
    return PositionOperator(spec, embeddings, factor, options)
