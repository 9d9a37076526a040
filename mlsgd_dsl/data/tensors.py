"""A user's own images from one ``.pt`` or ``.npz`` file.

Layout: four arrays ``train_x, train_y, test_x, test_y``. Images are ``(N, C, H, W)``, or
``(N, H, W, C)`` when the last axis is 1 or 3 and the second is not (NHWC, e.g. numpy
exports), or ``(N, H, W)`` for one channel; uint8 (0..255) or float (any range, the
normalisation step rescales). Labels are integers ``0..num_classes-1`` of shape ``(N,)``.

``.pt`` files are read with ``torch.load(weights_only=True)`` (a dict of tensors, no code runs);
``.npz`` files with ``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..api import FILE_PATH, DataContext, DataSource, RawData
from ..errors import DataNotFound

KEYS = ("train_x", "train_y", "test_x", "test_y")


class TensorsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(json_schema_extra=FILE_PATH,
                      description="A .pt (dict of tensors) or .npz file with keys train_x, "
                                  "train_y, test_x, test_y; images NCHW, NHWC or NHW. A "
                                  "relative path is taken from the hierarchy file's folder.")
    num_classes: int | None = Field(None, ge=2, description="Number of classes; default: the "
                                                            "largest label + 1.")


def _file(options: TensorsOptions) -> Path:
    path = Path(options.path).expanduser()
    if not path.is_file():
        raise DataNotFound(f"data file {path} not found (source 'tensors', looked at "
                           f"{path.absolute()}); save a dict with keys {', '.join(KEYS)} with "
                           "torch.save(...) as .pt or numpy.savez(...) as .npz")
    if path.suffix not in (".pt", ".pth", ".npz"):
        raise DataNotFound(f"{path}: unknown file type {path.suffix!r}; use .pt or .npz")
    return path


def read_arrays(path: Path, keys: tuple[str, ...] = KEYS, *,
                mmap: bool = False) -> dict[str, torch.Tensor]:
    """The arrays ``keys`` of the file as tensors (an .npz member is read only when asked;
    ``mmap`` maps a .pt file instead of reading it, where its format allows)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                _require(path, z.files)
                return {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in keys}
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except (OSError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile,
            pickle.UnpicklingError) as exc:
        raise DataNotFound(f"{path}: cannot read ({exc})") from None
    if not isinstance(obj, dict):
        raise DataNotFound(f"{path}: expected a dict with keys {', '.join(KEYS)}, "
                           f"found a {type(obj).__name__}")
    _require(path, map(str, obj))
    return {k: torch.as_tensor(obj[k]) for k in keys}


def _require(path: Path, present: Iterable[str]) -> None:
    names = set(present)
    if not names.issuperset(KEYS):
        raise DataNotFound(f"{path}: expected keys {', '.join(KEYS)}, found "
                           f"{', '.join(sorted(names)) or 'none'}")


def image_shape(path: Path) -> tuple[int, ...]:
    """Shape of ``train_x`` without reading its values (npy header, memory-mapped .pt)."""
    if path.suffix != ".npz":
        return tuple(read_arrays(path, ("train_x",), mmap=True)["train_x"].shape)
    try:
        with zipfile.ZipFile(path) as zf, zf.open("train_x.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            return tuple(read(f)[0])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataNotFound(f"{path}: cannot read train_x ({exc})") from None


def to_nchw(x: torch.Tensor, where: str) -> torch.Tensor:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataNotFound(f"{where}: images must be (N,C,H,W), (N,H,W,C) or (N,H,W), "
                           f"got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.permute(0, 3, 1, 2).contiguous()
    return x


def _check(arrays: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for split in ("train", "test"):
        x = to_nchw(arrays[f"{split}_x"], f"{path}: {split}_x")
        y = arrays[f"{split}_y"]
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise DataNotFound(f"{path}: {split}_x is {x.dtype}; use uint8 or float")
        if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise DataNotFound(f"{path}: {split}_y must be integer labels of shape (N,), got "
                               f"{y.dtype} {tuple(y.shape)}")
        if len(y) != len(x):
            raise DataNotFound(f"{path}: {len(x)} {split} images but {len(y)} labels")
        out[f"{split}_x"], out[f"{split}_y"] = x, y.long()
    if out["train_x"].shape[1:] != out["test_x"].shape[1:]:
        raise DataNotFound(f"{path}: train images {tuple(out['train_x'].shape[1:])} and test "
                           f"images {tuple(out['test_x'].shape[1:])} differ in shape")
    return out


def _num_classes(options: TensorsOptions, arrays: dict[str, torch.Tensor], path: Path) -> int:
    labels = torch.cat([arrays["train_y"].long(), arrays["test_y"].long()])
    lo, hi = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
    n = options.num_classes if options.num_classes is not None else hi + 1
    if lo < 0 or hi >= n:
        raise DataNotFound(f"{path}: labels range over {lo}..{hi}, expected 0..{n - 1}")
    return n


def load(options: TensorsOptions, ctx: DataContext) -> RawData:
    path = _file(options)
    arrays = _check(read_arrays(path), path)
    return RawData(**arrays, num_classes=_num_classes(options, arrays, path))


def shape(options: TensorsOptions) -> tuple[int, int, int, int]:
    # Reads the labels (small) but, for .npz, not the images.
    path = _file(options)
    # A meta tensor has the shape and no storage: a header claiming 10**9 images costs nothing.
    c, h, w = to_nchw(torch.empty(image_shape(path), dtype=torch.uint8, device="meta"),
                      f"{path}: train_x").shape[1:]
    labels = read_arrays(path, ("train_y", "test_y"))
    return int(c), int(h), int(w), _num_classes(options, labels, path)


TENSORS = DataSource(
    name="tensors", options=TensorsOptions, load=load, shape=shape,
    description="Your own images: a .pt or .npz file with train_x, train_y, test_x, test_y.",
)
