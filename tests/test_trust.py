"""What a hierarchy file may run, data checked when loaded, and the last tracebacks (issue 16).

* ``family = "import"`` calls only marked factories (``@mlsgd_dsl.model_factory`` or the entry
  point group ``mlsgd_dsl.model_factories``): ``numpy:savetxt`` / ``torch:save`` / an unmarked
  function next to the file are refused before anything is called.
* Data is checked when loaded: a label >= the number of classes is one line naming the labels
  file, before any run folder exists.
* ``data.validation = 0`` is refused; relative data roots are taken from the hierarchy file's
  folder; ``extends`` errors name the key and the file holding it; Ctrl-C during start-up is
  one line; the interruption message counts cycles as the checkpoint does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _runner_nets import hierarchy_text

import mlsgd_dsl
from mlsgd_dsl.api import DataContext
from mlsgd_dsl.data.check import check_raw
from mlsgd_dsl.errors import DataNotFound, UserError
from mlsgd_dsl.runner.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--quiet", "--no-validate", "--set", "mlsgd.cycles=1"]


def one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlsgd-dsl: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def import_file(factory: str, kwargs: str = "") -> str:
    return textwrap.dedent(f"""\
        name = "trust"
        [data]
        source = "synthetic"
        options = {{ train = 64, test = 16, size = 8, channels = 1, classes = 4 }}
        validation = 16
        [model]
        family = "import"
        factory = "{factory}"
        kwargs = {{ {kwargs} }}
        [levels.fine]
        h = 1.0
        """)


# --------------------------------------------------------------------------- finding 4


@pytest.mark.parametrize(("factory", "kwargs", "written"), [
    ("numpy:savetxt", 'fname = "written.txt", X = [1, 2, 3]', "written.txt"),
    ("torch:save", 'obj = 1, f = "written.pt"', "written.pt"),
], ids=["numpy-savetxt", "torch-save"])
def test_an_installed_function_cannot_be_named_as_a_factory(run_cli, tmp_hierarchy, tmp_path,
                                                            monkeypatch, factory, kwargs,
                                                            written) -> None:
    monkeypatch.chdir(tmp_path)
    file = tmp_hierarchy(import_file(factory, kwargs))
    for command in (["validate", file], ["run", file, "--out", tmp_path / "run", *FAST]):
        rc, _, err = run_cli(command)
        one_line_error(rc, err, "levels.fine.model.factory",
                       f"{factory!r} is not marked as a model factory",
                       "@mlsgd_dsl.model_factory")
    assert not (tmp_path / written).exists()  # refused before the call
    assert not (tmp_path / "run").exists()


NETS = """
from torch import nn
import mlsgd_dsl

CALLED = []

def unmarked(num_classes):
    CALLED.append("unmarked")
    return nn.Linear(64, num_classes)

