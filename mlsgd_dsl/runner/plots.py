"""Accuracy-over-time plots as in the thesis' Figures 4.3/4.4 (PNG, no display needed).

Figures are drawn on a bare Agg canvas rather than through pyplot, so plotting never touches
the global backend or a display and leaks no open figures.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlsgd_dsl.runner.checkpoint import atomic_write_bytes
from mlsgd_dsl.runner.summary import finest_level

_SIZE_INCHES = (8.0, 5.0)
_DPI = 100  # 800 × 500 pixels


def _series(rows: Sequence[Mapping[str, Any]], key: str, time_key: str,
            level: str | None) -> tuple[list[float], list[float]]:
    """(minutes, percent) of the rows of ``level`` that have both ``key`` and ``time_key``."""
    minutes, percent = [], []
    for row in rows:
        if level is not None and row.get("level") != level:
            continue
        value, time = row.get(key), row.get(time_key)
        if value is None or time is None:
            continue
        minutes.append(float(time) / 60.0)
        percent.append(100.0 * float(value))
    return minutes, percent


def _new_axes(title: str, time_key: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=_SIZE_INCHES, dpi=_DPI)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel("training time [min]" if time_key == "train_time" else "wall time [min]")
    axes.set_ylabel("accuracy [%]")
    axes.grid(True, alpha=0.3)
    return figure, axes


def _save(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=_DPI)
    atomic_write_bytes(Path(path), buffer.getvalue())


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str,
                  level: str | None = None, time_key: str = "train_time") -> None:
    """Train and validation accuracy of the finest level (or ``level``) against time."""
    level = level if level is not None else finest_level(rows)
    figure, axes = _new_axes(title, time_key)
    for key, label in (("train_acc", "training accuracy"), ("val_acc", "validation accuracy")):
        minutes, percent = _series(rows, key, time_key, level)
        if minutes:
            axes.plot(minutes, percent, marker=".", label=label)
    if axes.lines:
        axes.legend(loc="lower right")
    _save(figure, path)


def plot_overlay(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, *, title: str,
                 time_key: str = "train_time") -> None:
    """Validation accuracy of several runs (name → rows) in one plot."""
    figure, axes = _new_axes(title, time_key)
    for name, rows in runs.items():
        minutes, percent = _series(rows, "val_acc", time_key, None)
        if minutes:
            axes.plot(minutes, percent, marker=".", label=name)
    if axes.lines:
        axes.legend(loc="lower right")
    _save(figure, path)


def plot_contenders(curves: Mapping[str, Sequence[Sequence[tuple[float, float]]]], path: Path,
                    *, title: str) -> None:
    """Validation accuracy against training time: one colour per contender, one line per
    seed (``curves``: contender → per seed a list of (seconds, accuracy))."""
    from matplotlib import rcParams

    figure, axes = _new_axes(title, "train_time")
    palette = rcParams["axes.prop_cycle"].by_key().get("color") or ["C0"]
    for k, (name, seeds) in enumerate(curves.items()):
        color = palette[k % len(palette)]
        for i, curve in enumerate(seeds):
            if curve:
                axes.plot([t / 60.0 for t, _ in curve], [100.0 * a for _, a in curve],
                          marker=".", color=color, alpha=0.8, label=name if i == 0 else None)
    if axes.lines:
        axes.legend(loc="lower right")
    _save(figure, path)
