"""The run summary (``summary.json``) and its table in the shape of the thesis' Table 4.2.

Accuracies are fractions (0.8 = 80 %), times are seconds; the table prints percentages and
``h:mm:ss``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlsgd_dsl.runner.checkpoint import atomic_write_bytes
from mlsgd_dsl.runner.records import to_json_value

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
# Optional descriptive rows (summary key → row label), shown when any run has the key.
DESCRIPTIVE_ROWS: tuple[tuple[str, str], ...] = (
    ("lr", "start step size"),
    ("schedule", "step size regimen"),
    ("correction", "gradient correction"),
    ("variance_reduction", "variance reduction"),
)
_FINAL_KEYS = ("train_acc", "val_acc", "test_acc", "training_time")


def threshold_key(threshold: float) -> str:
    """``0.8`` → ``"0.80"``; more digits only where the threshold has them (``"0.845"``)."""
    text = f"{threshold:.2f}"
    return text if float(text) == threshold else repr(float(threshold))


def time_to_thresholds(rows: Iterable[Mapping[str, Any]], thresholds: Iterable[float], *,
                       time_key: str = "train_time") -> dict[float, float | None]:
    """First ``time_key`` at which ``val_acc`` reached each threshold (None: never)."""
    reached: dict[float, float | None] = {float(t): None for t in thresholds}
    for row in rows:
        acc, time = row.get("val_acc"), row.get(time_key)
        if acc is None or time is None:
            continue
        for threshold, first in reached.items():
            if first is None and acc >= threshold:
                reached[threshold] = float(time)
    return reached


def finest_level(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The level the trainer validates: the last row with a val_acc, else the last row."""
    for row in reversed(rows):
        if row.get("val_acc") is not None:
            return row.get("level")
    return rows[-1].get("level") if rows else None


def _epochs_per_level(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    epochs: dict[str, float] = {}
    for row in rows:
        level = str(row.get("level"))
        # `epoch` counts that level's epochs over the run; without it count the rows.
        value = row.get("epoch")
        value = epochs.get(level, 0) + 1 if value is None else value
        epochs[level] = max(epochs.get(level, 0), value)
    return epochs


def build_summary(rows: Sequence[Mapping[str, Any]], *, name: str, method: str,
                  thresholds: list[float], final: Mapping[str, Any],
                  time_key: str = "train_time") -> dict[str, Any]:
    """The JSON-able summary; ``final`` entries beyond the four required ones are copied.

    ``cycles`` is ``final["cycles"]`` when given (the trainer knows whether the last cycle
    finished), else the number of cycle indices seen in the rows.
    """
    missing = [key for key in _FINAL_KEYS if key not in final]
    if missing:
        raise KeyError(f"build_summary: final lacks {', '.join(missing)}")
    cycle_ids = [row["cycle"] for row in rows if row.get("cycle") is not None]
    reached = time_to_thresholds(rows, thresholds, time_key=time_key)
    summary: dict[str, Any] = {
        "name": name,
        "method": method,
        **{key: final[key] for key in _FINAL_KEYS},
        "time_to": {threshold_key(t): s for t, s in reached.items()},
        "time_key": time_key,
        "epochs": _epochs_per_level(rows),
        "cycles": final.get("cycles", max(cycle_ids) + 1 if cycle_ids else 0),
        "finest_level": finest_level(rows),
        "rows": len(rows),
    }
    summary.update({k: v for k, v in final.items() if k not in summary})
    return to_json_value(summary)


def format_duration(seconds: float | None) -> str:
    """Seconds → ``h:mm:ss`` as in the thesis' tables (``–`` when unknown)."""
    if seconds is None:
        return "–"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}%"


def _cell(text: Any) -> str:
    return "–" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(summaries: list[dict]) -> str:
    """One column per run: train/val/test accuracy, training time, time to each threshold."""
    header = ["", *(_cell(s.get("name")) for s in summaries)]
    body: list[list[str]] = [["method", *(_cell(s.get("method")) for s in summaries)]]
    for key, label in DESCRIPTIVE_ROWS:
        if any(key in s for s in summaries):
            body.append([label, *(_cell(s.get(key)) for s in summaries)])
    for key, label in (("train_acc", "train acc"), ("val_acc", "val acc"),
                       ("test_acc", "test acc")):
        body.append([label, *(_percent(s.get(key)) for s in summaries)])
    body.append(["training time",
                 *(format_duration(s.get("training_time")) for s in summaries)])
    keys = sorted({k for s in summaries for k in s.get("time_to", {})}, key=float)
    for key in keys:
        label = f"time to {100 * float(key):g}% val acc"
        cells = []
        for s in summaries:
            time_to = s.get("time_to", {})
            reached = time_to.get(key)
            cells.append(format_duration(reached) if reached is not None
                         else "not reached" if key in time_to else "–")
        body.append([label, *cells])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, summary: dict) -> None:
    """Write ``summary.json`` and ``summary.md`` (a one-column table) atomically."""
    out_dir = Path(out_dir)
    text = json.dumps(to_json_value(summary), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out_dir / SUMMARY_JSON, text.encode("utf-8"))
    title = f"# {summary.get('name', out_dir.name)}\n\n"
    atomic_write_bytes(out_dir / SUMMARY_MD, (title + markdown_table([summary])).encode("utf-8"))
