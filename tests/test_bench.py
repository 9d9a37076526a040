"""``mlsgd-dsl bench``: contenders at equal budgets, interleaved, resumable, one table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _runner_nets import hierarchy_text

from mlsgd_dsl.bench import (
    Record,
    as_override,
    contender_overrides,
    parse_contenders,
    run_bench,
    table,
)
from mlsgd_dsl.cli import main
from mlsgd_dsl.errors import UserError


def test_table_ratios_are_per_seed() -> None:
    def rec(name, seed, curve, final):
        return Record(name, seed, f"{name}-seed{seed}", final_val=final, curve=curve)

    records = {
        "sgd": {0: rec("sgd", 0, [(10, 0.5), (20, 0.7), (40, 0.8)], 0.8),
                1: rec("sgd", 1, [(10, 0.6), (30, 0.7), (40, 0.82)], 0.82)},
        "file": {0: rec("file", 0, [(5, 0.7), (20, 0.85)], 0.85),
                 1: rec("file", 1, [(15, 0.7), (40, 0.79)], 0.79)},
    }
    text = table(records, ["file", "sgd"], [0, 1], [0.7, 0.8])
    row = next(line for line in text.splitlines() if line.startswith("| file"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # final 85 / 79 %; Δ +5 / −3 points; sgd's final acc: seed 0 at 20 s vs 40 s, seed 1 never
    assert cells[1] == "82.00 (79.00–85.00)"
    assert cells[2] == "+1.00 (-3.00–+5.00)"
    assert cells[3] == "0.50 [1/2]"
    # to 70 %: 5 and 15 s; ratios 5/20 = 0.25 and 15/30 = 0.5
    assert cells[4] == "10 (5–15)" and cells[5] == "0.38 (0.25–0.50)"
    # to 80 %: only seed 0 (20 s, ratio 0.5)
    assert cells[6] == "20 [1/2]" and cells[7] == "0.50 [1/2]"


def test_contenders_are_checked() -> None:
    assert parse_contenders("file, sgd") == ["file", "sgd"]
    for bad in ("file,bogus", "", "sgd,sgd"):
        with pytest.raises(UserError, match="--contenders"):
            parse_contenders(bad)


def test_baseline_is_a_practitioners_sgd() -> None:
    import mlsgd_dsl

    h = mlsgd_dsl.loads(hierarchy_text(), file="tiny.toml")
    sets = contender_overrides("sgd", h, budget=5.0, schedule="onecycle", baseline_lr=None)
    c = mlsgd_dsl.loads(hierarchy_text(), file="tiny.toml", overrides=sets).mlsgd
    assert c.method == "sgd" and c.plan == "auto" and c.time_budget == 5.0
    assert c.optimizer.momentum == 0.9 and c.lr == 0.1 and c.schedule.kind == "onecycle"
    assert c.init == "independent"


def test_baseline_keeps_the_files_warmup() -> None:
    # AdamW without its warm-up is not what a practitioner runs (the ViT files)
    import mlsgd_dsl

    schedule = '[mlsgd]\nschedule = { kind = "cosine", warmup = 2 }'
    text = hierarchy_text().replace("[mlsgd]", schedule)
    h = mlsgd_dsl.loads(text, file="tiny.toml")
    cosine = contender_overrides("sgd", h, budget=5.0, schedule="cosine", baseline_lr=None)
    assert mlsgd_dsl.loads(text, file="tiny.toml", overrides=cosine).mlsgd.schedule.warmup == 2


def test_bench_end_to_end(tmp_path: Path, capsys) -> None:
    f = tmp_path / "tiny.toml"
    f.write_text(hierarchy_text(batchnorm=True))
    out = tmp_path / "bench"
    args = ["bench", str(f), "--budget", "0.5", "--seeds", "2", "--contenders",
            "file,cascade,sgd", "--thresholds", "0.3,0.5", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"bench folder: {out}"
    assert [line.split("|")[1].strip() for line in lines[3:]] == ["file", "cascade", "sgd"]
    assert "× sgd to 30 %" in lines[1]
    # interleaved: seed 0 in the given order, seed 1 rotated
    order = [line.split(": ")[1].split(" — ")[0] for line in captured.err.splitlines()
             if line.startswith("bench ")]
    assert order == ["file, seed 0", "cascade, seed 0", "sgd, seed 0",
                     "cascade, seed 1", "sgd, seed 1", "file, seed 1"]
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "bench.json").read_text())
    assert len(manifest["records"]) == 6
    for rec in manifest["records"]:
        run = out / rec["folder"]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["training_time"] <= 0.5 + 0.5  # the budget stops a slow machine
        assert (run / "plan.json").is_file()
    # the planner measured into the bench's own cache: the three levels of the MLSGD runs
    # (file and cascade share them) and the baseline's finest level, once each
    costs = json.loads((out / "costs" / "costs.json").read_text())
    assert sorted(e["level"] for e in costs.values()) == ["coarse", "fine", "fine", "mid"]
    assert os.environ["MLSGD_DSL_CACHE"] != str(out / "costs")  # the user's setting is back
    cascade = json.loads((out / "cascade-seed0" / "summary.json").read_text())
    assert cascade["cycle_kind"] == "cascade"
    sgd = json.loads((out / "sgd-seed0" / "summary.json").read_text())
    assert sgd["method"] == "sgd"

    # the same command again: nothing retrained, the same table
    assert main(args) == 0
    again = capsys.readouterr()
    assert again.out == captured.out and again.err.count("finished, skipped") == 6
    # other settings into the same folder: refused, the runs kept
    assert main([*args[:3], "2.5", *args[4:]]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (out / "file-seed0" / "summary.json").is_file()


def test_custom_contenders_are_override_sets(tmp_path: Path, capsys) -> None:
    # what benchmarks/time_to_accuracy.py does: named configurations, ratios to one of them
    import mlsgd_dsl

    assert as_override(("mlsgd.optimizer", {"momentum": 0.9})) == \
        "mlsgd.optimizer={momentum = 0.9}"
    f = tmp_path / "tiny.toml"
    f.write_text(hierarchy_text())
    pair = ("mlsgd.schedule", {"kind": "constant"})
    with pytest.raises(UserError, match="bogus"):
        run_bench(f, [], budget=0.3, seeds=1, contenders=["slow", "bogus"],
                  custom={"slow": [pair]}, out=tmp_path / "x")
    text = run_bench(f, [("mlsgd.batch_size", 16)], budget=0.3, seeds=1,
                     contenders=["fast", "slow"], thresholds=[0.3], out=tmp_path / "b",
                     custom={"fast": ["mlsgd.lr=0.2"], "slow": [pair, "mlsgd.lr=0.01"]},
                     baseline="slow")
    assert "Δ to slow [points]" in text and "| fast |" in text
    resolved = mlsgd_dsl.load(tmp_path / "b" / "slow-seed0" / "resolved.toml")
    assert resolved.mlsgd.lr == 0.01 and resolved.mlsgd.schedule.kind == "constant"
    assert resolved.mlsgd.batch_size == 16 and resolved.mlsgd.plan == "auto"


def test_the_quickstart_bench_in_a_smoke_size(tmp_path: Path, capsys) -> None:
    """`mlsgd-dsl bench hierarchies/quickstart.toml --budget 60 --seeds 2`, as the README
    shows it, with less data and a shorter budget."""
    quickstart = Path(__file__).resolve().parents[1] / "hierarchies" / "quickstart.toml"
    out = tmp_path / "quickstart-bench"
    assert main(["bench", str(quickstart), "--budget", "2", "--seeds", "2", "--out", str(out),
                 "--set", "data.options={train=600, test=100, size=16, channels=1, seed=0}",
                 "--set", "data.validation=100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "time to sgd's final acc (× sgd's)" in lines[1]
    assert [line.split("|")[1].strip() for line in lines[3:]] == ["file", "cascade", "sgd"]
    assert all(r["final_val"] is not None
               for r in json.loads((out / "bench.json").read_text())["records"])