@mlsgd_dsl.model_factory
def marked(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

@mlsgd_dsl.model_factory
class Marked(nn.Sequential):
    def __init__(self, num_classes):
        super().__init__(nn.Flatten(), nn.Linear(64, num_classes))

class Sub(Marked):  # inherits the class, not the mark
    pass
"""


@pytest.mark.parametrize(("factory", "ok"), [
    ("trustnets:unmarked", False), ("trustnets:marked", True), ("trustnets:Marked", True),
    ("trustnets:Sub", False)])
def test_only_marked_factories_next_to_the_file_are_called(tmp_hierarchy, tmp_path, factory,
                                                           ok) -> None:
    (tmp_path / "trustnets.py").write_text(NETS)
    file = tmp_hierarchy(import_file(factory))
    try:
        if ok:
            compiled = mlsgd_dsl.compile(mlsgd_dsl.load(file))
            assert compiled.nodes["fine"].n_parameters == 64 * 4 + 4
        else:
            with pytest.raises(UserError, match="is not marked as a model factory"):
                mlsgd_dsl.compile(mlsgd_dsl.load(file))
            assert sys.modules["trustnets"].CALLED == []
    finally:
        sys.modules.pop("trustnets", None)


def test_a_factory_listed_as_an_entry_point_is_accepted(tmp_hierarchy, tmp_path,
                                                        monkeypatch) -> None:
    code, meta = tmp_path / "code", tmp_path / "meta"
    code.mkdir()
    (code / "epnets_for_tests.py").write_text(
        "from torch import nn\ndef build(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    monkeypatch.syspath_prepend(str(code))
    file = tmp_hierarchy(import_file("epnets_for_tests:build"))
    try:
        with pytest.raises(UserError, match="not marked"):  # no distribution lists it yet
            mlsgd_dsl.compile(mlsgd_dsl.load(file))
        info = meta / "epnets-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: epnets\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(
            "[mlsgd_dsl.model_factories]\nbuild = epnets_for_tests:build\n")
        monkeypatch.syspath_prepend(str(meta))
        compiled = mlsgd_dsl.compile(mlsgd_dsl.load(file))
        assert compiled.nodes["fine"].n_parameters == 64 * 4 + 4
    finally:
        sys.modules.pop("epnets_for_tests", None)


def test_the_shipped_example_factory_is_marked() -> None:
    sys.path.insert(0, str(ROOT / "examples" / "own_model"))
    try:
        import nets

        from mlsgd_dsl.factories import is_marked

        assert is_marked(nets.make) and not is_marked(nets.ResidualCNN)
    finally:
        sys.path.pop(0)
        sys.modules.pop("nets", None)


# --------------------------------------------------------------------------- finding 6


def write_idx(folder: Path, *, bad_label: int | None = None, n_train: int = 60,
              n_test: int = 20) -> None:
    """Four tiny uncompressed IDX files (28×28 images, labels 0..9 unless ``bad_label``)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        if bad_label is not None and prefix == "train":
            labels[3] = bad_label
        for kind, data, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            header = magic.to_bytes(4, "big") + b"".join(
                int(d).to_bytes(4, "big") for d in data.shape)
            (folder / f"{prefix}-{kind}-ubyte").write_bytes(header + data.numpy().tobytes())


def idx_hierarchy(root: str) -> str:
    text = hierarchy_text()
    text = text.replace('source = "synthetic"', 'source = "fashion-mnist"')
    text = re.sub(r"options = \{ train = .*\}", f'options = {{ root = "{root}" }}', text)
    return text.replace("validation = 32", "validation = 10")


def test_a_label_out_of_range_is_one_line_naming_the_file_before_training(
        run_cli, tmp_hierarchy, tmp_path) -> None:
    write_idx(tmp_path / "idx", bad_label=12)
    file = tmp_hierarchy(idx_hierarchy("idx"))
    rc, _, err = run_cli(["run", file, "--out", tmp_path / "run", *FAST])
    one_line_error(rc, err, f"{tmp_path / 'idx' / 'train-labels-idx1-ubyte'}: labels range "
                            "over 0..12, expected 0..9")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("change", "says"), [
    (lambda r: setattr(r, "train_y", r.train_y.clone().fill_(7)),
     "train labels range over 7..7, expected 0..3"),
    (lambda r: setattr(r, "test_y", r.test_y[:-1]), "16 test images but 15 labels"),
    (lambda r: setattr(r, "train_x", r.train_x[:, :, :4]), "train images are (1, 4, 8)"),
    (lambda r: setattr(r, "train_x", r.train_x.to(torch.int32)), "train images are torch.int32"),
    (lambda r: setattr(r, "test_y", r.test_y.float()), "test labels must be integers"),
    (lambda r: setattr(r, "train_x", r.train_x.float().fill_(float("nan"))), "NaN"),
], ids=["label-range", "counts", "shape", "image-dtype", "label-dtype", "nan"])
def test_any_data_source_is_checked_when_loaded(change, says) -> None:
    from mlsgd_dsl.data.synthetic import SYNTHETIC, SyntheticOptions

    raw = SYNTHETIC.load(SyntheticOptions(train=64, test=16, size=8, channels=1, classes=4),
                         DataContext(seed=0))
    check_raw(raw, (1, 8, 8, 4), "data source 'x'")  # the unchanged data passes
    change(raw)
    with pytest.raises(DataNotFound, match=re.escape(says)):
        check_raw(raw, (1, 8, 8, 4), "data source 'x'")


