"""A bench folder (``mlsgd-dsl bench … --out DIR``) as a section of RESULTS.md.

``python benchmarks/bench_report.py DIR --key KEY --title TITLE [--command CMD] [--load L]``
writes the bench's ratio table (against ``--reference``, default the bench's baseline, and any
further ``--also`` references) and one raw row per run: threshold times, final validation and
test accuracy, best validation accuracy, training and wall time, the budget plan, cycles,
finest epochs, evaluations, why it stopped, the BatchNorm re-estimation time. It runs nothing;
``benchmarks/time_to_accuracy.py`` uses the same tables for its own sections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import _common as C


def load_records(out: Path) -> tuple[dict[str, Any], dict[str, dict[int, Any]]]:
    """``bench.json``'s settings and its records by contender and seed."""
    from mlsgd_dsl.bench import Record

    manifest = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    records: dict[str, dict[int, Any]] = {}
    for r in manifest.get("records") or []:
        rec = Record(**{**r, "curve": [tuple(p) for p in r["curve"]]})
        records.setdefault(rec.contender, {})[rec.seed] = rec
    if not records:
        raise SystemExit(f"{out}: the bench has not finished (no records in bench.json)")
    return manifest["settings"], records


def raw_row(record: Any, folder: Path, thresholds: list[float]) -> list[Any]:
    """One run's line (see the module doc)."""
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    plan = {}
    if (folder / "plan.json").is_file():
        plan = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
    finest = summary.get("finest_level")
    return [record.contender, record.seed,
            *(C.fmt(record.time_to(t), "{:.1f}") for t in thresholds),
            C.pct(summary.get("val_acc")), C.pct(summary.get("test_acc")),
            C.pct(max((a for _, a in record.curve), default=None)),
            C.fmt(summary.get("training_time"), "{:.1f}"),
            C.fmt(summary.get("wall_time"), "{:.0f}"),
            f"{plan.get('cycles', '–')} × {C.fmt(plan.get('scale'), '{:.2f}')}",
            summary.get("cycles"),
            C.fmt((summary.get("epochs") or {}).get(finest), "{:.2f}"),
            len(record.curve), summary.get("stopped") or "–",
            C.fmt(summary.get("bn_time"), "{:.1f}")]


def tables(out: Path, thresholds: list[float], references: list[str]) -> str:
    """The ratio table against each reference, then the raw rows (folded)."""
    from mlsgd_dsl.bench import table

    settings, records = load_records(out)
    contenders = list(settings["contenders"])
    seeds = settings["seeds"]
    body = ""
    for ref in references:
        body += (f"\n**Against {ref}** (median (min–max) over seeds; [k/n]: reached in k of n "
                 "seeds; times in s of train_time; × ref: the per-seed ratio of the times, "
                 "< 1 faster; Δ: final validation accuracy minus the reference's, seed by "
                 "seed)\n\n")
        body += table(records, contenders, seeds, thresholds, ref)
    th = [f"{100 * t:g}%" for t in thresholds]
    body += "\n<details><summary>Raw runs (in the order they ran)</summary>\n\n" + C.table(
        ["contender", "seed", *(f"t {t}" for t in th), "val %", "test %", "best val %",
         "train time", "wall", "plan (cycles × epoch factor)", "cycles", "finest ep.",
         "evals", "stopped", "BN re-est. s"],
        [raw_row(records[n][s], out / f"{n}-seed{s}", thresholds)
         for i, s in enumerate(seeds) for n in C.rotate(contenders, i)])
    body += "\n</details>\n"
    return body


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the bench folder (holds bench.json)")
    p.add_argument("--key", required=True, help="RESULTS.md section key")
    p.add_argument("--title", required=True, help="section title")
    p.add_argument("--command", default=None, help="the bench command that filled the folder")
    p.add_argument("--load", default=None, help="load averages recorded around the bench")
    p.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")],
                   default=None, help="default: those of the bench's table (bench.md)")
    p.add_argument("--reference", default="sgd", help="contender the ratios are taken to")
    p.add_argument("--also", default="", help="comma-separated further references")
    p.add_argument("--note", action="append", default=[], help="a line added to the preamble")
    args = p.parse_args(argv)
    settings, _ = load_records(args.folder)
    thresholds = args.thresholds or [
        float(h.split("time to ")[1].split(" %")[0]) / 100
        for h in (args.folder / "bench.md").read_text(encoding="utf-8").splitlines()[0]
        .split("|") if h.strip().startswith("time to ") and "%" in h and "final" not in h]
    info = C.machine(args.device)
    lines = [
        f"- bench: `{args.command}`" if args.command else f"- bench folder: {args.folder}",
        f"- file: `{settings['file']}` with `{' '.join(settings['overrides'])}`",
        f"- budget: {settings['budget']:g} s of train_time per run; seeds {settings['seeds']}; "
        "contenders interleaved, order rotated per seed",
        "- contenders: " + "; ".join(f"{n}: `{' '.join(o[4:]) or '(the file)'}`"
                                     for n, o in settings["contenders"].items()),
        "- clock: the runner's train_time (training only; evaluation, BatchNorm re-estimation "
        "for it, checkpoints and logging excluded)",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; device "
        f"{info['device']}; versions: python {info['python']}, torch {info['torch']}, "
        f"mlsgd-dsl {info['mlsgd-dsl']}",
    ]
    if args.load:
        lines.append(f"- load average during the bench: {args.load}")
    lines += [f"- {note}" for note in args.note]
    body = "\n".join(lines) + "\n"
    refs = [args.reference, *(r for r in args.also.split(",") if r)]
    body += tables(args.folder, thresholds, refs)
    C.report(C.results_path(args), args.key, args.title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(C.cli(main))
