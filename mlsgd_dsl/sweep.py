"""Sweeps: every combination of a few settings and seeds, one run folder each, then the medians.

``mlsgd-dsl run FILE --sweep mlsgd.lr=0.01,0.05 --seeds 3`` trains 2 × 3 runs one after the
other into ``runs/NAME-sweep/mlsgd.lr=0.01,seed=0`` and so on (``--out`` names the sweep
folder), then prints the ``compare`` table with the median of the seeds per combination and
writes ``compare.png`` (every run's curve) into the sweep folder. Seeds are ``mlsgd.seed``,
``mlsgd.seed + 1``, ... (the data split, ``data.seed``, stays the same). Running the same
command again skips finished runs (``summary.json`` present), resumes interrupted ones from
their checkpoint and starts the rest — so an interrupted sweep is continued by rerunning it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunError, UserError
from .runner.checkpoint import atomic_write_bytes

MANIFEST = "sweep.json"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class Combination:
    settings: tuple[tuple[str, str], ...]  # (key path, value as written)
    seed: int | None

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.settings) or "(file)"

    @property
    def folder(self) -> str:
        parts = [f"{k}={v}" for k, v in self.settings]
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        name = ",".join(parts) or "run"
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)[:150]

    def overrides(self) -> list[str]:
        out = [f"{k}={v}" for k, v in self.settings]
        if self.seed is not None:
            out.append(f"mlsgd.seed={self.seed}")
        return out


def split_values(text: str) -> list[str]:
    """``0.01,0.05`` → two values; commas inside ``[...]``, ``{...}`` or quotes do not split."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_sweeps(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["mlsgd.lr=0.01,0.05"]`` → ``[("mlsgd.lr", ["0.01", "0.05"])]``."""
    out: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        values = split_values(rest) if sep else []
        if not key or not values or any(not v for v in values):
            raise UserError(f"--sweep {item}: expected KEY.PATH=VALUE1,VALUE2,...")
        if key in (k for k, _ in out):
            raise UserError(f"--sweep {item}: {key} is swept twice; list all values once")
        if key == "mlsgd.seed":
            raise UserError(f"--sweep {item}: use --seeds N for seeds")
        out.append((key, values))
    return out


def combinations(sweeps: Sequence[tuple[str, list[str]]], seeds: int | None,
                 base_seed: int) -> list[Combination]:
    keys = [k for k, _ in sweeps]
    seed_list: list[int | None] = [base_seed + i for i in range(seeds)] if seeds else [None]
    return [Combination(tuple(zip(keys, values)), seed)
            for values in itertools.product(*(v for _, v in sweeps)) for seed in seed_list]


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _median_time(values: list[float | None]) -> float | None:
    """Median time to a threshold; a run that never reached it counts as infinitely late."""
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else m


def median_summary(label: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``compare`` column: the median over a combination's seeds."""
    first = summaries[0]
    out: dict[str, Any] = {k: first[k] for k in ("method", "lr", "schedule", "correction",
                                                  "variance_reduction") if k in first}
    n = len(summaries)
    out["name"] = f"{label} (median of {n})" if n > 1 else label
    for key in ("train_acc", "val_acc", "test_acc", "training_time"):
        out[key] = _median([s.get(key) for s in summaries])
    keys = {k for s in summaries for k in s.get("time_to", {})}
    out["time_to"] = {k: _median_time([s.get("time_to", {}).get(k) for s in summaries])
                      for k in keys}
    return out


def _done(folder: Path) -> bool:
    return (folder / SUMMARY).is_file()


def _resumable(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("checkpoint.pt", "checkpoint.prev.pt"))


def run_sweep(file: Path, overrides: Sequence[str], sweep: Sequence[str], seeds: int | None,
              *, out: Path | None = None, device: str | None = None, quiet: bool = False,
              validate: bool = True) -> str:
    """Train every combination not finished yet; return the table of medians (markdown)."""
    from .compiler import compile as compile_hierarchy
    from .loader import load
    from .runner.plots import plot_overlay
    from .runner.records import read_rows
    from .runner.run import run
    from .runner.summary import markdown_table

    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds {seeds}: expected a positive number of seeds")
    sweeps = parse_sweeps(sweep)
    base = load(file, list(overrides))  # the file and the fixed overrides, checked once
    combos = combinations(sweeps, seeds, base.mlsgd.seed)
    out = Path(out) if out is not None else Path("runs") / f"{base.name}-sweep"
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"file": str(file), "overrides": list(overrides),
                "sweep": {k: v for k, v in sweeps}, "seeds": seeds,
                "runs": [c.folder for c in combos]}
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    for i, combo in enumerate(combos, start=1):
        folder = out / combo.folder
        if _done(folder):
            state = "finished, skipped"
        else:
            state = "resumed" if _resumable(folder) else "started"
        print(f"sweep {i}/{len(combos)}: {combo.label}"
              f"{'' if combo.seed is None else f', seed {combo.seed}'} — {state} ({folder})",
              file=sys.stderr)
        if state.startswith("finished"):
            continue
        compiled = compile_hierarchy(load(file, [*overrides, *combo.overrides()]))
        try:
            run(compiled, out_dir=folder, resume=folder if state == "resumed" else None,
                device=device, quiet=quiet, validate=validate)
        except RunError as exc:
            raise RunError(f"sweep run {combo.folder}: {exc.message}; run the same sweep "
                           "command again to continue the unfinished runs",
                           file=exc.file) from None
    groups: dict[str, list[dict[str, Any]]] = {}
    overlay: dict[str, list[dict[str, Any]]] = {}
    for combo in combos:
        folder = out / combo.folder
        summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        groups.setdefault(combo.label, []).append(summary)
        overlay[combo.folder] = read_rows(folder)
    try:
        plot_overlay(overlay, out / "compare.png", title="validation accuracy",
                     time_key="train_time")
    except ImportError:  # matplotlib missing: the table has the numbers
        pass
    return markdown_table([median_summary(label, s) for label, s in groups.items()])
