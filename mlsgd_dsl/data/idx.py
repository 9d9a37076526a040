"""MNIST and Fashion-MNIST from the official IDX files (gzipped or not).

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header ``0x00 0x00 TYPE NDIM``
(TYPE 0x08 = unsigned byte), NDIM big-endian int32 sizes, then the raw bytes. Images are
``0x00000803`` (N, 28, 28), labels ``0x00000801`` (N,).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..api import FILE_PATH, DataContext, DataSource, RawData
from ..errors import DataNotFound
from .locate import dedupe, default_roots, find_first, not_found

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
CLASSES = 10

#: file stem → (magic, expected trailing dims); N is checked across images and labels.
FILES = {
    "train-images-idx3-ubyte": (IMAGES_MAGIC, (28, 28)),
    "train-labels-idx1-ubyte": (LABELS_MAGIC, ()),
    "t10k-images-idx3-ubyte": (IMAGES_MAGIC, (28, 28)),
    "t10k-labels-idx1-ubyte": (LABELS_MAGIC, ()),
}

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]


class IdxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(
        None, json_schema_extra=FILE_PATH,
        description="Folder holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                    "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (a torchvision "
                    "root with <Name>/raw inside also works); a relative path is taken from the "
                    "hierarchy file's folder. Default: search the usual places.",
    )


def idx_file(folder: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``folder`` (the uncompressed file wins)."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def missing_files(folder: Path) -> list[str]:
    return [stem + "[.gz]" for stem in FILES if idx_file(folder, stem) is None]


def read_idx(path: Path, magic: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Parse one IDX file into a uint8 tensor; a damaged file is a readable DataNotFound."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataNotFound(f"{path}: cannot read ({exc}); the file looks damaged, "
                           "download it again") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataNotFound(f"{path}: truncated IDX file ({len(raw)} bytes); download it again")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataNotFound(f"{path}: not an IDX file of this kind (magic 0x{got:08x}, expected "
                           f"0x{magic:08x}); download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if shape[1:] != dims:
        raise DataNotFound(f"{path}: unexpected sizes {shape}, expected (N, "
                           f"{', '.join(map(str, dims))}); is it the right data set?")
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise DataNotFound(f"{path}: {len(raw) - header} data bytes for sizes {shape} "
                           f"(expected {size}); the file is truncated or damaged")
    data = np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(shape)
    return torch.from_numpy(data.copy())


def read_folder(folder: Path) -> tuple[torch.Tensor, ...]:
    """The four tensors ``train_x (N,1,28,28), train_y, test_x, test_y`` of one IDX folder."""
    files = [idx_file(folder, stem) for stem in FILES]
    out = [read_idx(path, *spec) for path, spec in zip(files, FILES.values())]
    for x, y, split in ((out[0], out[1], "train"), (out[2], out[3], "t10k")):
        if len(x) != len(y):
            raise DataNotFound(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
    for labels, path in ((out[1], files[1]), (out[3], files[3])):
        if len(labels) and int(labels.max()) >= CLASSES:  # uint8: never negative
            raise DataNotFound(f"{path}: labels range over {int(labels.min())}.."
                               f"{int(labels.max())}, expected 0..{CLASSES - 1}; is it the "
                               "right data set?")
    return out[0][:, None], out[1].long(), out[2][:, None], out[3].long()


def make_source(name: str, torchvision_dir: str, system_dirs: list[str], classes: list[str],
                how: str, description: str) -> DataSource:
    def candidates(options: IdxOptions, ctx: DataContext | None) -> list[Path]:
        if options.root is not None:
            root = Path(options.root).expanduser()
            # The folder itself, a per-name sub-folder, or a torchvision root.
            return dedupe([root, root / name, root / torchvision_dir / "raw"])
        cache = ctx.cache_dir if ctx else None
        return default_roots(name, f"{torchvision_dir}/raw", *system_dirs, cache_dir=cache)

    def load(options: IdxOptions, ctx: DataContext) -> RawData:
        folder, notes = find_first(candidates(options, ctx), missing_files)
        if folder is None:
            raise not_found(name, notes, how)
        train_x, train_y, test_x, test_y = read_folder(folder)
        return RawData(train_x, train_y, test_x, test_y, num_classes=CLASSES,
                       classes=list(classes))

    def shape(options: IdxOptions) -> tuple[int, int, int, int]:
        return (1, 28, 28, CLASSES)

    return DataSource(name=name, options=IdxOptions, load=load, shape=shape,
                      description=description)


FASHION_MNIST = make_source(
    "fashion-mnist", "FashionMNIST", ["/usr/share/datasets/fashion-mnist"], FASHION_CLASSES,
    how="Get it with `apt-get install dataset-fashion-mnist` (Debian), or put the four IDX "
        "files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder and set "
        "root = \"FOLDER\" in [data.options] (or $MLSGD_DATA/fashion-mnist).",
    description="Fashion-MNIST (Zalando), 60 000 + 10 000 grey 28x28 images, 10 classes, "
                "read from local IDX files.",
)

MNIST = make_source(
    "mnist", "MNIST", ["/usr/share/datasets/mnist"], DIGIT_CLASSES,
    how="Put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder and set "
        "root = \"FOLDER\" in [data.options] (or $MLSGD_DATA/mnist); a torchvision "
        "download (ROOT/MNIST/raw) works too.",
    description="MNIST handwritten digits, 60 000 + 10 000 grey 28x28 images, 10 classes, "
                "read from local IDX files.",
)
