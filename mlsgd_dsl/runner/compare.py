"""Side-by-side comparison of finished runs: one markdown table and one overlay plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlsgd_dsl.errors import UserError
from mlsgd_dsl.runner.plots import plot_overlay
from mlsgd_dsl.runner.records import JSONL_NAME, read_rows
from mlsgd_dsl.runner.summary import SUMMARY_JSON, markdown_table

COMPARE_PNG = "compare.png"


def _read_summary(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise UserError("run folder does not exist", file=str(run_dir))
    path = run_dir / SUMMARY_JSON
    if not path.is_file():
        raise UserError(f"no {SUMMARY_JSON} in this run folder (the run did not finish, or "
                        "this is not a run folder)", file=str(run_dir))
    if not (run_dir / JSONL_NAME).is_file():
        raise UserError(f"no {JSONL_NAME} in this run folder", file=str(run_dir))
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{SUMMARY_JSON} is not readable JSON ({exc})", file=str(run_dir)) from exc
    if not isinstance(summary, dict):
        raise UserError(f"{SUMMARY_JSON} does not hold a JSON object", file=str(run_dir))
    return summary


def _column_names(run_dirs: list[Path]) -> list[str]:
    """Folder names; runs whose names clash get their parent folder in front."""
    names = [d.resolve().name or str(d) for d in run_dirs]
    names = [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n
             for d, n in zip(run_dirs, names)]
    # Still equal (same folder twice, or same parent name): number them, the plot needs keys.
    return [f"{n} ({names[:i].count(n) + 1})" if names.count(n) > 1 else n
            for i, n in enumerate(names)]


def compare(run_dirs: list[Path], *, out: Path | None = None, title: str = "validation accuracy",
            time_key: str = "train_time") -> str:
    """The runs' summaries side by side (markdown); writes ``compare.png`` into ``out``."""
    if not run_dirs:
        raise UserError("compare needs at least one run folder")
    run_dirs = [Path(d) for d in run_dirs]
    summaries = [_read_summary(d) for d in run_dirs]
    names = _column_names(run_dirs)
    columns = [{**s, "name": name} for s, name in zip(summaries, names)]
    overlay = {name: read_rows(d) for name, d in zip(names, run_dirs)}
    out_dir = Path(out) if out is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_overlay(overlay, out_dir / COMPARE_PNG, title=title, time_key=time_key)
    return markdown_table(columns)
