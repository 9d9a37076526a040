"""A user's folder of images in, the trained network out: the imagefolder source, decoding,
caching, splits, one-line errors, and the whole way from PNG files to an exported network that
classifies an image identically in a process without mlsgd-dsl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlsgd_dsl.api import DataContext
from mlsgd_dsl.data import imagefolder
from mlsgd_dsl.data.imagefolder import ImageFolderOptions
from mlsgd_dsl.errors import DataNotFound

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = ROOT / "hierarchies" / "resolution-cifar10.toml"
CLASSES = ("circle", "hbars", "vbars")


def pattern(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A learnable RGB picture of one class: a bright disc, horizontal or vertical bars."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "circle":
        mask = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    elif kind == "hbars":
        mask = (yy // max(1, h // 8)) % 2 == 0
    else:
        mask = (xx // max(1, w // 8)) % 2 == 0
    colour = rng.integers(120, 256, size=3)
    img = np.where(mask[..., None], colour, 30) + rng.integers(0, 40, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, per_class: int = 10, *, seed: int = 0,
                 sizes: tuple[tuple[int, int], ...] = ((16, 16), (12, 20), (20, 14))) -> Path:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = sizes[i % len(sizes)]
            Image.fromarray(pattern(kind, size, rng)).save(root / kind / f"{i:03d}.png")
    return root


def options(root: Path, tmp_path: Path, **kw) -> ImageFolderOptions:
    return ImageFolderOptions(root=str(root), cache_dir=str(tmp_path / "cache"),
                              **{"size": 8, **kw})


# --------------------------------------------------------------------------- decoding


def test_crop_keeps_the_centre_and_stretch_keeps_everything(tmp_path):
    # 4 wide columns: black | red | red | black, 8 high, 16 wide
    img = np.zeros((8, 16, 3), dtype=np.uint8)
    img[:, 4:12, 0] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    cropped = imagefolder.decode_image(tmp_path / "wide.png", (8, 8), "crop", 3)
    assert cropped.shape == (3, 8, 8) and cropped.dtype == np.uint8
    assert (cropped[0] == 255).all()  # the centre 8x8 is all red
    stretched = imagefolder.decode_image(tmp_path / "wide.png", (8, 8), "stretch", 3)
    assert stretched[0, :, 0].max() < 128 and stretched[0, :, 4].min() > 128  # black edges kept
    grey = imagefolder.decode_image(tmp_path / "wide.png", (4, 4), "crop", 1)
    assert grey.shape == (1, 4, 4)


def test_decoded_once_then_read_from_the_cache_keyed_by_content(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "pics", per_class=4)
    opts = options(root, tmp_path, test_fraction=0.25)
    raw = imagefolder.load(opts, DataContext(seed=0))
    assert raw.num_classes == 3 and raw.classes == list(CLASSES)
    assert raw.train_x.dtype == torch.uint8 and raw.train_x.shape[1:] == (3, 8, 8)
    assert len(raw.train_x) == 9 and len(raw.test_x) == 3  # one of four per class to test
    assert sorted(raw.test_y.tolist()) == [0, 1, 2]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the cache holds this folder")

    monkeypatch.setattr(imagefolder, "decode_image", refuse)
    again = imagefolder.load(opts, DataContext(seed=0))
    assert torch.equal(again.train_x, raw.train_x) and torch.equal(again.test_y, raw.test_y)
    monkeypatch.undo()
    # a changed image is a different folder: decoded again, a second cache file
    img = root / "circle" / "000.png"
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(img)
    os.utime(img, ns=(1, 1))
    imagefolder.load(opts, DataContext(seed=0))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_seeded_split_of_one_folder_and_separate_train_test_folders(tmp_path):
    root = write_folder(tmp_path / "one", per_class=10)
    opts = options(root, tmp_path, cache=False, test_fraction=0.3)
    a, b = imagefolder.load(opts, DataContext(seed=1)), imagefolder.load(opts, DataContext(seed=1))
    c = imagefolder.load(opts, DataContext(seed=2))
    assert torch.equal(a.test_x, b.test_x) and not torch.equal(a.test_x, c.test_x)
    assert torch.bincount(a.test_y).tolist() == [3, 3, 3]  # the same share of every class

    split = tmp_path / "split"
    write_folder(split / "train", per_class=5)
    write_folder(split / "test", per_class=2, seed=1)
    raw = imagefolder.load(options(split, tmp_path, cache=False), DataContext(seed=0))
    assert (len(raw.train_x), len(raw.test_x)) == (15, 6)
    assert imagefolder.shape(options(split, tmp_path)) == (3, 8, 8, 3)


# --------------------------------------------------------------------------- errors


def _hierarchy(tmp_hierarchy, root: Path, tmp_path: Path, extra: str = "") -> Path:
    return tmp_hierarchy(f"""
        name = "pics"
        [data]
        source = "imagefolder"
        options = {{ root = {str(root)!r}, size = 8, cache_dir = {str(tmp_path / "c")!r}{extra} }}
        validation = 3
        [model]
        family = "ruthotto-resnet"
        channels = [2, 4]
        layers = 1
        [levels.fine]
        h = 1.0
        [mlsgd]
        method = "sgd"
        sgd_epochs = 1
        batch_size = 8
        [report]
        plot = false
        """)


@pytest.mark.parametrize("damage, named", [
    ("unreadable", "circle/001.png: cannot read image"),
    ("empty class", "empty: class 'empty' has no images"),
    ("mixed channels", "vbars/002.png: 1 channel(s) (grey) but"),
])
def test_bad_folders_fail_before_training_with_one_line(tmp_path, tmp_hierarchy, run_cli,
                                                        damage, named):
    root = write_folder(tmp_path / "pics", per_class=4)
    if damage == "unreadable":
        (root / "circle" / "001.png").write_bytes(b"not a png at all")
    elif damage == "empty class":
        (root / "empty").mkdir()
        (root / "empty" / "notes.txt").write_text("no images here")
    else:
        Image.fromarray(np.full((8, 8), 90, dtype=np.uint8), mode="L").save(
            root / "vbars" / "002.png")
    path = _hierarchy(tmp_hierarchy, root, tmp_path)
    code, out, err = run_cli(["run", path, "--out", tmp_path / "run", "--quiet"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_channels_option_converts_mixed_images(tmp_path):
    root = write_folder(tmp_path / "pics", per_class=3)
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8), mode="L").save(root / "vbars" / "x.png")
    raw = imagefolder.load(options(root, tmp_path, channels=3, cache=False), DataContext(seed=0))
    assert raw.train_x.shape[1] == 3
    raw = imagefolder.load(options(root, tmp_path, channels=1, cache=False), DataContext(seed=0))
    assert raw.train_x.shape[1] == 1


def test_missing_root_is_one_line(tmp_path):
    with pytest.raises(DataNotFound, match="no such folder"):
        imagefolder.load(options(tmp_path / "nope", tmp_path), DataContext(seed=0))


# --------------------------------------------------------------------------- done when

NO_MLSGD = textwrap.dedent("""
    import json, sys
    sys.modules["mlsgd_dsl"] = None          # importing mlsgd_dsl now fails
    try:
        import mlsgd_dsl  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("mlsgd_dsl is importable")
    import numpy as np, torch
    from PIL import Image
    image, exported, scripted = sys.argv[1:4]
    x = torch.from_numpy(np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 255)
    x = x.permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        a = torch.export.load(exported).module()(x)
        b = torch.jit.load(scripted)(x)
    print(json.dumps({"exported": a[0].tolist(), "torchscript": b[0].tolist()}))
