"""Checks of what a data source returned, before any training: one line instead of an
``IndexError`` in the middle of a run.

The built-in sources check their files themselves and name the file; this is the net under
every source (plugins included): tensors of the right kinds, as many labels as images, one
image shape shared by both splits and equal to what ``shape()`` promised (the networks were
built for it), and labels in ``0 .. num_classes - 1``.
"""

from __future__ import annotations

import torch

from ..api import RawData
from ..errors import DataNotFound


def check_raw(raw: RawData, promised: tuple[int, int, int, int], where: str) -> None:
    """Raise :class:`DataNotFound` (``where: what is wrong``) if ``raw`` cannot be trained on.

    ``promised`` is ``(C, H, W, num_classes)`` from the source's ``shape()``.
    """
    if not isinstance(raw, RawData):
        raise DataNotFound(f"{where}: load() returned a {type(raw).__name__}, not RawData")
    for split in ("train", "test"):
        x, y = getattr(raw, f"{split}_x"), getattr(raw, f"{split}_y")
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataNotFound(f"{where}: {split} images and labels must be tensors")
        if x.ndim != 4:
            raise DataNotFound(f"{where}: {split} images must be (N, C, H, W), got shape "
                               f"{tuple(x.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise DataNotFound(f"{where}: {split} images are {x.dtype}; expected uint8 or "
                               "float")
        if x.is_floating_point() and len(x) and not bool(torch.isfinite(x).all()):
            raise DataNotFound(f"{where}: {split} images hold NaN or infinite values")
        if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DataNotFound(f"{where}: {split} labels must be integers of shape (N,), got "
                               f"{y.dtype} {tuple(y.shape)}")
        if len(x) != len(y):
            raise DataNotFound(f"{where}: {len(x)} {split} images but {len(y)} labels")
        if len(x) == 0:
            raise DataNotFound(f"{where}: the {split} split has no images")
        c, h, w, classes = promised
        if tuple(x.shape[1:]) != (c, h, w):
            raise DataNotFound(f"{where}: {split} images are {tuple(x.shape[1:])}, but the "
                               f"source announced ({c}, {h}, {w}) and the networks are built "
                               "for that")
        lo, hi = int(y.min()), int(y.max())
        n = int(raw.num_classes)
        if n != classes:
            raise DataNotFound(f"{where}: {n} classes loaded, {classes} announced")
        if lo < 0 or hi >= n:
            raise DataNotFound(f"{where}: {split} labels range over {lo}..{hi}, expected "
                               f"0..{n - 1} ({n} classes)")
