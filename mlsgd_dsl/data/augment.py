"""Batch augmentation of the thesis: random horizontal flips and zero-padded random crops.

Runs on every batch, so it is one gather over the whole batch on the batch's device, never a
Python loop over samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def crop_padding(crop: float | int, height: int, width: int) -> tuple[int, int]:
    """Pixels of padding per side: an int is pixels, a float a fraction of the image size.

    The thesis crops by 6.25 %: ``crop = 0.0625`` pads a 32×32 image by 2 pixels.
    """
    if isinstance(crop, bool):
        raise ValueError(f"crop must be a number of pixels or a fraction, got {crop!r}")
    if isinstance(crop, int):
        if crop < 0:
            raise ValueError(f"crop must be >= 0 pixels, got {crop}")
        return crop, crop
    if not 0.0 <= crop <= 0.5:
        raise ValueError(f"crop fraction must be in [0, 0.5], got {crop}")
    return round(crop * height), round(crop * width)


def augment_batch(x: Tensor, *, flip: bool = False, crop: float | int = 0,
                  fill: float | Sequence[float] | Tensor = 0.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """Randomly flip (probability ½ per image) and crop ``(N, C, H, W)`` images; a new tensor.

    Cropping pads every side by :func:`crop_padding` pixels of value ``fill`` and takes a
    random ``H×W`` window per image. ``fill`` is a scalar or one value per channel, in the
    space of ``x``. The thesis fills borders with zeros of the *raw* images; since batches here
    are already normalised, that is ``-mean/std`` per channel (``Splits.black()``), which the
    runner passes. The default 0.0 is the training mean instead (a neutral grey), for callers
    that do not know the statistics.

    Random numbers come from ``generator`` (on its own device; CPU generators work for GPU
    batches), so a seeded generator makes the augmentation reproducible.
    """
    n, c, h, w = x.shape
    ph, pw = crop_padding(crop, h, w)
    if not flip and ph == 0 and pw == 0:
        return x.clone()
    rng_device = generator.device if generator is not None else x.device

    def randint(high: int) -> Tensor:
        return torch.randint(high, (n,), generator=generator, device=rng_device).to(x.device)

    flipped = randint(2).bool() if flip else None
    if ph == 0 and pw == 0:
        return torch.where(flipped.view(n, 1, 1, 1), x.flip(3), x)

    hp, wp = h + 2 * ph, w + 2 * pw
    values = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
    if values.numel() not in (1, c):
        raise ValueError(f"fill has {values.numel()} values for {c} channels")
    padded = values.view(1, -1, 1, 1).expand(n, c, hp, wp).clone()
    padded[:, :, ph:ph + h, pw:pw + w] = x

    # Per-image window offsets; a flip reads the window's columns right to left, so crop and
    # flip are one gather from the padded batch.
    top, left = randint(2 * ph + 1), randint(2 * pw + 1)
    rows = top.view(n, 1) + torch.arange(h, device=x.device)                 # (n, h)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flipped is not None:
        cols = torch.where(flipped.view(n, 1), cols.flip(1), cols)
    cols = cols + left.view(n, 1)                                            # (n, w)
    index = (rows.view(n, h, 1) * wp + cols.view(n, 1, w)).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, hp * wp).gather(2, index).view(n, c, h, w)