""")


def test_png_folder_trains_a_resolution_hierarchy_and_exports(tmp_path, tmp_hierarchy, run_cli,
                                                              one_thread):
    root = tmp_path / "pics"
    write_folder(root / "train", per_class=12)
    write_folder(root / "test", per_class=4, seed=7, sizes=((8, 8),))
    path = tmp_hierarchy(f"""
        extends = {str(RESOLUTION)!r}
        name = "my-pictures"
        [data]
        source = "imagefolder"
        options = {{ root = {str(root)!r}, size = 8, cache_dir = {str(tmp_path / "cache")!r} }}
        validation = 6
        augment = {{ flip = true, crop = 0.0 }}
        [model]
        channels = [4, 8]
        layers = 1
        [mlsgd]
        cycles = 2
        epochs = {{ fine = 1, coarse = 1 }}
        batch_size = 10
        lr = 0.05
        schedule = {{ kind = "constant" }}
        eval = {{ recalibrate = 30 }}
        [report]
        plot = false
        thresholds = [0.5]
        """)
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["run", path, "--out", run_dir, "--quiet"])
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "network.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["level"] for r in rows} == {"fine", "coarse"}  # both resolutions trained

    # evaluate reproduces the run's own test numbers from the saved network
    code, out, err = run_cli(["evaluate", run_dir])
    assert code == 0, err
    assert f"test accuracy {summary['test_acc']:.4f}" in out and "12 images" in out

    for fmt in ("exported", "torchscript"):
        code, out, err = run_cli(["export", run_dir, "--format", fmt])
        assert code == 0, err
    image = root / "test" / "hbars" / "001.png"
    import mlsgd_dsl

    model = mlsgd_dsl.load_model(run_dir)
    assert not model.training and model.classes == list(CLASSES)
    x = torch.from_numpy(imagefolder.decode_image(image, (8, 8), "crop", 3)).float()[None] / 255
    with torch.no_grad():
        here = model(x)[0]
    proc = subprocess.run(
        [sys.executable, "-c", NO_MLSGD, str(image), str(run_dir / "network.pt2"),
         str(run_dir / "network.torchscript.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    for fmt in ("exported", "torchscript"):
        logits = torch.tensor(there[fmt])
        torch.testing.assert_close(logits, here, rtol=1e-4, atol=1e-5)
        assert int(logits.argmax()) == int(here.argmax())
