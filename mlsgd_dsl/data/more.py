"""More of torchvision's data sets, read offline with the restricted readers of
:mod:`~mlsgd_dsl.data.cifar` (pickles that may hold arrays only) and :mod:`~mlsgd_dsl.data.idx`.

* ``cifar100``: ``ROOT/cifar-100-python/{train,test,meta}`` (the official python version, what
  torchvision unpacks). Each file is a pickled dict with ``b"data"`` uint8 (N, 3072) in CHW
  order, ``b"fine_labels"`` and ``b"coarse_labels"``; ``meta`` names the classes
  (``b"fine_label_names"``, ``b"coarse_label_names"``). ``labels = "coarse"`` trains on the 20
  super-classes.
* ``kmnist``: Kuzushiji-MNIST, the four MNIST-named IDX files (torchvision's ``KMNIST/raw``).
* ``emnist``: ``emnist-SPLIT-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]`` (the official
  ``gzip/`` folder, or torchvision's ``EMNIST/raw``). The files store every image transposed;
  it is transposed back so letters stand upright. ``letters`` labels run 1..26 (class 0,
  ``N/A``, is empty, as in torchvision).

The number of classes comes from the data (the class names a set ships, checked against its
labels), and the model's output layer follows it.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..api import DataContext, DataSource, RawData
from ..errors import DataNotFound
from .cifar import read_pickle
from .idx import DIGIT_CLASSES, IMAGES_MAGIC, LABELS_MAGIC, idx_file, make_source, read_idx
from .locate import USER_CACHE, dedupe, default_roots, find_first, not_found

# --------------------------------------------------------------------------- CIFAR-100

CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = ("train", "test")
CIFAR100_HOW = ("Set download = true in [data.options] to fetch it (about 170 MB), or put the "
                "official python version in ROOT/cifar-100-python/train, test, meta and set "
                "root = \"ROOT\" in [data.options] (or $MLSGD_DATA/cifar100).")


class Cifar100Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(
        None, description="Folder containing cifar-100-python/. Default: search "
                          "$MLSGD_DATA/cifar100, ~/.cache/mlsgd-dsl/cifar100, ./data/cifar100, "
                          "./data.")
    labels: Literal["fine", "coarse"] = Field(
        "fine", description="fine: the 100 classes; coarse: the 20 super-classes.")
    download: bool = Field(False, description="Download CIFAR-100 into root (default "
                                              "~/.cache/mlsgd-dsl/cifar100) with torchvision "
                                              "when it is not found. Off unless you allow it.")


def _cifar100_missing(root: Path) -> list[str]:
    return [f"{CIFAR100_FOLDER}/{n}" for n in CIFAR100_FILES
            if not (root / CIFAR100_FOLDER / n).is_file()]


def _cifar100_candidates(options: Cifar100Options, ctx: DataContext | None) -> list[Path]:
    if options.root is not None:
        root = Path(options.root).expanduser()
        extra = [root.parent] if root.name == CIFAR100_FOLDER else []
        return dedupe([root, root / "cifar100", *extra])
    return default_roots("cifar100", cache_dir=ctx.cache_dir if ctx else None) + [Path("data")]


def _read_pickle(path: Path) -> dict:
    try:
        return read_pickle(path)
    except DataNotFound as exc:  # the shared reader speaks of CIFAR-10
        raise DataNotFound(exc.message.replace("CIFAR-10 batch", "CIFAR-100 file")) from None


def _cifar100_file(path: Path, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _read_pickle(path)
    key = f"{labels}_labels".encode()
    data, y = batch.get(b"data"), batch.get(key)
    if data is None or y is None:
        raise DataNotFound(f"{path}: not a CIFAR-100 file (no b'data'/{key!r} keys)")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataNotFound(f"{path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if len(y) != len(data):
        raise DataNotFound(f"{path}: {len(data)} images but {len(y)} labels")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.as_tensor(np.asarray(y, dtype=np.int64))


def _cifar100_classes(root: Path | None, labels: str) -> list[str]:
    """Class names from ``meta`` (the data's own), else the official counts unnamed."""
    meta = root / CIFAR100_FOLDER / "meta" if root is not None else None
    if meta is not None and meta.is_file():
        names = _read_pickle(meta).get(f"{labels}_label_names".encode())
        if names:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(i) for i in range(100 if labels == "fine" else 20)]


def _cifar100_root(options: Cifar100Options, ctx: DataContext | None,
                   download: bool) -> Path | None:
    root, notes = find_first(_cifar100_candidates(options, ctx), _cifar100_missing)
    if root is None and download and options.download:
        from torchvision.datasets import CIFAR100  # only when the user allows a download

        root = Path(options.root).expanduser() if options.root else \
            USER_CACHE.expanduser() / "cifar100"
        root.mkdir(parents=True, exist_ok=True)
        CIFAR100(str(root), train=True, download=True)
    if root is None and download:
        raise not_found("cifar100", notes, CIFAR100_HOW)
    return root


def _check_labels(path: Path, y: torch.Tensor, classes: list[str]) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
        raise DataNotFound(f"{path}: labels {int(y.min())}..{int(y.max())} do not fit the "
                           f"{len(classes)} classes the data set names")


