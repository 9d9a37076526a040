"""``mlsgd-dsl run FILE --sweep KEY=V1,V2 --seeds N``: one folder per combination, the compare
table of medians, and a rerun that resumes what an interrupted sweep left unfinished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _runner_nets import hierarchy_text

from mlsgd_dsl.errors import UserError
from mlsgd_dsl.sweep import combinations, median_summary, parse_sweeps, split_values

LEVELS = (("fine", 1.0, 2), ("coarse", 2.0, 1))


def test_values_split_on_top_level_commas_only():
    assert split_values("0.01,0.05") == ["0.01", "0.05"]
    assert split_values('[1, 2],[3],"a,b"') == ["[1, 2]", "[3]", '"a,b"']
    assert parse_sweeps(["mlsgd.lr=0.01,0.05", "mlsgd.cycle=\"V\",\"W\""]) == [
        ("mlsgd.lr", ["0.01", "0.05"]), ("mlsgd.cycle", ['"V"', '"W"'])]


@pytest.mark.parametrize("item, message", [
    ("mlsgd.lr", "expected KEY.PATH=VALUE1,VALUE2"),
    ("mlsgd.lr=0.1,", "expected KEY.PATH=VALUE1,VALUE2"),
    ("mlsgd.seed=1,2", "use --seeds N"),
])
def test_malformed_sweeps_are_usage_errors(item, message):
    with pytest.raises(UserError, match=message):
        parse_sweeps([item])


def test_every_combination_and_seed():
    combos = combinations([("a", ["1", "2"]), ("b", ["x"])], 3, base_seed=5)
    assert len(combos) == 6
    assert combos[0].overrides() == ["a=1", "b=x", "mlsgd.seed=5"]
    assert combos[-1].folder == "a=2,b=x,seed=7"


def test_medians_count_a_threshold_never_reached_as_late():
    runs = [{"val_acc": v, "train_acc": 0.5, "test_acc": 0.4, "training_time": t,
             "time_to": {"0.50": r}} for v, t, r in
            ((0.6, 10.0, 3.0), (0.8, 30.0, None), (0.7, 20.0, 5.0))]
    m = median_summary("lr=0.1", runs)
    assert (m["val_acc"], m["training_time"], m["time_to"]["0.50"]) == (0.7, 20.0, 5.0)
    assert median_summary("x", runs[1:2])["time_to"]["0.50"] is None
    assert m["name"] == "lr=0.1 (median of 3)"


def test_sweep_runs_each_combination_and_a_rerun_resumes(tmp_path, tmp_hierarchy, run_cli,
                                                          one_thread):
    text = hierarchy_text(LEVELS, train=64).replace(
        "[mlsgd]\n", "[mlsgd]\ncycles = 1\nepochs = { fine = 1, coarse = 1 }\n")
    path = tmp_hierarchy(text)
    out = tmp_path / "sweep"
    args = ["run", path, "--sweep", "mlsgd.lr=0.01,0.05", "--seeds", "2", "--out", out,
            "--quiet"]
    code, table, err = run_cli(args)
    assert code == 0, err
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["mlsgd.lr=0.01,seed=0", "mlsgd.lr=0.01,seed=1",
                       "mlsgd.lr=0.05,seed=0", "mlsgd.lr=0.05,seed=1"]
    assert "| mlsgd.lr=0.01 (median of 2) | mlsgd.lr=0.05 (median of 2) |" in table
    assert (out / "compare.png").is_file() and json.loads((out / "sweep.json").read_text())
    page = (Path(__file__).resolve().parents[1] / "docs" / "sweeps.md").read_text()
    assert all(f"{f}/" in page for f in folders[:2])  # the page shows the real folder names
    lr = json.loads((out / "mlsgd.lr=0.05,seed=1" / "resolved.json").read_text())["mlsgd"]
    assert (lr["lr"], lr["seed"]) == (0.05, 1)
    vals = {f: json.loads((out / f / "summary.json").read_text())["val_acc"] for f in folders}
    median = sorted([vals["mlsgd.lr=0.01,seed=0"], vals["mlsgd.lr=0.01,seed=1"]])
    assert f"{100 * sum(median) / 2:.2f}%" in table.split("val acc")[1].split("\n")[0]

    # interrupted: one run without its summary (its checkpoint remains), one never started
    (out / "mlsgd.lr=0.01,seed=1" / "summary.json").unlink()
    for f in (out / "mlsgd.lr=0.05,seed=1").iterdir():
        f.unlink()
    (out / "mlsgd.lr=0.05,seed=1").rmdir()
    code, again, err = run_cli(args)
    assert code == 0, err
    states = [line.split(" — ")[1].split(" (")[0] for line in err.splitlines()
              if line.startswith("sweep ")]
    assert states == ["finished, skipped", "resumed", "finished, skipped", "started"]
    assert json.loads((out / "mlsgd.lr=0.05,seed=1" / "summary.json").read_text())[
        "val_acc"] == vals["mlsgd.lr=0.05,seed=1"]  # seeded: the same run again
    def accuracy_rows(text: str) -> list[str]:
        return [line for line in text.splitlines() if " acc |" in line]

    assert accuracy_rows(again) == accuracy_rows(table)  # times differ, accuracies do not


def test_resume_with_sweep_is_a_usage_error(tmp_path, tmp_hierarchy, run_cli):
    path = tmp_hierarchy(hierarchy_text(LEVELS))
    code, _, err = run_cli(["run", path, "--seeds", "2", "--resume", tmp_path])
    assert code == 2 and "run the same sweep again" in err
