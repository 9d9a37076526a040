"""An embedded, learnable image data set that needs no download.

Class ``c`` is a unique (shape, stripe orientation, stripe frequency) triple: shape ``c % 5``
(disc, square, ring, cross, diamond), orientation ``c % 4`` (0°, 45°, 90°, 135°), frequency
``c // 20``. Since 5 and 4 are coprime, neither the shape nor the stripes alone tell the
class. Every image draws its own position, size, contrast, brightness, stripe phase,
per-channel colour and pixel noise, so the mean pixel says little about the class. Shapes span
about half the image and stripes have a period of at least a quarter of it, so a 2× average-
pooled copy stays recognisable (resolution coarsening is meaningful).

Everything comes from a seeded ``torch.Generator`` and plain float32 tensor ops, so a seed gives
the same images on every run (the uint8 rounding absorbs last-bit differences between CPUs).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..api import DataContext, DataSource, RawData

SHAPES = ["disc", "square", "ring", "cross", "diamond"]
ANGLES = [0.0, 45.0, 90.0, 135.0]
#: Stripe frequencies in cycles per image width; period ≥ size/3.5 survives 2× pooling.
FREQUENCIES = [2.0, 3.5, 1.25, 2.75, 3.0]


class SyntheticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="Seed of the data set itself (independent of the run "
                                           "seed): the same seed gives the same images.")
    train: int = Field(6000, ge=1, le=1_000_000, description="Number of training images.")
    test: int = Field(1000, ge=1, le=1_000_000, description="Number of test images.")
    classes: int = Field(10, ge=2, le=100, description="Number of classes (2..100).")
    channels: int = Field(1, ge=1, le=16, description="Image channels (random colour per "
                                                      "image when more than one).")
    size: int = Field(16, ge=8, le=512, description="Image height and width in pixels.")
    noise: float = Field(0.1, ge=0.0, le=1.0, description="Standard deviation of the pixel "
                                                          "noise (images are in [0, 1]).")


def class_name(c: int) -> str:
    freq = FREQUENCIES[c // 20]
    return f"{SHAPES[c % 5]}/{ANGLES[c % 4]:.0f}deg/{freq:g}cyc"


def _shape_distance(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A distance-like field per image that is < 1 inside its shape (u, v in radius units)."""
    r = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    fields = torch.stack([
        r,                                                     # disc
        torch.maximum(au, av) / 0.8,                           # square
        (r - 0.7).abs() / 0.3,                                 # ring
        torch.minimum(torch.maximum(au / 0.35, av), torch.maximum(av / 0.35, au)),  # cross
        (au + av) / 1.15,                                      # diamond
    ])
    index = kind.view(1, -1, 1, 1).expand(1, *fields.shape[1:])
    return fields.gather(0, index)[0]


def generate(n: int, opts: SyntheticOptions, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, C, S, S)`` uint8 and balanced labels ``(n,)`` int64."""
    g, s = generator, opts.size
    labels = (torch.arange(n) % opts.classes)[torch.randperm(n, generator=g)]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (n,), generator=g)

    radius = uniform(0.28, 0.4) * s
    cx = s / 2 + uniform(-0.12, 0.12) * s                     # position jitter
    cy = s / 2 + uniform(-0.12, 0.12) * s
    angle = torch.tensor(ANGLES)[labels % 4] * (math.pi / 180) + uniform(-0.15, 0.15)
    freq = torch.tensor(FREQUENCIES)[labels // 20] * uniform(0.9, 1.1) / s
    phase = uniform(0.0, 2 * math.pi)
    contrast = uniform(0.45, 1.0)
    background = uniform(0.0, 0.35)

    coords = torch.arange(s, dtype=torch.float32) + 0.5
    x = coords.view(1, 1, s) - cx.view(n, 1, 1)
    y = coords.view(1, s, 1) - cy.view(n, 1, 1)
    dist = _shape_distance(labels % 5, x / radius.view(n, 1, 1), y / radius.view(n, 1, 1))
    # Soft edge about one pixel wide (anti-aliased, so pooling sees a smooth boundary).
    mask = torch.sigmoid((1 - dist) * radius.view(n, 1, 1) * 2.0)
    along = x * torch.cos(angle).view(n, 1, 1) + y * torch.sin(angle).view(n, 1, 1)
    stripes = 0.5 + 0.5 * torch.cos(2 * math.pi * freq.view(n, 1, 1) * along + phase.view(n, 1, 1))
    pattern = mask * (0.25 + 0.75 * stripes)                  # (n, S, S)

    colour = uniform(0.5, 1.0, n, opts.channels) if opts.channels > 1 else torch.ones(n, 1)
    img = (background.view(n, 1, 1, 1)
           + (contrast.view(n, 1) * colour).view(n, -1, 1, 1) * pattern[:, None]
           + opts.noise * torch.randn((n, opts.channels, s, s), generator=g))
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


def load(options: SyntheticOptions, ctx: DataContext) -> RawData:
    # Train and test come from separate streams, so changing ``train`` keeps the test set.
    train_g = torch.Generator().manual_seed(2 * options.seed)
    test_g = torch.Generator().manual_seed(2 * options.seed + 1)
    train_x, train_y = generate(options.train, options, train_g)
    test_x, test_y = generate(options.test, options, test_g)
    return RawData(train_x, train_y, test_x, test_y, num_classes=options.classes,
                   classes=[class_name(c) for c in range(options.classes)])


def shape(options: SyntheticOptions) -> tuple[int, int, int, int]:
    return options.channels, options.size, options.size, options.classes


SYNTHETIC = DataSource(
    name="synthetic", options=SyntheticOptions, load=load, shape=shape,
    description="Embedded synthetic images (shapes x stripe orientation/frequency with random "
                "position, size, contrast and noise); deterministic from a seed, no download.",
)