def load_cifar100(options: Cifar100Options, ctx: DataContext) -> RawData:
    root = _cifar100_root(options, ctx, download=True)
    classes = _cifar100_classes(root, options.labels)
    folder = root / CIFAR100_FOLDER
    train_x, train_y = _cifar100_file(folder / "train", options.labels)
    test_x, test_y = _cifar100_file(folder / "test", options.labels)
    _check_labels(folder / "train", train_y, classes)
    _check_labels(folder / "test", test_y, classes)
    return RawData(train_x, train_y, test_x, test_y, num_classes=len(classes), classes=classes)


def shape_cifar100(options: Cifar100Options) -> tuple[int, int, int, int]:
    root = _cifar100_root(options, None, download=False)
    return (3, 32, 32, len(_cifar100_classes(root, options.labels)))


CIFAR100 = DataSource(
    name="cifar100", options=Cifar100Options, load=load_cifar100, shape=shape_cifar100,
    description="CIFAR-100, 50 000 + 10 000 colour 32x32 images, 100 classes (or 20 "
                "super-classes), from the official python files; downloaded only with "
                "download = true.",
)

# --------------------------------------------------------------------------- KMNIST

KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]

KMNIST = make_source(
    "kmnist", "KMNIST", [], KMNIST_CLASSES,
    how="Put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz of Kuzushiji-MNIST) in a folder "
        "and set root = \"FOLDER\" in [data.options] (or $MLSGD_DATA/kmnist); a torchvision "
        "download (ROOT/KMNIST/raw) works too.",
    description="Kuzushiji-MNIST, 60 000 + 10 000 grey 28x28 images of cursive Japanese "
                "characters, 10 classes, read from local IDX files.",
)

# --------------------------------------------------------------------------- EMNIST

_UPPER, _LOWER = list(string.ascii_uppercase), list(string.ascii_lowercase)
_MERGED = DIGIT_CLASSES + _UPPER + list("abdefghnqrt")
EMNIST_CLASSES: dict[str, list[str]] = {
    "byclass": DIGIT_CLASSES + _UPPER + _LOWER,
    "bymerge": _MERGED,
    "balanced": _MERGED,
    "letters": ["N/A", *_LOWER],
    "digits": DIGIT_CLASSES,
    "mnist": DIGIT_CLASSES,
}
EMNIST_HOW = ("Unpack the official EMNIST archive (gzip.zip, with emnist-SPLIT-train-images-"
              "idx3-ubyte.gz etc.) into a folder and set root = \"FOLDER\" in [data.options] "
              "(or $MLSGD_DATA/emnist); a torchvision download (ROOT/EMNIST/raw) works too.")


class EmnistOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(
        None, description="Folder with the emnist-SPLIT-*-ubyte[.gz] files (its gzip/ "
                          "sub-folder or a torchvision root with EMNIST/raw also work). "
                          "Default: search the usual places.")
    split: Literal["byclass", "bymerge", "balanced", "letters", "digits", "mnist"] = Field(
        "balanced", description="Which EMNIST split: byclass (62 classes), bymerge and "
                                "balanced (47), letters (26, labels 1..26), digits and mnist "
                                "(10).")


def _emnist_stems(split: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {f"emnist-{split}-{part}-{kind}": (magic, dims)
            for part in ("train", "test")
            for kind, magic, dims in (("images-idx3-ubyte", IMAGES_MAGIC, (28, 28)),
                                      ("labels-idx1-ubyte", LABELS_MAGIC, ()))}


def _emnist_candidates(options: EmnistOptions, ctx: DataContext | None) -> list[Path]:
    if options.root is not None:
        root = Path(options.root).expanduser()
        return dedupe([root, root / "gzip", root / "emnist", root / "EMNIST" / "raw"])
    cache = ctx.cache_dir if ctx else None
    return default_roots("emnist", "EMNIST/raw", "emnist/gzip", cache_dir=cache)


def load_emnist(options: EmnistOptions, ctx: DataContext) -> RawData:
    stems = _emnist_stems(options.split)

    def missing(folder: Path) -> list[str]:
        return [s + "[.gz]" for s in stems if idx_file(folder, s) is None]

    folder, notes = find_first(_emnist_candidates(options, ctx), missing)
    if folder is None:
        raise not_found("emnist", notes, EMNIST_HOW)
    arrays = {}
    for stem, (magic, dims) in stems.items():
        path = idx_file(folder, stem)
        arrays[stem] = (path, read_idx(path, magic, dims))
    classes = EMNIST_CLASSES[options.split]
    out = []
    for part in ("train", "test"):
        (xp, x), (yp, y) = (arrays[f"emnist-{options.split}-{part}-{k}"]
                            for k in ("images-idx3-ubyte", "labels-idx1-ubyte"))
        if len(x) != len(y):
            raise DataNotFound(f"{xp}: {len(x)} images but {yp.name} has {len(y)} labels")
        y = y.long()
        _check_labels(yp, y, classes)
        out += [x.transpose(1, 2).contiguous()[:, None], y]  # stored transposed
    return RawData(*out, num_classes=len(classes), classes=list(classes))


def shape_emnist(options: EmnistOptions) -> tuple[int, int, int, int]:
    return (1, 28, 28, len(EMNIST_CLASSES[options.split]))


EMNIST = DataSource(
    name="emnist", options=EmnistOptions, load=load_emnist, shape=shape_emnist,
    description="EMNIST handwritten digits and letters, grey 28x28 images, 10 to 62 classes "
                "by split, read from local IDX files.",
)
