"""Raw data → seeded train/validation/test splits, normalised per channel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..api import Coarsening, RawData
from .coarsen import coarsen


@dataclass
class Splits:
    """Float32 NCHW images (normalised) and int64 labels of the three splits.

    ``mean`` and ``std`` are the per-channel statistics of the training split on the [0, 1]
    scale (uint8 images are divided by 255 first); ``x_normalised = (x - mean) / std``.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    classes: list[str] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def black(self) -> Tensor:
        """Per-channel value ``(C,)`` of a raw zero (black) pixel in the normalised space.

        Pass it as ``fill`` to :func:`~mlsgd_dsl.data.augment.augment_batch` for the thesis'
        zero-filled crop borders. Average pooling keeps it, so it holds on coarse levels too.
        """
        mean = torch.tensor(self.mean, dtype=self.train_x.dtype, device=self.train_x.device)
        std = torch.tensor(self.std, dtype=self.train_x.dtype, device=self.train_x.device)
        return -mean / std

    def _map_x(self, fn: Any) -> Splits:
        return replace(self, train_x=fn(self.train_x), val_x=fn(self.val_x),
                       test_x=fn(self.test_x))

    def to(self, device: torch.device | str) -> Splits:
        """A copy with every tensor on ``device``."""
        moved = self._map_x(lambda x: x.to(device))
        return replace(moved, train_y=self.train_y.to(device), val_y=self.val_y.to(device),
                       test_y=self.test_y.to(device))

    def coarsened(self, steps: Sequence[tuple[Coarsening, Any]]) -> Splits:
        """A copy with the images of all three splits coarsened by ``steps`` (done once)."""
        if not steps:
            return self
        return self._map_x(lambda x: coarsen(x, steps))


def _count(validation: int | float, n: int) -> int:
    if isinstance(validation, bool):
        raise ValueError(f"validation must be a count or a fraction, got {validation!r}")
    if isinstance(validation, float):
        if not 0.0 <= validation < 1.0:
            raise ValueError(f"validation fraction must be in [0, 1), got {validation}")
        count = round(validation * n)
    else:
        count = int(validation)
    if count < 0:
        raise ValueError(f"validation size must be >= 0, got {count}")
    if count >= n:
        raise ValueError(f"validation size {count} leaves no training images (the training set "
                         f"has {n}); use a smaller count or a fraction below 1")
    return count


def _subset(n: int, size: int | None, what: str, g: torch.Generator) -> Tensor:
    """Sorted random indices of ``size`` of ``n`` items (all when ``size`` is None)."""
    if size is None:
        return torch.arange(n)
    if size < 1:
        raise ValueError(f"{what} must be at least 1, got {size}")
    if size > n:
        raise ValueError(f"{what} {size} is larger than the {n} images available")
    return torch.randperm(n, generator=g)[:size].sort().values


def to_unit_float(x: Tensor) -> Tensor:
    """uint8 → float32 in [0, 1]; float images keep their values (as float32)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255)
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or float, got {x.dtype}")
    return x.to(torch.float32)


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``(N, C, H, W)`` images."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    std = var.sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant channel stays as is
    return tuple(mean.tolist()), tuple(std.tolist())


def prepare(raw: RawData, *, validation: int | float, subset: int | None = None,
            test_subset: int | None = None, seed: int, normalize: bool = True) -> Splits:
    """Split, subsample and normalise ``raw``; the same ``seed`` gives the same splits.

    ``validation`` images (a count, or a fraction of the training set) are held out of the
    training set by a seeded permutation; ``subset``/``test_subset`` then keep that many
    training/test images (seeded too). Normalisation statistics come from the training split
    only and are applied to all three splits.
    """
    n = len(raw.train_x)
    if len(raw.train_y) != n or len(raw.test_y) != len(raw.test_x):
        raise ValueError("images and labels differ in number")
    n_val = _count(validation, n)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    train_idx = train_idx[_subset(len(train_idx), subset, "subset", g)]
    test_idx = _subset(len(raw.test_x), test_subset, "test_subset", g)

    train_x = to_unit_float(raw.train_x[train_idx])
    val_x = to_unit_float(raw.train_x[val_idx])
    test_x = to_unit_float(raw.test_x[test_idx])
    c = train_x.shape[1]
    mean, std = channel_stats(train_x) if normalize else ((0.0,) * c, (1.0,) * c)
    if normalize:
        m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
        for x in (train_x, val_x, test_x):  # in place: these are fresh copies already
            x.sub_(m).div_(s)
    return Splits(
        train_x=train_x, train_y=raw.train_y[train_idx].long(),
        val_x=val_x, val_y=raw.train_y[val_idx].long(),
        test_x=test_x, test_y=raw.test_y[test_idx].long(),
        num_classes=raw.num_classes,
        classes=list(raw.classes) if raw.classes is not None else None,
        mean=mean, std=std,
    )
