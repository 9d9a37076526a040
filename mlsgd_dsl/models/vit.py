"""A vision transformer whose blocks are steps of an ODE (family ``vit``).

Patch embedding (a ``p × p`` convolution with stride ``p``), an optional class token, a
learned position embedding, ``L`` pre-norm blocks whose residual branches are scaled by the
level's step ``h``::

    x ← x + h · attention(LayerNorm(x))
    x ← x + h · mlp(LayerNorm(x))

a final LayerNorm and a linear head on the class token (``pool = "cls"``) or on the mean of
the patch tokens (``pool = "mean"``). With ``h`` doubling from level to level and half the
blocks, a coarse network is the same ODE discretised more coarsely — the depth hierarchies of
the thesis' residual network carry over (``depth.constant`` with ``index = "blocks"`` is layer
stacking); fewer patches (coarser images, the same patch size) give a resolution hierarchy
whose position embedding moves with the ``position_embedding`` rule.

Parameter names (the contract with the transfer rules):

- ``patch.{weight,bias}`` — (D, C, p, p), (D,)
- ``cls_token`` — (1, 1, D), with ``pool = "cls"`` only
- ``pos_embed`` — (1, prefix + H_t·W_t, D); the grid (H_t, W_t) and prefix (1 with a class
  token, else 0) are published in ``transfer_hints["pos_embed"]``
- ``blocks.{i}.norm1.*``, ``blocks.{i}.attn.qkv.*`` (3D, D), ``blocks.{i}.attn.proj.*``,
  ``blocks.{i}.norm2.*``, ``blocks.{i}.mlp.fc1.*`` (mD, D), ``blocks.{i}.mlp.fc2.*``
- ``norm.*``, ``head.{weight,bias}``
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from ..api import Architecture, ModelContext
from . import residual_step

MAX_DIM = 4096
MAX_BLOCKS = 256


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """``x + h·attn(norm1(x))``, then ``x + h·mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int, h: float) -> None:
        super().__init__()
        self.h = float(h)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.h * self.attn(self.norm1(x))
        return x + self.h * self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """See the module docstring for the layout and the parameter names."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, *,
                 patch_size: int, dim: int, blocks: int, heads: int, mlp_ratio: float,
                 pool: str, h: float) -> None:
        super().__init__()
        height, width = image_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch "
                             f"size {patch_size}")
        self.grid = (height // patch_size, width // patch_size)
        self.pool = pool
        self.prefix = 1 if pool == "cls" else 0
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        if self.prefix:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.prefix + self.grid[0] * self.grid[1],
                                                  dim))
        hidden = max(1, round(mlp_ratio * dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, h) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.transfer_hints: dict[str, dict[str, Any]] = {
            "pos_embed": {"grid": self.grid, "prefix": self.prefix}}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT's initialisation: truncated normal (std 0.02) for the embeddings and linear
        layers, zero biases, LayerNorm scale 1 and shift 0."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.prefix:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, H_t·W_t, D)
        if self.prefix:
            tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        pooled = tokens[:, 0] if self.prefix else tokens.mean(dim=1)
        return self.head(pooled)


class ViTOptions(BaseModel):
    """Options of the ``vit`` family."""

    model_config = ConfigDict(extra="forbid")

    patch_size: int = Field(4, ge=1, le=64, description="Patch side p (the image sides must "
                            "be multiples of it).")
    dim: int = Field(64, ge=1, le=MAX_DIM, description="Token width D (a multiple of heads).")
    blocks: int = Field(ge=1, le=MAX_BLOCKS, description="Transformer blocks L of this level.")
    heads: int = Field(4, ge=1, le=64, description="Attention heads.")
    mlp_ratio: float = Field(2.0, gt=0, le=16, description="Hidden width of the MLP / D.")
    pool: Literal["cls", "mean"] = Field(
        "cls", description="cls: a class token feeds the head; mean: the mean patch token.")
    h: float | None = Field(None, gt=0, description="Step of the residual branches; default: "
                            "the level's h.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ViTOptions:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not a multiple of heads {self.heads}")
        return self


def build(options: ViTOptions | dict[str, Any], context: ModelContext) -> nn.Module:
    """A fresh :class:`VisionTransformer` for one level."""
    if not isinstance(options, ViTOptions):
        options = ViTOptions.model_validate(options)
    h = residual_step(options.h, context)
    return VisionTransformer(
        context.in_channels, tuple(context.image_size), context.num_classes,
        patch_size=options.patch_size, dim=options.dim, blocks=options.blocks,
        heads=options.heads, mlp_ratio=options.mlp_ratio, pool=options.pool, h=h)


ARCHITECTURE = Architecture(
    name="vit",
    options=ViTOptions,
    build=build,
    description="Vision transformer with pre-norm blocks x + h·attn(LN x), x + h·mlp(LN x) "
                "(the residual step h of the level), patch embedding, learned position "
                "embedding, class token or mean pooling, linear head.",
)
