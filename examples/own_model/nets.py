"""A plain residual CNN for the ``import`` family: levels that differ in depth.

``make(layers, h, in_channels, num_classes, width)`` builds

    x ─ stem (3×3 conv, BatchNorm, ReLU) ─ z₀
    z_{i+1} = z_i + h · relu(conv_i(z_i))        i = 0 … layers−1   (forward Euler, step h)
    z_L ─ average pool to 4×4 ─ flatten ─ head (linear) ─ logits

The hierarchy file passes ``layers`` (and ``width``) through ``kwargs``; ``h``,
``in_channels`` and ``num_classes`` are parameters the factory *names*, so the ``import``
family fills them from the level (its ``h`` and its data) when ``kwargs`` does not set them.

Parameter names are the contract with the transfer rules:

- ``stem.0.weight``/``bias`` (conv), ``stem.1.*`` (BatchNorm, with its running statistics)
- ``layers.{i}.weight`` (width, width, 3, 3) and ``layers.{i}.bias`` (width,) — residual layer i
- ``head.weight``/``bias``

``"layers.*" = "depth.constant"`` moves the residual layers between a level with n layers and
one with 2n (fine layers 2i and 2i+1 copy coarse layer i; R averages each pair); every other
tensor has the same shape on all levels and moves with ``identity``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlsgd_dsl import model_factory


class ResidualCNN(nn.Module):
    def __init__(self, layers: int, h: float, in_channels: int, num_classes: int,
                 width: int = 8) -> None:
        super().__init__()
        self.h = float(h)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1)
                                    for _ in range(layers))
        self.head = nn.Linear(width * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = self.stem(x)
        for conv in self.layers:
            z = z + self.h * torch.relu(conv(z))
        return self.head(F.adaptive_avg_pool2d(z, 4).flatten(1))

    def smoothness(self) -> Tensor:
        """Optional: with this method the objective adds ``mlsgd.objective.smoothness`` ×
        this value (thesis 4.1.2: penalise the change of kernels from layer to layer)."""
        terms = [torch.linalg.vector_norm(b.weight - a.weight)
                 for a, b in zip(self.layers, self.layers[1:])]
        return torch.stack(terms).sum() if terms else self.head.weight.new_zeros(())


@model_factory  # only marked callables may be named as `factory` in a hierarchy file
def make(layers: int, h: float, in_channels: int, num_classes: int,
         width: int = 8) -> ResidualCNN:
    """The factory named in hierarchy.toml as ``factory = "nets:make"``."""
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    return ResidualCNN(layers, h, in_channels, num_classes, width)
