"""The per-epoch metrics log: ``metrics.csv`` for people, ``metrics.jsonl`` for programs.

Every row is written with one ``write`` call per file, then flushed and fsynced, so after a
SIGKILL each file holds complete lines plus at most one partial last line. On resume the
trainer passes the row count its checkpoint was taken at; both files are cut back to exactly
that many rows, which drops the partial line and any rows written after the checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlsgd_dsl.errors import RunError, UserError

COLUMNS: tuple[str, ...] = (
    "cycle", "level", "visit_epoch", "epoch", "global_epoch", "lr", "train_loss", "train_acc",
    "val_loss", "val_acc", "wall_time", "train_time", "event", "val_acc_running",
)
CSV_NAME = "metrics.csv"
JSONL_NAME = "metrics.jsonl"


def to_json_value(value: Any) -> Any:
    """A plain JSON value: 0-d tensors → numbers, non-finite floats → None, paths → str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # strict JSON has no NaN/Infinity
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors: scalar → number
        return to_json_value(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form: "0.1", "nan", "inf"
    # One CSV record per physical line, so truncation can count newlines.
    return str(value).replace("\r", " ").replace("\n", " ")


def _append_line(path: Path, line: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def _truncate_to_lines(path: Path, keep: int) -> int:
    """Keep the first ``keep`` complete lines; return how many complete lines there were."""
    data = path.read_bytes() if path.exists() else b""
    offset = 0
    complete = 0
    while complete < keep:
        end = data.find(b"\n", offset)
        if end < 0:
            break
        offset = end + 1
        complete += 1
    if complete == keep and offset != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(offset)
            handle.flush()
            os.fsync(handle.fileno())
    return complete


class MetricsLog:
    """Appends one row per epoch to ``out_dir/metrics.csv`` and ``out_dir/metrics.jsonl``.

    ``resume_rows=None`` starts a fresh log (existing files are replaced); ``resume_rows=N``
    keeps exactly the first N rows of both files and continues after them.
    """

    def __init__(self, out_dir: Path, *, resume_rows: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / CSV_NAME
        self.jsonl_path = self.out_dir / JSONL_NAME
        header = self._csv_line(dict(zip(COLUMNS, COLUMNS)))
        if resume_rows is None:
            for path, start in ((self.csv_path, header), (self.jsonl_path, b"")):
                path.write_bytes(start)
            self._rows = 0
            return
        if resume_rows < 0:
            raise ValueError(f"resume_rows must be >= 0, got {resume_rows}")
        found = _truncate_to_lines(self.jsonl_path, resume_rows)
        if found < resume_rows:
            raise RunError(f"the checkpoint was taken after {resume_rows} metric rows but "
                           f"only {found} complete rows are on disk; cannot resume this log",
                           file=str(self.jsonl_path))
        if _truncate_to_lines(self.csv_path, resume_rows + 1) < resume_rows + 1:
            # The CSV is a readable copy: rebuild it from the JSONL rather than refuse.
            self._rebuild_csv(header)
        self._rows = resume_rows

    @property
    def rows_written(self) -> int:
        """Data rows in the log, counting those kept from before a resume."""
        return self._rows

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one row to both files; keys outside :data:`COLUMNS` go to the JSONL only."""
        record = {key: to_json_value(row.get(key)) for key in COLUMNS}
        record.update({str(k): to_json_value(v) for k, v in row.items() if k not in COLUMNS})
        _append_line(self.csv_path, self._csv_line(row))
        line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
        _append_line(self.jsonl_path, line.encode("utf-8"))
        self._rows += 1

    @staticmethod
    def _csv_line(row: Mapping[str, Any]) -> bytes:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerow([_csv_cell(row.get(c)) for c in COLUMNS])
        return text.getvalue().encode("utf-8")

    def _rebuild_csv(self, header: bytes) -> None:
        lines = [header] + [self._csv_line(row) for row in read_rows(self.out_dir)]
        self.csv_path.write_bytes(b"".join(lines))


def read_rows(out_dir: Path) -> list[dict[str, Any]]:
    """All complete rows of ``out_dir/metrics.jsonl`` (a partial last line is skipped)."""
    path = Path(out_dir) / JSONL_NAME
    if not path.is_file():
        raise UserError("no metrics.jsonl (the run has not logged an epoch yet)",
                        file=str(out_dir))
    data = path.read_text(encoding="utf-8")
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        lines.pop()  # no newline after it: interrupted mid-write
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"line {number} is not valid JSON ({exc.msg})", file=str(path)) from exc
    return rows
