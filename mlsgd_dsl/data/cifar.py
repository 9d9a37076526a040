"""CIFAR-10 from the official python layout ``ROOT/cifar-10-batches-py``.

Each batch file is a pickled dict ``{b"data": uint8 (N, 3072) in CHW order, b"labels": list,
...}``; ``batches.meta`` holds ``b"label_names"``. Downloading happens only when the user sets
``download = true`` (torchvision does it and checks the archive's MD5).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..api import FILE_PATH, DataContext, DataSource, RawData
from ..errors import DataNotFound
from .locate import USER_CACHE, dedupe, default_roots, find_first, not_found

FOLDER = "cifar-10-batches-py"
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
TEST = "test_batch"
META = "batches.meta"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
HOW = ("Set download = true in [data.options] to fetch it (about 170 MB), or put the "
       "official python version in the expected layout ROOT/cifar-10-batches-py/"
       "data_batch_1..5, test_batch, batches.meta and set root = \"ROOT\" in [data.options] "
       "(or $MLSGD_DATA/cifar10).")


class CifarOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(
        None, json_schema_extra=FILE_PATH,
        description="Folder containing cifar-10-batches-py/ (a relative path is taken from the "
                    "hierarchy file's folder). Default: search $MLSGD_DATA/cifar10, "
                    "~/.cache/mlsgd-dsl/cifar10, ./data/cifar10, ./data.",
    )
    download: bool = Field(
        False,
        description="Download CIFAR-10 into root (default ~/.cache/mlsgd-dsl/cifar10) with "
                    "torchvision when it is not found. Off unless you allow it.",
    )


# Pickle can run arbitrary code while loading. The official files only need numpy's array
# reconstruction, so everything else is refused; still, load only files the user pointed at.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
}


class _Refused(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _Refused(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only "
                           "arrays, lists and bytes")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.split(".", 2)[2]  # numpy 2 renamed numpy.core
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except _Refused as exc:
        raise DataNotFound(f"{path}: {exc}") from None
    except Exception as exc:  # any damage in the file is the user's to fix, not a traceback
        raise DataNotFound(f"{path}: cannot read CIFAR-10 batch ({exc}); "
                           "the file looks damaged, download it again") from None
    if not isinstance(obj, dict):
        raise DataNotFound(f"{path}: not a CIFAR-10 batch (a {type(obj).__name__}, not a dict)")
    return obj


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = read_pickle(path)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if data is None or labels is None:
        raise DataNotFound(f"{path}: not a CIFAR-10 batch (no b'data'/b'labels' keys)")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataNotFound(f"{path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if len(labels) != len(data):
        raise DataNotFound(f"{path}: {len(data)} images but {len(labels)} labels")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    try:
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataNotFound(f"{path}: labels are not integers ({exc})") from None
    if y.ndim != 1 or (len(y) and (int(y.min()) < 0 or int(y.max()) >= 10)):
        raise DataNotFound(f"{path}: labels must be 0..9 of shape (N,), found "
                           f"{_label_range(y)}")
    return x, y


def _label_range(y: torch.Tensor) -> str:
    if y.ndim != 1:
        return f"shape {tuple(y.shape)}"
    return f"{int(y.min())}..{int(y.max())}"


def missing_files(root: Path) -> list[str]:
    return [f"{FOLDER}/{n}" for n in [*TRAIN, TEST] if not (root / FOLDER / n).is_file()]


def candidates(options: CifarOptions, ctx: DataContext | None) -> list[Path]:
    if options.root is not None:
        root = Path(options.root).expanduser()
        # Accept the batches folder itself too: the user may point at what they see.
        extra = [root.parent] if root.name == FOLDER else []
        return dedupe([root, root / "cifar10", *extra])
    return default_roots("cifar10", cache_dir=ctx.cache_dir if ctx else None) + [Path("data")]


def download(options: CifarOptions) -> Path:
    from torchvision.datasets import CIFAR10  # imported only when the user allows a download

    root = Path(options.root).expanduser() if options.root else USER_CACHE.expanduser() / "cifar10"
    root.mkdir(parents=True, exist_ok=True)
    CIFAR10(str(root), train=True, download=True)
    return root


def load(options: CifarOptions, ctx: DataContext) -> RawData:
    root, notes = find_first(candidates(options, ctx), missing_files)
    if root is None and options.download:
        root = download(options)
    if root is None:
        raise not_found("cifar10", notes, HOW)
    parts = [read_batch(root / FOLDER / n) for n in TRAIN]
    test_x, test_y = read_batch(root / FOLDER / TEST)
    classes = list(CLASSES)
    if (root / FOLDER / META).is_file():
        names = read_pickle(root / FOLDER / META).get(b"label_names")
        if names and len(names) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return RawData(train_x=torch.cat([p[0] for p in parts]),
                   train_y=torch.cat([p[1] for p in parts]),
                   test_x=test_x, test_y=test_y, num_classes=10, classes=classes)


def shape(options: CifarOptions) -> tuple[int, int, int, int]:
    return (3, 32, 32, 10)


CIFAR10 = DataSource(
    name="cifar10", options=CifarOptions, load=load, shape=shape,
    description="CIFAR-10, 50 000 + 10 000 colour 32x32 images, 10 classes (the thesis' data "
                "set), from the official python batches; downloaded only with download = true.",
)