# --------------------------------------------------------------------------- finding 7


def test_an_empty_validation_split_is_refused(run_cli, tmp_hierarchy, tmp_path) -> None:
    file = tmp_hierarchy(hierarchy_text())
    rc, _, err = run_cli(["run", file, "--out", tmp_path / "a", *FAST,
                          "--set", "data.validation=0"])
    one_line_error(rc, err, "data.validation: must be at least 1 image")
    rc, _, err = run_cli(["run", file, "--out", tmp_path / "b", *FAST,
                          "--set", "data.validation=0.001"])
    one_line_error(rc, err, "data.validation: leaves no validation image")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- finding 8


def test_a_relative_data_root_is_taken_from_the_hierarchy_file(tmp_path, monkeypatch) -> None:
    project = tmp_path / "project"
    write_idx(project / "idx")
    (project / "h.toml").write_text(idx_hierarchy("idx"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(project / "h.toml"))
    splits = compiled.data()["fine"]
    assert len(splits.train_x) == 50 and len(splits.val_x) == 10
    assert compiled.resolved()["data"]["options"]["root"] == str(project / "idx")
    # the data's place is not part of the configuration hash: a moved project resumes
    moved = tmp_path / "moved"
    project.rename(moved)
    assert mlsgd_dsl.compile(mlsgd_dsl.load(moved / "h.toml")).config_hash() == \
        compiled.config_hash()


# --------------------------------------------------------------------------- finding 9


def test_extends_errors_name_the_key_and_the_file_that_holds_it(run_cli, tmp_hierarchy,
                                                                tmp_path) -> None:
    file = tmp_hierarchy('extends = "/etc/passwd"\nname = "x"\n')
    rc, _, err = run_cli(["validate", file])
    one_line_error(rc, err, f"{file}: extends: must name a .toml hierarchy file, got "
                            "'/etc/passwd'")
    (tmp_path / "broken.toml").write_text("name = [\n")
    file = tmp_hierarchy('extends = "broken.toml"\nname = "x"\n')
    rc, _, err = run_cli(["validate", file])
    one_line_error(rc, err, f"{file}: extends: in inherited file 'broken.toml': ",
                   "not valid TOML")


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(tmp_hierarchy, tmp_path) -> None:
    file = tmp_hierarchy(hierarchy_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # from 0.3 s on: earlier, Python itself is still starting (site, runpy), before any code
    # of ours runs, and prints its own traceback
    for delay in (0.3, 0.8, 1.5, 3.0):
        proc = subprocess.Popen([sys.executable, "-m", "mlsgd_dsl", "run", str(file),
                                 "--out", str(tmp_path / f"run{delay}"), *FAST],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, (delay, err)
        if proc.returncode != 0:  # else it finished before the signal (a fast machine)
            assert not (tmp_path / f"run{delay}" / "summary.json").exists()  # not run on
            assert err.strip().splitlines()[-1].startswith("mlsgd-dsl: "), (delay, err)
            assert len(err.strip().splitlines()) == 1, (delay, err)


INTERRUPTING_PLUGIN = """
from mlsgd_dsl.hookspecs import hookimpl

@hookimpl
def mlsgd_epoch_end(run, record):
    if record["cycle"] == 2:
        raise KeyboardInterrupt
"""


def test_the_interruption_message_counts_cycles_as_the_checkpoint(run_cli, install_plugin,
                                                                  tmp_hierarchy,
                                                                  tmp_path) -> None:
    install_plugin(INTERRUPTING_PLUGIN, ep="ctrlc", dist="ctrlc")
    file = tmp_hierarchy(hierarchy_text())
    out = tmp_path / "run"
    rc, _, err = run_cli(["run", file, "--out", out, "--quiet", "--no-validate",
                          "--set", "mlsgd.cycles=4"])
    line = one_line_error(rc, err, "interrupted during cycle 2 (counted from 0, as in "
                                   "metrics.csv)",
                          f"the checkpoint in {out} holds cycles 0-1 completed",
                          f"continue with --resume {out}")
    assert load_checkpoint(out / "checkpoint.pt")["cycles_done"] == 2, line
