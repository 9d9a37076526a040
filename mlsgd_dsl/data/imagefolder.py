"""A user's own images in the ``ImageFolder`` layout: one sub-folder per class.

Two layouts are recognised::

    ROOT/CLASS/*.png ...                      one folder, split into train/test by a seeded
                                              fraction (``test_fraction``)
    ROOT/train/CLASS/... and ROOT/test/CLASS/...  separate train and test folders

Every image Pillow reads is accepted (files whose extension Pillow does not know are skipped,
so a README or ``.DS_Store`` does no harm). Each image is converted to the channel count of
the set (grey = 1, colour = 3; an alpha channel is dropped), resized so that it covers the
declared ``size`` and centre-cropped to it (``fit = "crop"``, torchvision's
``Resize`` + ``CenterCrop``) or stretched to it (``fit = "stretch"``), and stored as uint8.
The decoded set is cached as one tensor file keyed by the folder's content (every image's
relative path, byte size and modification time, plus the decoding options), so only the first
run decodes (with a progress bar); editing, adding or removing an image decodes again.

Problems are found before training and reported as one line naming the file: an image Pillow
cannot read, a class folder without images, images with different channel counts (set
``channels`` to convert them all).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..api import DataContext, DataSource, RawData
from ..errors import DataNotFound
from .locate import USER_CACHE

#: Pillow modes without colour; everything else (RGB, RGBA, P, CMYK, YCbCr, ...) is colour.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
CACHE_FORMAT = 1


class ImageFolderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="Folder with one sub-folder per class (or train/ and test/ "
                                  "folders that each hold one sub-folder per class).")
    size: int | tuple[int, int] = Field(
        description="Size every image is brought to: N (N x N) or [HEIGHT, WIDTH].")
    fit: Literal["crop", "stretch"] = Field(
        "crop", description="crop: resize to cover the size, keep the aspect ratio, cut the "
                            "centre; stretch: resize to the size exactly.")
    channels: Literal[1, 3] | None = Field(
        None, description="Convert every image to 1 (grey) or 3 (colour) channels. Default: "
                          "the images' own count, which must then be the same for all.")
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of the images held out as the test split when "
                                         "ROOT has no train/ and test/ folders (seeded by "
                                         "data.seed, the same share of every class).")
    cache_dir: str | None = Field(
        None, description="Where the decoded set is cached. Default ~/.cache/mlsgd-dsl/"
                          "imagefolder.")
    cache: bool = Field(True, description="Cache the decoded images (false: decode every run).")

    @field_validator("size")
    @classmethod
    def _positive(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        sizes = (value,) if isinstance(value, int) else value
        if any(s < 1 or s > 4096 for s in sizes):
            raise ValueError(f"sizes must be between 1 and 4096 pixels, got {value}")
        return value

    @property
    def hw(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)


@dataclass(frozen=True)
class Listing:
    """The image files of a data set, by split and class (sorted, so the order is stable)."""

    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]] | None  # None: one folder, split by test_fraction
    root: Path


def _extensions() -> frozenset[str]:
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _class_files(folder: Path, extensions: frozenset[str]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[sub.name] = sorted(p for p in sub.rglob("*") if p.is_file()
                               and not p.name.startswith(".")
                               and p.suffix.lower() in extensions)
    return out


def list_images(options: ImageFolderOptions) -> Listing:
    root = Path(options.root).expanduser()
    if not root.is_dir():
        raise DataNotFound(f"{root}: no such folder (data.options.root of the imagefolder "
                           "source must be a folder with one sub-folder per class)")
    ext = _extensions()
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train = _class_files(root / "train" if split else root, ext)
    if not train:
        raise DataNotFound(f"{root if not split else root / 'train'}: no class folders (expected "
                           "one sub-folder per class holding its images)")
    for name, files in train.items():
        if not files:
            folder = (root / "train" if split else root) / name
            raise DataNotFound(f"{folder}: class {name!r} has no images (Pillow-readable files)")
    classes = list(train)
    if len(classes) < 2:
        raise DataNotFound(f"{root}: only one class folder ({classes[0]!r}); a classifier "
                           "needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    test = None
    if split:
        test_files = _class_files(root / "test", ext)
        extra = [c for c in test_files if c not in index]
        if extra:
            raise DataNotFound(f"{root / 'test' / extra[0]}: class {extra[0]!r} is not among "
                               f"the training classes ({', '.join(classes)})")
        test = [(p, index[c]) for c, files in test_files.items() for p in files]
        if not test:
            raise DataNotFound(f"{root / 'test'}: no images")
    return Listing(classes=classes, root=root, test=test,
                   train=[(p, index[c]) for c, files in train.items() for p in files])


def _channels_of(mode: str) -> int:
    return 1 if mode in GREY_MODES else 3


def decode_image(path: Path, hw: tuple[int, int], fit: str, channels: int) -> np.ndarray:
    """One image as uint8 ``(C, H, W)``: converted to ``channels``, resized, cropped.

    The same function prepares images for a trained model (``docs/handover.md``).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if channels == 1:
                img = img.convert("L")
            else:
                img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") \
                    else img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataNotFound(f"{path}: cannot read image ({exc})") from None
    height, width = hw
    if fit == "stretch":
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    else:
        scale = max(height / img.height, width / img.width)
        new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        if new != img.size:
            img = img.resize(new, Image.Resampling.BILINEAR)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    array = np.asarray(img, dtype=np.uint8)
    chw = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.array(chw, copy=True)  # Pillow's buffer is read-only; callers may write


