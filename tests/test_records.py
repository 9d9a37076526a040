"""What a run leaves on disk: metrics log, checkpoints, RNG state, summary, plots, compare."""

from __future__ import annotations

import csv
import json
import random
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from mlsgd_dsl.errors import RunError, UserError
from mlsgd_dsl.runner.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mlsgd_dsl.runner.compare import compare
from mlsgd_dsl.runner.plots import plot_accuracy, plot_overlay
from mlsgd_dsl.runner.records import COLUMNS, MetricsLog, read_rows
from mlsgd_dsl.runner.summary import (
    build_summary,
    format_duration,
    markdown_table,
    time_to_thresholds,
    write_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(i: int, **extra) -> dict:
    return {"cycle": i // 3, "level": "fine" if i % 3 == 2 else "coarse", "visit_epoch": 1,
            "epoch": i, "global_epoch": i + 1, "lr": 0.05, "train_loss": 1.0 / (i + 1),
            "train_acc": 0.5 + 0.04 * i, "val_acc": 0.5 + 0.04 * i if i % 3 == 2 else None,
            "val_loss": None, "wall_time": 70.0 * (i + 1), "train_time": 60.0 * (i + 1),
            "event": "", **extra}


def _csv_rows(out: Path) -> list[list[str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return list(csv.reader(handle))


# --- metrics log -------------------------------------------------------------------------

def test_append_writes_both_files(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.append(_row(0, grad_norm=torch.tensor(2.5)))
    log.append({"level": "fine", "event": "rejected:angle", "train_loss": float("nan")})
    assert log.rows_written == 2
    table = _csv_rows(tmp_path)
    assert tuple(table[0]) == COLUMNS and len(table) == 3
    assert table[1][COLUMNS.index("lr")] == "0.05"
    assert table[1][COLUMNS.index("val_acc")] == ""  # None → empty cell
    rows = read_rows(tmp_path)
    assert rows[0]["grad_norm"] == 2.5 and "grad_norm" not in table[0]  # extras: JSONL only
    assert rows[1]["event"] == "rejected:angle" and rows[1]["train_loss"] is None
    assert rows[1]["cycle"] is None


def test_resume_truncates_without_duplicates(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    for i in range(5):
        log.append(_row(i))
    # A SIGKILL mid-write leaves half a line in each file.
    for name in ("metrics.csv", "metrics.jsonl"):
        with open(tmp_path / name, "ab") as handle:
            handle.write(b'{"cycle": 9, "lev')
    assert len(read_rows(tmp_path)) == 5  # the partial line is not a row

    log = MetricsLog(tmp_path, resume_rows=3)  # checkpoint was taken after 3 rows
    assert log.rows_written == 3
    for i in range(3, 6):
        log.append(_row(i))
    rows = read_rows(tmp_path)
    assert [r["epoch"] for r in rows] == list(range(6))
    table = _csv_rows(tmp_path)
    assert tuple(table[0]) == COLUMNS
    assert [int(r[COLUMNS.index("epoch")]) for r in table[1:]] == list(range(6))


def test_resume_rebuilds_short_csv_and_refuses_short_jsonl(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    for i in range(3):
        log.append(_row(i))
    (tmp_path / "metrics.csv").write_text("cyc")  # killed before the CSV got its rows
    MetricsLog(tmp_path, resume_rows=3)
    assert len(_csv_rows(tmp_path)) == 4
    with pytest.raises(RunError, match="only 3 complete rows"):
        MetricsLog(tmp_path, resume_rows=4)


def test_fresh_log_replaces_old_files(tmp_path: Path) -> None:
    MetricsLog(tmp_path).append(_row(0))
    log = MetricsLog(tmp_path)
    assert log.rows_written == 0 and read_rows(tmp_path) == []
    assert len(_csv_rows(tmp_path)) == 1


def test_read_rows_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no metrics.jsonl"):
        read_rows(tmp_path)


# --- checkpoints -------------------------------------------------------------------------

def _payload(step: int) -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng_state(), "levels": ["fine", "coarse"], "lr": 0.05,
            "shape": (2, 3), "meta": OrderedDict(name="run", out=Path("/tmp/x"))}


def test_checkpoint_roundtrip_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    payload = _payload(1)
    save_checkpoint(path, payload)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and loaded["shape"] == (2, 3)
    assert loaded["meta"]["out"] == "/tmp/x"  # paths are stored as strings
    assert torch.equal(loaded["model"]["weight"], payload["model"]["weight"])
    assert load_checkpoint(path)["optimizer"]["param_groups"][0]["momentum"] == 0.9


def test_checkpoint_rotation_and_crash_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(path, _payload(1))
    save_checkpoint(path, _payload(2))
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["step"] == 1
    # A crash while writing step 3 leaves only a half-written temp file behind.
    (tmp_path / ".checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint(path)["step"] == 2
    save_checkpoint(path, _payload(3))  # the stale temp file is simply overwritten
    assert load_checkpoint(path)["step"] == 3
    assert not (tmp_path / ".checkpoint.pt.tmp").exists()
    # If the newest file is damaged anyway, the previous complete copy is found.
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint.prev.pt"


def test_corrupt_checkpoint_message(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RunError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "corrupt" in str(info.value)
    assert "checkpoint.prev.pt" in str(info.value)
    with pytest.raises(RunError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_refuses_unloadable_payload(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\['extra'\]\[1\]: slice"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"extra": [1, slice(0, 2)]})
    assert not (tmp_path / "checkpoint.pt").exists()


def test_rng_state_roundtrip(tmp_path: Path) -> None:
    random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss value in the state
    save_checkpoint(tmp_path / "checkpoint.pt", {"rng": rng_state()})
    expected = ([random.random() for _ in range(3)], random.gauss(0, 1), torch.rand(4))
    random.seed(99)
    torch.manual_seed(99)
    set_rng_state(load_checkpoint(tmp_path / "checkpoint.pt")["rng"])
    got = ([random.random() for _ in range(3)], random.gauss(0, 1), torch.rand(4))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


# --- summary -----------------------------------------------------------------------------

def test_time_to_thresholds() -> None:
    rows = [{"val_acc": None, "train_time": 5.0}, {"val_acc": 0.70, "train_time": 10.0},
            {"val_acc": 0.81, "train_time": 20.0}, {"val_acc": 0.79, "train_time": 30.0},
            {"val_acc": 0.85, "train_time": 40.0, "wall_time": 50.0}]
    assert time_to_thresholds(rows, [0.8, 0.84, 0.9]) == {0.8: 20.0, 0.84: 40.0, 0.9: None}
    assert time_to_thresholds(rows, [0.8], time_key="wall_time") == {0.8: 50.0}


def _summary(name: str, rows: list[dict]) -> dict:
    return build_summary(rows, name=name, method="mlsgd", thresholds=[0.8, 0.85],
                         final={"train_acc": 0.9603, "val_acc": 0.8674, "test_acc": 0.8664,
                                "training_time": 7309.0, "lr": 0.05, "seed": 1})


def test_build_and_write_summary(tmp_path: Path) -> None:
    rows = [_row(i) for i in range(9)]
    summary = _summary("run-a", rows)
    assert summary["time_to"] == {"0.80": 540.0, "0.85": None}
    assert summary["epochs"] == {"coarse": 7, "fine": 8}
    assert summary["cycles"] == 3 and summary["seed"] == 1 and summary["finest_level"] == "fine"
    write_summary(tmp_path, summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    md = (tmp_path / "summary.md").read_text()
    for line in ("|  | run-a |", "| train acc | 96.03% |", "| test acc | 86.64% |",
                 "| training time | 2:01:49 |", "| start step size | 0.05 |",
                 "| time to 80% val acc | 0:09:00 |", "| time to 85% val acc | not reached |"):
        assert line in md, md


def test_markdown_table_columns_and_duration() -> None:
    rows = [_row(i) for i in range(6)]
    table = markdown_table([_summary("a", rows), _summary("b|c", rows)])
    assert table.splitlines()[0] == "|  | a | b\\|c |"
    assert all(line.count(" | ") == 2 for line in table.splitlines() if line[1] != "-")
    assert format_duration(3661.4) == "1:01:01" and format_duration(None) == "–"


# --- plots and compare -------------------------------------------------------------------

def test_plots_are_pngs(tmp_path: Path) -> None:
    rows = [_row(i) for i in range(9)]
    plot_accuracy(rows, tmp_path / "accuracy.png", title="run")
    plot_overlay({"a": rows, "b": rows[:4]}, tmp_path / "overlay.png", title="both")
    plot_accuracy([], tmp_path / "empty.png", title="no rows yet")
    for name in ("accuracy.png", "overlay.png", "empty.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def _finished_run(folder: Path, count: int) -> Path:
    log = MetricsLog(folder)
    rows = [_row(i) for i in range(count)]
    for row in rows:
        log.append(row)
    write_summary(folder, _summary(folder.name, rows))
    return folder


def test_compare_table_and_overlay(tmp_path: Path) -> None:
    a = _finished_run(tmp_path / "runs" / "mlsgd", 9)
    b = _finished_run(tmp_path / "runs" / "sgd", 6)
    table = compare([a, b], out=tmp_path / "cmp")
    assert table.splitlines()[0] == "|  | mlsgd | sgd |"
    assert "| time to 80% val acc | 0:09:00 | not reached |" in table
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_errors_name_the_folder(tmp_path: Path) -> None:
    good = _finished_run(tmp_path / "good", 3)
    missing = tmp_path / "missing"
    with pytest.raises(UserError, match="missing: run folder does not exist"):
        compare([good, missing], out=tmp_path)
    half = tmp_path / "half"
    MetricsLog(half).append(_row(0))
    with pytest.raises(UserError, match=r"half: no summary\.json"):
        compare([good, half], out=tmp_path)
