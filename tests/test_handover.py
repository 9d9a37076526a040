"""The trained network out of a run folder: ``network.safetensors`` at the end of a run and of a
resumed one, ``load_model``, ``evaluate`` and ``export`` (their errors are one line)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _runner_nets import hierarchy_text
from safetensors.torch import load_file

import mlsgd_dsl
from mlsgd_dsl.errors import RunError
from mlsgd_dsl.handover import NETWORK_FILE, Classifier, load_model, read_network

LEVELS = (("fine", 1.0, 2), ("coarse", 2.0, 1))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    """A finished two-level run of the BatchNorm test network (own model, family = import)."""
    from mlsgd_dsl.cli import main

    folder = tmp_path_factory.mktemp("handover")
    text = hierarchy_text(LEVELS, batchnorm=True).replace(
        "[mlsgd]\n", "[mlsgd]\ncycles = 2\nepochs = { fine = 1, coarse = 1 }\n")
    (folder / "h.toml").write_text(text)
    assert main(["run", str(folder / "h.toml"), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder


def test_network_is_the_checkpoints_finest_with_its_statistics(finished):
    run = finished / "run"
    weights = load_file(str(run / NETWORK_FILE))
    checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert set(weights) == set(checkpoint["finest"])
    for name, tensor in checkpoint["finest"].items():
        assert torch.equal(weights[name], tensor), name
    assert "bn.running_mean" in weights


def test_load_model_rebuilds_the_network_with_the_runs_normalisation(finished):
    run = finished / "run"
    model = mlsgd_dsl.load_model(run)
    bare = load_model(run, preprocessing=False)
    assert isinstance(model, Classifier) and not model.training and not bare.training
    _, meta = read_network(run)
    x = torch.rand(5, *meta["source_shape"], generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare((x - mean) / std))
    assert meta["num_classes"] == 4 and bare.out.out_features == 4


def test_evaluate_reports_the_runs_test_numbers(finished, run_cli):
    run = finished / "run"
    summary = json.loads((run / "summary.json").read_text())
    code, out, err = run_cli(["evaluate", run])
    assert code == 0, err
    assert f"test accuracy {summary['test_acc']:.4f}, loss {summary['test_loss']:.4f}" in out


@pytest.mark.parametrize("args, message", [
    (["--set", "mlsgd.lr=0.1"], "evaluate accepts data.* settings only"),
    (["--set", "data.options.size=16"], "the network takes (1, 8, 8), 4 classes"),
    (["--set", "data.options.classes=3"], "the network takes (1, 8, 8), 4 classes"),
])
def test_evaluate_refuses_what_the_network_cannot_take(finished, run_cli, args, message):
    code, _, err = run_cli(["evaluate", finished / "run", *args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_not_a_run_folder_is_one_line(tmp_path, run_cli):
    for command in (["evaluate", tmp_path], ["export", tmp_path]):
        code, _, err = run_cli(command)
        assert code == 2 and f"no {NETWORK_FILE} in this run folder" in err, err
    (tmp_path / NETWORK_FILE).write_bytes(b"\x00" * 20)
    with pytest.raises(RunError, match=f"cannot read {NETWORK_FILE}"):
        load_model(tmp_path)


def test_resumed_run_writes_the_network_when_it_completes(finished, run_cli):
    run = finished / "resumed"
    shutil.copytree(finished / "run", run)
    (run / NETWORK_FILE).unlink()
    (run / "checkpoint.prev.pt").replace(run / "checkpoint.pt")  # killed after cycle 1
    code, _, err = run_cli(["run", finished / "h.toml", "--resume", run, "--quiet"])
    assert code == 0, err
    weights, original = load_file(str(run / NETWORK_FILE)), load_file(
        str(finished / "run" / NETWORK_FILE))
    for name, tensor in original.items():  # a resumed run repeats the uninterrupted one
        torch.testing.assert_close(weights[name], tensor)


def test_handover_page_names_the_export_files():
    from pathlib import Path

    from mlsgd_dsl.handover import EXPORT_FORMATS

    page = (Path(__file__).resolve().parents[1] / "docs" / "handover.md").read_text()
    for fmt, name in EXPORT_FORMATS.items():
        assert f"| `{fmt}`" in page and f"`RUN_DIR/{name}`" in page