def _channel_count(files: Sequence[Path]) -> int:
    """The images' channel count; images that disagree are an error naming one of each."""
    from PIL import Image, UnidentifiedImageError

    first: tuple[Path, int] | None = None
    for path in files:
        try:
            with Image.open(path) as img:  # reads the header only
                count = _channels_of(img.mode)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataNotFound(f"{path}: cannot read image ({exc})") from None
        if first is None:
            first = (path, count)
        elif count != first[1]:
            raise DataNotFound(
                f"{path}: {count} channel(s) ({'grey' if count == 1 else 'colour'}) but "
                f"{first[0]} has {first[1]}; set channels = 1 or 3 in [data.options] to "
                "convert every image")
    return first[1] if first else 3


def _cache_key(listing: Listing, options: ImageFolderOptions) -> str:
    digest = hashlib.sha256()
    digest.update(repr((CACHE_FORMAT, options.hw, options.fit, options.channels,
                        listing.classes)).encode())
    for part in (listing.train, listing.test or []):
        digest.update(b"|split|")
        for path, label in part:
            stat = path.stat()
            digest.update(f"{path.relative_to(listing.root)}\0{label}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _decode_all(files: Sequence[Path], options: ImageFolderOptions, channels: int,
                label: str) -> torch.Tensor:
    from tqdm.auto import tqdm

    height, width = options.hw
    out = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, path in enumerate(tqdm(files, desc=f"decoding {label}", unit="img", leave=False,
                                  file=sys.stderr, disable=len(files) < 50)):
        out[i] = decode_image(path, options.hw, options.fit, channels)
    return torch.from_numpy(out)


def _cache_path(options: ImageFolderOptions, key: str) -> Path:
    base = Path(options.cache_dir).expanduser() if options.cache_dir else \
        USER_CACHE.expanduser() / "imagefolder"
    return base / f"{key}.pt"


def _read_cache(path: Path) -> dict | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is decoded again, never an error
        return None
    return data if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache folder costs time, not the run
        print(f"mlsgd-dsl: warning: cannot cache decoded images in {path.parent} ({exc})",
              file=sys.stderr)


def _split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Train and test indices: ``fraction`` of every class (at least one image) to test."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load(options: ImageFolderOptions, ctx: DataContext) -> RawData:
    listing = list_images(options)
    files = [p for p, _ in listing.train] + [p for p, _ in listing.test or []]
    cache = _cache_path(options, _cache_key(listing, options)) if options.cache else None
    data = _read_cache(cache) if cache is not None and cache.is_file() else None
    if data is None:
        channels = options.channels or _channel_count(files)
        data = {"format": CACHE_FORMAT,
                "train_x": _decode_all([p for p, _ in listing.train], options, channels,
                                       "train"),
                "train_y": torch.tensor([c for _, c in listing.train], dtype=torch.int64)}
        if listing.test is not None:
            data["test_x"] = _decode_all([p for p, _ in listing.test], options, channels,
                                         "test")
            data["test_y"] = torch.tensor([c for _, c in listing.test], dtype=torch.int64)
        if cache is not None:
            _write_cache(cache, data)
    x, y = data["train_x"], data["train_y"]
    if "test_x" in data:
        test_x, test_y = data["test_x"], data["test_y"]
    else:
        train_idx, test_idx = _split(y, options.test_fraction, ctx.seed)
        x, y, test_x, test_y = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    return RawData(train_x=x, train_y=y, test_x=test_x, test_y=test_y,
                   num_classes=len(listing.classes), classes=list(listing.classes))


def shape(options: ImageFolderOptions) -> tuple[int, int, int, int]:
    listing = list_images(options)
    first = listing.train[0][0]
    channels = options.channels or _channel_count([first])
    return (channels, *options.hw, len(listing.classes))


IMAGEFOLDER = DataSource(
    name="imagefolder", options=ImageFolderOptions, load=load, shape=shape,
    description="Your own images: one sub-folder per class (or train/ and test/ folders), any "
                "format Pillow reads, brought to a declared size; decoded once and cached.",
)
