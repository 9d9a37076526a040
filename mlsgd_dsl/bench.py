"""``mlsgd-dsl bench FILE``: MLSGD against the SGD a practitioner would use, at equal budgets.

Every contender trains the same finest network on the same data for the same training time
(``--budget`` seconds of ``train_time``; evaluation and checkpoints excluded), with
``mlsgd.plan = "auto"``: cycles and epochs are planned from the levels' measured costs so that
each contender's schedule ends with the budget. Contenders (``--contenders``):

* ``file`` — the hierarchy as written (its cycle kind and MLSGD settings);
* ``V``, ``W``, ``F``, ``cascade``, ``fmg`` — the same file with ``mlsgd.cycle`` set to it;
* ``sgd`` — the baseline: the finest level alone (``method = "sgd"``, its own
  initialisation), the finest level's optimiser with momentum 0.9 when the file has none, its
  learning rate (``--baseline-lr``), a cosine or one-cycle schedule over the budget
  (``--baseline-schedule``).

The runs are interleaved — seed by seed, the contenders' order rotated from seed to seed — so
a drifting machine hits them alike. The bench folder (``--out``, default
``runs/NAME-bench``) holds one run folder per contender and seed, ``bench.json`` (settings and
per-seed numbers), ``bench.md`` (the table printed at the end), ``bench.png`` (validation
accuracy against training time, one colour per contender) and ``costs/costs.json``: the
planner's measured costs, measured at each level configuration's first run of the bench and
reused by the later seeds (never a cache from earlier sessions, which may come from another
load on the machine). Rerunning the same command skips
finished runs and resumes interrupted ones; a folder holding a bench with other settings is
refused unless ``--overwrite``.

Numbers: the time to each threshold (median and min–max over seeds, ``[k/n]`` when only k of
n seeds reach it) and its ratio to the baseline's, seed by seed; the time to the baseline's
final validation accuracy as a ratio of the baseline's own time to it; the final validation
accuracy and its difference to the baseline's (accuracy at equal time).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch

from .errors import RunError, UserError
from .runner.checkpoint import atomic_write_bytes

MANIFEST = "bench.json"
COSTS = "costs"  # the planner's cache of this bench (costs/costs.json)
KINDS = ("V", "W", "F", "cascade", "fmg")
CONTENDERS = ("file", *KINDS, "sgd")
DEFAULT_CONTENDERS = ("file", "cascade", "sgd")
BASELINE = "sgd"
BASELINE_MOMENTUM = 0.9


@dataclass
class Record:
    contender: str
    seed: int
    folder: str
    final_val: float | None = None
    train_time: float | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (train_time, val_acc)

    def time_to(self, accuracy: float) -> float | None:
        for t, acc in self.curve:
            if acc >= accuracy - 1e-12:
                return t
        return None


def parse_contenders(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names:
        raise UserError(f"--contenders {text!r}: expected a comma-separated list of "
                        f"{', '.join(CONTENDERS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--contenders {text!r}: a contender is named twice")
    return names


def contender_overrides(name: str, base: Any, *, budget: float, schedule: str,
                        baseline_lr: float | None) -> list[str]:
    """The ``--set`` overrides that turn the file into contender ``name``."""
    common = [f"mlsgd.time_budget={budget!r}", 'mlsgd.plan="auto"',
              'mlsgd.eval.every="epoch"', "report.plot=false"]
    if name == "file":
        return common
    if name in KINDS:
        return [*common, f'mlsgd.cycle="{name}"']
    # the baseline: the finest network alone, a practitioner's SGD
    from .schema import for_level

    finest = list(base.levels)[0]
    opt = for_level(base.mlsgd.optimizer, finest).model_dump(mode="json")
    if opt["name"] == "sgd" and opt["momentum"] == 0:
        opt["momentum"] = BASELINE_MOMENTUM
    lr = baseline_lr if baseline_lr is not None else for_level(base.mlsgd.lr, finest)
    table = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in opt.items()) + "}"
    # a per-level optimizer table is replaced level by level (a plain table would be merged
    # into it key by key, mixing level names and options)
    optimizer = ([f"mlsgd.optimizer.{level}={table}" for level in base.mlsgd.optimizer]
                 if isinstance(base.mlsgd.optimizer, dict) else [f"mlsgd.optimizer={table}"])
    return [*common, 'mlsgd.method="sgd"', f"mlsgd.lr={float(lr)!r}", *optimizer,
            'mlsgd.init="independent"', f'mlsgd.schedule={{kind = "{schedule}"}}']


def _folder_name(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def _rotate(items: Sequence[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


def _spread(values: Sequence[float | None], fmt: str = "{:.1f}") -> str:
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:
        return f"never [0/{len(values)}]" if values else "–"
    text = fmt.format(statistics.median(known))
    if len(known) > 1:
        text += f" ({fmt.format(min(known))}–{fmt.format(max(known))})"
    if len(known) < len(values):
        text += f" [{len(known)}/{len(values)}]"
    return text


def _ratios(records: Mapping[str, Mapping[int, Record]], name: str, seeds: Sequence[int],
            threshold: float, baseline: str = BASELINE) -> list[float | None]:
    out: list[float | None] = []
    for seed in seeds:
        mine = records[name][seed].time_to(threshold)
        base = records[baseline][seed].time_to(threshold)
        out.append(mine / base if mine is not None and base else None)
    return out


def table(records: Mapping[str, Mapping[int, Record]], contenders: Sequence[str],
          seeds: Sequence[int], thresholds: Sequence[float], baseline: str = BASELINE) -> str:
    """The markdown table ``bench`` prints (see the module doc); ratios to ``baseline``."""
    has_base = baseline in contenders
    ref = baseline
    head = ["contender", "final val acc [%]"]
    if has_base:
        head += [f"Δ to {ref} [points]", f"time to {ref}'s final acc (× {ref}'s)"]
    for t in thresholds:
        head.append(f"time to {100 * t:g} % [s]")
        if has_base:
            head.append(f"× {ref} to {100 * t:g} %")
    rows = []
    for name in contenders:
        recs = [records[name][s] for s in seeds]
        row = [name, _spread([100 * r.final_val if r.final_val is not None else None
                              for r in recs], "{:.2f}")]
        if has_base:
            base = [records[baseline][s] for s in seeds]
            row.append(_spread([100 * (r.final_val - b.final_val)
                                if r.final_val is not None and b.final_val is not None
                                else None for r, b in zip(recs, base)], "{:+.2f}"))
            ratio = []
            for r, b in zip(recs, base):
                target = b.final_val
                own = b.time_to(target) if target is not None else None
                mine = r.time_to(target) if target is not None else None
                ratio.append(mine / own if mine is not None and own else None)
            row.append(_spread(ratio, "{:.2f}"))
        for t in thresholds:
            row.append(_spread([r.time_to(t) for r in recs], "{:.0f}"))
            if has_base:
                row.append(_spread(_ratios(records, name, seeds, t, baseline), "{:.2f}"))
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _record(name: str, seed: int, folder: Path) -> Record:
    from .runner.records import read_rows

    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    rows = read_rows(folder)
    curve = [(float(r["train_time"]), float(r["val_acc"])) for r in rows
             if r.get("val_acc") is not None and r.get("train_time") is not None]
    return Record(contender=name, seed=seed, folder=folder.name,
                  final_val=summary.get("val_acc"), train_time=summary.get("training_time"),
                  curve=curve)


def _check_folder(out: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    path = out / MANIFEST
    if not out.exists():
        return
    if not path.is_file():
        if any(out.iterdir()) and not overwrite:
            raise RunError(f"{out} is not empty and holds no bench; choose another --out or "
                           "pass --overwrite to replace it")
    else:
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("settings")
        except ValueError:
            old = None
        if old == manifest["settings"]:
            return  # the same bench: continue it
        if not overwrite:
            raise RunError(f"{out} holds a bench with other settings ({path}); choose another "
                           "--out, or pass --overwrite to replace it")
    if overwrite:
        shutil.rmtree(out)


def as_override(item: str | tuple[str, Any]) -> str:
    """A ``--set`` override as its text: ``("mlsgd.lr", 0.05)`` → ``"mlsgd.lr=0.05"``."""
    if isinstance(item, str):
        return item
    from .tomlio import inline

    key, value = item
    return f"{key}={inline(value)}"


def run_bench(file: Path, overrides: Sequence[str | tuple[str, Any]], *, budget: float,
              seeds: int, contenders: Sequence[str], thresholds: Sequence[float] | None = None,
              out: Path | None = None, overwrite: bool = False, device: str | None = None,
              schedule: str = "cosine", baseline_lr: float | None = None,
              custom: Mapping[str, Sequence[str | tuple[str, Any]]] | None = None,
              baseline: str = BASELINE, quiet: bool = True) -> str:
    """Train every contender × seed not finished yet; write and return the table.

    ``custom`` names further contenders by their own overrides (applied after ``overrides``
    and the bench's own: time budget, planner, evaluation per epoch) — how a script compares
    configurations that are not a cycle kind; ``baseline`` is the contender the ratios are
    taken to (``sgd`` unless a custom one is named)."""
    custom = {n: [as_override(o) for o in sets] for n, sets in (custom or {}).items()}
    overrides = [as_override(o) for o in overrides]
    unknown = [n for n in contenders if n not in CONTENDERS and n not in custom]
    if unknown or baseline not in [*contenders, BASELINE]:
        raise UserError(f"contenders {unknown or [baseline]}: expected {', '.join(CONTENDERS)} "
                        "or a name given in custom")
    from .compiler import compile as compile_hierarchy
    from .loader import load
    from .runner.run import run
    from .validation import validate

    if not (budget > 0 and math.isfinite(budget)):
        raise UserError(f"--budget {budget}: expected a positive number of seconds")
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: expected a positive number of seeds")
    base = load(file, list(overrides))
    thresholds = sorted(thresholds if thresholds else base.report.thresholds)
    if any(not 0 < t <= 1 for t in thresholds):
        raise UserError(f"--thresholds {thresholds}: expected accuracies in (0, 1]")
    report = validate(compile_hierarchy(base))
    if not report.ok:
        failed = [r for r in report.rows if r.status == "fail"]
        raise UserError(f"{file}: the hierarchy fails validation: "
                        + "; ".join(f"{r.name}: {r.detail}" for r in failed[:3]) + " — run "
                        f"`mlsgd-dsl validate {file}` for the report")
    seed_list = [base.mlsgd.seed + i for i in range(seeds)]
    out = Path(out) if out is not None else Path("runs") / f"{base.name}-bench"
    per = {n: ([*contender_overrides("file", base, budget=budget, schedule=schedule,
                                     baseline_lr=None), *custom[n]] if n in custom
               else contender_overrides(n, base, budget=budget, schedule=schedule,
                                        baseline_lr=baseline_lr)) for n in contenders}
    manifest: dict[str, Any] = {"settings": {
        "file": str(file), "overrides": list(overrides), "budget": budget, "seeds": seed_list,
        "contenders": {n: per[n] for n in contenders}, "device": device}}
    _check_folder(out, manifest, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    total = len(seed_list) * len(contenders)
    done = 0
    for i, seed in enumerate(seed_list):
        for name in _rotate(contenders, i):
            done += 1
            folder = out / _folder_name(name, seed)
            if (folder / "summary.json").is_file():
                print(f"bench {done}/{total}: {name}, seed {seed} — finished, skipped",
                      file=sys.stderr)
                continue
            resumable = (folder / "checkpoint.pt").is_file()
            print(f"bench {done}/{total}: {name}, seed {seed} — "
                  f"{'resumed' if resumable else 'started'} ({folder})", file=sys.stderr)
            h = load(file, [*overrides, *per[name], f"mlsgd.seed={seed}"])
            try:
                # the planner's cost cache in the bench folder: every level is measured at its
                # first run here, on this machine as it is now (a user's cache may hold costs
                # from another load or another torch), and later seeds and a resumed bench
                # plan with the same numbers
                with patch.dict(os.environ, {"MLSGD_DSL_CACHE": str(out / COSTS)}):
                    run(compile_hierarchy(h), out_dir=folder,
                        resume=folder if resumable else None, device=device, quiet=quiet,
                        validate=False, overwrite=not resumable)
            except RunError as exc:
                raise RunError(f"bench run {folder.name}: {exc.message}; run the same bench "
                               "command again to continue", file=exc.file) from None
    records = {n: {s: _record(n, s, out / _folder_name(n, s)) for s in seed_list}
               for n in contenders}
    text = table(records, contenders, seed_list, thresholds, baseline)
    manifest["records"] = [r.__dict__ for rs in records.values() for r in rs.values()]
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    atomic_write_bytes(out / "bench.md", text.encode())
    try:
        from .runner.plots import plot_contenders

        plot_contenders({n: [records[n][s].curve for s in seed_list] for n in contenders},
                        out / "bench.png",
                        title=f"{base.name}: {budget:g} s budget, {len(seed_list)} seed(s)")
    except ImportError:  # matplotlib missing: the table has the numbers
        pass
    return f"bench folder: {out}\n" + text

