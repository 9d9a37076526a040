"""CIFAR-100, KMNIST and EMNIST read offline from small files written in each real layout; the
number of classes comes from the data and the model's output layer follows it."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import mlsgd_dsl
from mlsgd_dsl.api import DataContext
from mlsgd_dsl.data.more import (
    CIFAR100,
    EMNIST,
    KMNIST,
    Cifar100Options,
    EmnistOptions,
)
from mlsgd_dsl.errors import DataNotFound


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 4) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [int(i) for i in rng.integers(0, 100, n)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": fine, b"coarse_labels": [i // 5 for i in fine],
                         b"filenames": [b"x.png"] * n, b"batch_label": name.encode()}, f,
                        protocol=2)
    with (folder / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, f,
                    protocol=2)
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x00000800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_cifar100_fine_and_coarse_labels_set_the_output_layer(tmp_path, tmp_hierarchy):
    root = write_cifar100(tmp_path / "data")
    raw = CIFAR100.load(Cifar100Options(root=str(root)), DataContext(seed=0))
    assert raw.num_classes == 100 and raw.classes[3] == "fine3"
    assert raw.train_x.shape == (12, 3, 32, 32) and raw.train_x.dtype == torch.uint8
    coarse = CIFAR100.load(Cifar100Options(root=str(root), labels="coarse"), DataContext(seed=0))
    assert coarse.num_classes == 20 and torch.equal(coarse.train_y, raw.train_y // 5)
    for labels, classes in (("fine", 100), ("coarse", 20)):
        path = tmp_hierarchy(f"""
            name = "c100"
            [data]
            source = "cifar100"
            options = {{ root = {str(root)!r}, labels = "{labels}" }}
            validation = 2
            [model]
            family = "ruthotto-resnet"
            channels = [2]
            layers = 1
            [levels.fine]
            h = 1.0
            """)
        compiled = mlsgd_dsl.compile(mlsgd_dsl.load(path))
        assert compiled.nodes["fine"].num_classes == classes
        assert compiled.model("fine")(torch.zeros(1, 3, 32, 32)).shape == (1, classes)


def test_cifar100_pickle_may_hold_arrays_only(tmp_path):
    root = write_cifar100(tmp_path / "data")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with (root / "cifar-100-python" / "train").open("wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataNotFound, match="refusing to load builtins.print"):
        CIFAR100.load(Cifar100Options(root=str(root)), DataContext(seed=0))


def test_cifar100_missing_says_where_it_looked(tmp_path):
    with pytest.raises(DataNotFound, match="cifar-100-python/train.*download = true"):
        CIFAR100.load(Cifar100Options(root=str(tmp_path)), DataContext(seed=0))


def test_kmnist_reads_the_mnist_layout_under_a_torchvision_root(tmp_path):
    raw_dir = tmp_path / "KMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    raw = KMNIST.load(KMNIST.options(root=str(tmp_path)), DataContext(seed=0))
    assert raw.train_x.shape == (6, 1, 28, 28) and raw.num_classes == 10
    assert raw.classes[0] == "o"


def _write_emnist(folder: Path, split: str, labels: np.ndarray, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("train", "test"):
        write_idx(folder / f"emnist-{split}-{part}-images-idx3-ubyte", images)
        write_idx(folder / f"emnist-{split}-{part}-labels-idx1-ubyte", labels)


def test_emnist_letters_has_27_classes_and_upright_images(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[:, 0, 5] = 255  # stored transposed: row 0, column 5 ...
    _write_emnist(tmp_path / "gzip", "letters", np.array([1, 13, 26]), images)
    raw = EMNIST.load(EmnistOptions(root=str(tmp_path), split="letters"), DataContext(seed=0))
    assert raw.num_classes == 27 and raw.classes[1] == "a" and raw.classes[26] == "z"
    assert raw.train_x[0, 0, 5, 0] == 255  # ... is row 5, column 0 of the upright image
    assert EMNIST.shape(EmnistOptions(split="byclass"))[3] == 62


def test_emnist_label_outside_the_split_is_one_line(tmp_path):
    _write_emnist(tmp_path, "digits", np.array([0, 3, 10]), np.zeros((3, 28, 28)))
    with pytest.raises(DataNotFound, match=r"labels 0\.\.10 do not fit the 10 classes"):
        EMNIST.load(EmnistOptions(root=str(tmp_path), split="digits"), DataContext(seed=0))


def test_own_data_page_documents_every_option():
    from mlsgd_dsl.data.imagefolder import ImageFolderOptions

    page = (Path(__file__).resolve().parents[1] / "docs" / "own-data.md").read_text()
    for field in ImageFolderOptions.model_fields:
        assert f"| `{field}` |" in page, field
    for model in (Cifar100Options, EmnistOptions):
        for field in model.model_fields:
            assert f"`{field}`" in page, field
    for source in ("imagefolder", "cifar100", "kmnist", "emnist"):
        assert f"`{source}`" in page
