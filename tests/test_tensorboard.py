"""``[report] tensorboard = true``: event files written through the event hooks, read back with
TensorBoard's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _runner_nets import hierarchy_text

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from mlsgd_dsl.builtins import tensorboard as tb  # noqa: E402

LEVELS = (("fine", 1.0, 2), ("coarse", 2.0, 1))
DOC = Path(__file__).resolve().parents[1] / "docs" / "tensorboard.md"


def _accumulator(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _run(tmp_hierarchy, run_cli, out: Path, extra: str = "", tensorboard: bool = True) -> None:
    text = hierarchy_text(LEVELS, batchnorm=True) + f"tensorboard = {str(tensorboard).lower()}\n"
    path = tmp_hierarchy(text.replace("[mlsgd]\n", "[mlsgd]\ncycles = 2\n"
                                      "epochs = { fine = 1, coarse = 1 }\n" + extra))
    code, _, err = run_cli(["run", path, "--out", out, "--quiet"])
    assert code == 0, err


def test_event_files_hold_the_curves_markers_and_hierarchy(tmp_path, tmp_hierarchy, run_cli,
                                                           one_thread):
    out = tmp_path / "run"
    _run(tmp_hierarchy, run_cli, out, 'correction = "deterministic"\nuncorrected_cycles = 1\n')
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    main = _accumulator(out / tb.FOLDER)
    tags = main.Tags()
    for tag in ("train_loss/fine", "train_loss/coarse", "train_acc/fine", "train_acc/coarse",
                "lr/fine", "lr/coarse", "val_acc/finest", "val_loss/finest",
                "events/prolongation", "events/corrected_cycle"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert {"hierarchy/text_summary", "summary/text_summary"} <= set(tags["tensors"])
    page = DOC.read_text()
    for tag in ("train_loss/LEVEL", "train_acc/LEVEL", "lr/LEVEL", "val_acc/finest",
                "val_loss/finest", "events/prolongation", "events/corrected_cycle",
                "val_acc/by_finest_epoch", "val_acc/by_train_time", "RUN/tensorboard/"
                + tb.BY_FINEST_EPOCH, "RUN/tensorboard/" + tb.BY_TRAIN_TIME):
        assert f"`{tag}`" in page, tag  # the page names what the files hold
    hierarchy = main.Tensors("hierarchy/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| fine |" in hierarchy and "| coarse |" in hierarchy and "parameters" in hierarchy

    # the scalars are the metrics rows: same values, step = epochs on all levels x 100
    coarse_rows = [r for r in rows if r["level"] == "coarse" and r["train_loss"] is not None]
    events = main.Scalars("train_loss/coarse")
    assert [e.step for e in events] == [round(100 * r["global_epoch"]) for r in coarse_rows]
    assert [e.value for e in events] == pytest.approx([r["train_loss"] for r in coarse_rows])
    # wall time = training time (+ a constant): TensorBoard's "Relative" axis is training time
    fine = [r for r in rows if r["level"] == "fine" and r["train_loss"] is not None]
    walls = [e.wall_time for e in main.Scalars("train_loss/fine")]
    assert [w - walls[0] for w in walls] == pytest.approx(
        [r["train_time"] - fine[0]["train_time"] for r in fine], abs=1e-3)
    prolongations = [r for r in rows if r["event"] == "prolongated"]
    assert len(main.Scalars("events/prolongation")) == len(prolongations) == 2
    # cycle 0 uncorrected, cycle 1 corrected
    assert [e.value for e in main.Scalars("events/corrected_cycle")] == [0.0, 1.0]

    val = [r for r in rows if r["val_acc"] is not None and r["level"] == "fine"]
    by_epoch = _accumulator(out / tb.FOLDER / tb.BY_FINEST_EPOCH).Scalars(
        "val_acc/by_finest_epoch")
    assert [e.step for e in by_epoch] == [round(100 * r["epoch"]) for r in val]
    assert [e.value for e in by_epoch] == pytest.approx([r["val_acc"] for r in val])
    by_time = _accumulator(out / tb.FOLDER / tb.BY_TRAIN_TIME).Scalars("val_acc/by_train_time")
    assert [e.step for e in by_time] == [round(1000 * r["train_time"]) for r in val]


def test_off_by_default(tmp_path, tmp_hierarchy, run_cli, one_thread):
    out = tmp_path / "run"
    _run(tmp_hierarchy, run_cli, out, tensorboard=False)
    assert not (out / tb.FOLDER).exists()


def test_missing_package_is_one_line(tmp_path, monkeypatch, tmp_hierarchy, run_cli, one_thread):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    text = hierarchy_text(LEVELS) + "tensorboard = true\n"
    code, _, err = run_cli(["run", tmp_hierarchy(text), "--out", tmp_path / "r", "--quiet"])
    assert code == 2 and "pip install 'mlsgd-dsl[tensorboard]'" in err
    assert len(err.strip().splitlines()) == 1


def test_resume_replaces_what_the_killed_session_wrote_after_the_checkpoint(
        tmp_path, tmp_hierarchy, run_cli, one_thread):
    out = tmp_path / "run"
    _run(tmp_hierarchy, run_cli, out)
    # as if killed after cycle 1's checkpoint: cycle 2's events are stale
    (out / "checkpoint.prev.pt").replace(out / "checkpoint.pt")
    code, _, err = run_cli(["run", tmp_path / "h.toml", "--resume", out, "--quiet"])
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    main = _accumulator(out / tb.FOLDER)
    fine = [r for r in rows if r["level"] == "fine" and r["train_loss"] is not None]
    events = main.Scalars("train_loss/fine")
    assert [e.step for e in events] == [round(100 * r["global_epoch"]) for r in fine]
    assert [e.value for e in events] == pytest.approx([r["train_loss"] for r in fine])
    assert len(main.Tensors("hierarchy/text_summary")) == 1
