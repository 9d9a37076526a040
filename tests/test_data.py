"""Data sources (on files in their real on-disk formats), splits, coarsening, augmentation."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mlsgd_dsl.api import DataContext
from mlsgd_dsl.builtins import data as builtin_data
from mlsgd_dsl.data import AVGPOOL, augment_batch, coarsen, prepare
from mlsgd_dsl.data.cifar import CIFAR10, CifarOptions
from mlsgd_dsl.data.coarsen import AvgPoolOptions
from mlsgd_dsl.data.idx import FASHION_MNIST, MNIST, IdxOptions
from mlsgd_dsl.data.synthetic import SYNTHETIC, SyntheticOptions
from mlsgd_dsl.data.tensors import TENSORS, TensorsOptions
from mlsgd_dsl.errors import DataNotFound

CTX = DataContext(seed=0)
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Default searches must not see the developer's own data: cwd and home are fresh folders.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLSGD_DATA", raising=False)


# --------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    magic = bytes([0, 0, 0x08, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic + dims + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("source", [FASHION_MNIST, MNIST])
def test_idx_loads_gzipped_and_raw(tmp_path: Path, source, gz: bool) -> None:
    arrays = write_idx(tmp_path / "idx", gz=gz)
    raw = source.load(IdxOptions(root=str(tmp_path / "idx")), CTX)
    assert raw.train_x.shape == (12, 1, 28, 28) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (5, 1, 28, 28)
    assert np.array_equal(raw.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert raw.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert raw.train_y.dtype == torch.int64 and raw.num_classes == 10 and len(raw.classes) == 10
    assert source.shape(IdxOptions()) == (1, 28, 28, 10)


def test_idx_default_search_finds_torchvision_layout_and_env(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    write_idx(tmp_path / "data" / "MNIST" / "raw")
    assert MNIST.load(IdxOptions(), CTX).train_x.shape[0] == 12
    write_idx(tmp_path / "env" / "fashion-mnist", n_train=7)
    monkeypatch.setenv("MLSGD_DATA", str(tmp_path / "env"))
    assert FASHION_MNIST.load(IdxOptions(), CTX).train_x.shape[0] == 7


@pytest.mark.parametrize("damage, words", [
    (lambda b: b"\x00\x00\x08\x02" + b[4:], "magic"),
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:6], "truncated"),
])
def test_idx_corrupt_file_is_a_readable_error(tmp_path: Path, damage, words: str) -> None:
    write_idx(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataNotFound, match=words) as info:
        MNIST.load(IdxOptions(root=str(tmp_path)), CTX)
    assert str(path) in str(info.value)


def test_idx_bad_gzip_is_a_readable_error(tmp_path: Path) -> None:
    write_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataNotFound, match="damaged"):
        MNIST.load(IdxOptions(root=str(tmp_path)), CTX)


def test_fashion_missing_message_lists_places_and_apt_hint(tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    write_idx(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFound) as info:
        FASHION_MNIST.load(IdxOptions(root=str(partial)), CTX)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(partial) in message and "t10k-labels-idx1-ubyte[.gz]" in message
    assert str(partial / "FashionMNIST" / "raw") in message
    assert "\n" not in message


def test_default_search_paths_are_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLSGD_DATA", str(tmp_path / "env"))
    with pytest.raises(DataNotFound) as info:
        MNIST.load(IdxOptions(), DataContext(seed=0, cache_dir=str(tmp_path / "cache")))
    message = str(info.value)
    for place in [tmp_path / "cache" / "mnist", tmp_path / "env" / "mnist",
                  tmp_path / "home" / ".cache" / "mlsgd-dsl" / "mnist",
                  tmp_path / "data" / "mnist", tmp_path / "data" / "MNIST" / "raw"]:
        assert str(place) in message


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package() -> None:
    raw = FASHION_MNIST.load(IdxOptions(), CTX)
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert raw.train_x.dtype == torch.uint8
    assert raw.train_y[:5].tolist() == [9, 0, 0, 3, 0]
    assert raw.test_y[:5].tolist() == [9, 2, 1, 1, 6]
    assert torch.bincount(raw.train_y).tolist() == [6000] * 10


# --------------------------------------------------------------------------- CIFAR-10


def write_cifar(root: Path, per_batch: int = 4) -> list[np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    datas = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"data": data, b"filenames": [b"img.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        datas.append(data)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return datas


def test_cifar_loads_official_layout(tmp_path: Path) -> None:
    datas = write_cifar(tmp_path / "c")
    raw = CIFAR10.load(CifarOptions(root=str(tmp_path / "c")), CTX)
    assert raw.train_x.shape == (20, 3, 32, 32) and raw.test_x.shape == (4, 3, 32, 32)
    assert raw.train_x.dtype == torch.uint8 and raw.train_y.dtype == torch.int64
    # Rows are CHW: the first 1024 bytes are the red plane.
    assert np.array_equal(raw.train_x[0, 0].numpy().ravel(), datas[0][0, :1024])
    assert np.array_equal(raw.test_x[3].numpy().ravel(), datas[5][3])
    assert raw.classes[9] == "truck"
    # Pointing at the batches folder itself works too; so does the ./data default.
    assert len(CIFAR10.load(CifarOptions(root=str(tmp_path / "c" / "cifar-10-batches-py")),
                            CTX).train_y) == 20
    write_cifar(tmp_path / "data")
    assert CIFAR10.shape(CifarOptions()) == (3, 32, 32, 10)
    assert len(CIFAR10.load(CifarOptions(), CTX).test_y) == 4


def test_cifar_refuses_code_in_pickles(tmp_path: Path) -> None:
    write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataNotFound, match="refusing to load builtins.print"):
        CIFAR10.load(CifarOptions(root=str(tmp_path)), CTX)


def test_cifar_missing_message(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound) as info:
        CIFAR10.load(CifarOptions(), CTX)
    message = str(info.value)
    assert "download = true" in message and "cifar-10-batches-py/data_batch_1..5" in message
    assert str(tmp_path / "home" / ".cache" / "mlsgd-dsl" / "cifar10") in message
    assert str(tmp_path / "data") in message


# --------------------------------------------------------------------------- tensors


def test_tensors_pt_and_npz(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10, 8, 8, 3), generator=gen, dtype=torch.uint8)  # NHWC
    arrays = {"train_x": x, "train_y": torch.arange(10) % 4,
              "test_x": x[:3], "test_y": torch.tensor([0, 1, 2])}
    torch.save(arrays, tmp_path / "d.pt")
    np.savez(tmp_path / "d.npz", **{k: v.numpy() for k, v in arrays.items()})
    for name in ("d.pt", "d.npz"):
        options = TensorsOptions(path=str(tmp_path / name))
        raw = TENSORS.load(options, CTX)
        assert raw.train_x.shape == (10, 3, 8, 8) and raw.num_classes == 4
        assert torch.equal(raw.train_x, x.permute(0, 3, 1, 2))
        assert TENSORS.shape(options) == (3, 8, 8, 4)
        assert TENSORS.shape(TensorsOptions(path=str(tmp_path / name), num_classes=7))[3] == 7


def test_tensors_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match="not found"):
        TENSORS.load(TensorsOptions(path=str(tmp_path / "none.pt")), CTX)
    torch.save({"train_x": torch.zeros(2, 1, 4, 4)}, tmp_path / "bad.pt")
    with pytest.raises(DataNotFound, match="expected keys"):
        TENSORS.load(TensorsOptions(path=str(tmp_path / "bad.pt")), CTX)
    np.savez(tmp_path / "lab.npz", train_x=np.zeros((2, 4, 4)), train_y=np.array([0, 5]),
             test_x=np.zeros((1, 4, 4)), test_y=np.array([1]))
    with pytest.raises(DataNotFound, match=r"labels range over 0\.\.5"):
        TENSORS.load(TensorsOptions(path=str(tmp_path / "lab.npz"), num_classes=3), CTX)
    with pytest.raises(ValidationError):
        TensorsOptions(path="x.pt", extra_key=1)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_shaped() -> None:
    options = SyntheticOptions(train=300, test=100, classes=7, channels=3, size=12, seed=5)
    a, b = SYNTHETIC.load(options, CTX), SYNTHETIC.load(options, DataContext(seed=99))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (300, 3, 12, 12) and a.train_x.dtype == torch.uint8
    assert SYNTHETIC.shape(options) == (3, 12, 12, 7) and a.num_classes == 7
    assert torch.bincount(a.train_y).min() >= 300 // 7
    other = SYNTHETIC.load(options.model_copy(update={"seed": 6}), CTX)
    assert not torch.equal(a.train_x, other.train_x)
    # The test set does not depend on the training-set size.
    bigger = SYNTHETIC.load(options.model_copy(update={"train": 500}), CTX)
    assert torch.equal(a.test_x, bigger.test_x)
    with pytest.raises(ValidationError):
        SyntheticOptions(classes=101)
    with pytest.raises(ValidationError):
        SyntheticOptions(size=4)


def _train_small_cnn(x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(x.shape[1], 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(x), (100,), generator=gen)
        loss = F.cross_entropy(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def test_synthetic_is_learnable_but_not_by_mean_pixel() -> None:
    raw = SYNTHETIC.load(SyntheticOptions(train=3000, test=1000), CTX)
    splits = prepare(raw, validation=0, seed=0)
    # Resolution coarsening keeps the classes: train on the 2x-pooled images (also faster).
    coarse = splits.coarsened([(AVGPOOL, AvgPoolOptions(factor=2))])
    net = _train_small_cnn(coarse.train_x, coarse.train_y, steps=250)
    with torch.no_grad():
        accuracy = (net(coarse.test_x).argmax(1) == coarse.test_y).float().mean().item()
    assert accuracy > 0.4, accuracy  # chance is 0.1

    # Best possible rule on the mean pixel alone: the majority class per mean-pixel bin.
    mean_train = raw.train_x.float().mean((1, 2, 3))
    mean_test = raw.test_x.float().mean((1, 2, 3))
    edges = torch.quantile(mean_train, torch.linspace(0, 1, 21)[1:-1])
    bins_train, bins_test = torch.bucketize(mean_train, edges), torch.bucketize(mean_test, edges)
    counts = torch.zeros(20, 10).index_put_((bins_train, raw.train_y), torch.ones(3000),
                                            accumulate=True)
    guess = counts.argmax(1)[bins_test]
    assert (guess == raw.test_y).float().mean().item() < 0.2


def _raw(n: int = 200, channels: int = 2):
    options = SyntheticOptions(train=n, test=50, channels=channels, size=8)
    return SYNTHETIC.load(options, CTX)


def test_split_sizes_disjoint_and_deterministic() -> None:
    raw = _raw()
    raw.train_y = torch.arange(200)  # labels as identities, to check disjointness
    a = prepare(raw, validation=0.25, subset=100, test_subset=20, seed=3)
    assert (len(a.train_x), len(a.val_x), len(a.test_x)) == (100, 50, 20)
    assert not set(a.train_y.tolist()) & set(a.val_y.tolist())
    b = prepare(raw, validation=50, subset=100, test_subset=20, seed=3)
    assert torch.equal(a.val_y, b.val_y) and torch.equal(a.train_x, b.train_x)
    c = prepare(raw, validation=50, subset=100, test_subset=20, seed=4)
    assert not torch.equal(a.val_y, c.val_y)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64


@pytest.mark.parametrize("kwargs, words", [
    ({"validation": 200}, "leaves no training images"),
    ({"validation": 1.0}, r"\[0, 1\)"),
    ({"validation": -1}, ">= 0"),
    ({"validation": 10, "subset": 500}, "larger than the 190"),
    ({"validation": 10, "test_subset": 0}, "at least 1"),
])
def test_split_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        prepare(_raw(), seed=0, **kwargs)


def test_normalisation_from_training_split() -> None:
    splits = prepare(_raw(channels=3), validation=40, seed=0)
    assert torch.allclose(splits.train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(splits.train_x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4)
    assert len(splits.mean) == 3 and all(0 < m < 1 for m in splits.mean)
    # Raw zero maps to -mean/std, the value augment_batch pads with.
    black = splits.black()
    assert torch.allclose(black, -torch.tensor(splits.mean) / torch.tensor(splits.std))
    plain = prepare(_raw(channels=3), validation=40, seed=0, normalize=False)
    assert plain.train_x.min() >= 0 and plain.train_x.max() <= 1 and plain.std == (1.0,) * 3


def test_splits_to_and_coarsened() -> None:
    splits = prepare(_raw(), validation=20, seed=0)
    coarse = splits.coarsened([(AVGPOOL, AvgPoolOptions(factor=2))])
    assert coarse.train_x.shape[1:] == (2, 4, 4) and coarse.test_x.shape[1:] == (2, 4, 4)
    assert splits.train_x.shape[1:] == (2, 8, 8)  # the original is untouched
    assert torch.equal(coarse.val_y, splits.val_y)
    assert splits.to("cpu").train_x.device.type == "cpu"


# --------------------------------------------------------------------------- coarsening


def test_avgpool_hand_computed() -> None:
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    expected = torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]])
    assert torch.equal(AVGPOOL.apply(x, AvgPoolOptions(factor=2)), expected)
    assert torch.equal(coarsen(x, [(AVGPOOL, AvgPoolOptions(factor=2))] * 2),
                       torch.tensor([[[[7.5]]]]))
    assert AVGPOOL.output_shape((3, 32, 32), AvgPoolOptions(factor=4)) == (3, 8, 8)
    assert torch.equal(AVGPOOL.apply(x, AvgPoolOptions(factor=1)), x)


def test_avgpool_not_divisible() -> None:
    with pytest.raises(ValueError, match="image size 28x28 is not divisible by factor 3"):
        AVGPOOL.output_shape((1, 28, 28), AvgPoolOptions(factor=3))
    with pytest.raises(ValueError, match="step 2 .avgpool.: image size 7x7"):
        coarsen(torch.zeros(1, 1, 28, 28), [(AVGPOOL, AvgPoolOptions(factor=4))] * 2)
    with pytest.raises(ValidationError):
        AvgPoolOptions(factor=0)


# --------------------------------------------------------------------------- augmentation


def test_augment_crop_pads_with_fill_and_keeps_shape() -> None:
    x = torch.full((400, 3, 32, 32), 5.0)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = augment_batch(x, crop=0.0625, fill=fill, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out is not x
    padded = out != 5.0
    # Every pixel is the image or its channel's fill; at most 2 px of border per side.
    assert torch.all((out == 5.0) | (out == fill.view(1, 3, 1, 1)))
    assert not padded[:, :, 2:-2, 2:-2].any() and padded.any()
    rows = padded[:, 0].all(2).float().sum(1)  # border rows (fully padded)
    assert rows.max() == 2 and (rows == 0).any()  # shifts up to p, including none


def test_augment_window_is_a_shifted_copy() -> None:
    x = torch.randn(64, 1, 8, 8)
    out = augment_batch(x, crop=2, generator=torch.Generator().manual_seed(1))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = padded[i, 0].unfold(0, 8, 1).unfold(1, 8, 1).reshape(-1, 8, 8)
        assert (windows == out[i, 0]).all((1, 2)).any()


def test_augment_flips_about_half_and_is_deterministic() -> None:
    x = torch.randn(2000, 1, 6, 6)
    out = augment_batch(x, flip=True, generator=torch.Generator().manual_seed(2))
    flipped = (out == x.flip(3)).all((1, 2, 3))
    kept = (out == x).all((1, 2, 3))
    assert torch.all(flipped | kept)
    assert 0.45 < flipped.float().mean() < 0.55
    again = augment_batch(x, flip=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again)
    both = augment_batch(x, flip=True, crop=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(both, augment_batch(x, flip=True, crop=1,
                                           generator=torch.Generator().manual_seed(3)))
    assert torch.equal(augment_batch(x), x)


# --------------------------------------------------------------------------- plugin


def test_builtin_plugin_registers_everything() -> None:
    names = [s.name for s in builtin_data.mlsgd_data_sources()]
    assert names == ["synthetic", "fashion-mnist", "mnist", "cifar10", "tensors", "imagefolder",
                     "cifar100", "kmnist", "emnist"]
    assert [c.name for c in builtin_data.mlsgd_coarsenings()] == ["avgpool"]
    for source in builtin_data.mlsgd_data_sources():
        assert source.options.model_config.get("extra") == "forbid"
        assert all(f.description for f in source.options.model_fields.values())
