"""Time to accuracy: MLSGD (no correction) against SGD on the same finest network.

Same data, same seeds, same wall-clock budget (``mlsgd.time_budget``); the clock is the
runner's ``train_time`` (training only: evaluation, checkpoints and logging excluded). The
contenders (``--contenders``) run interleaved — seed by seed, the order rotated from seed to
seed — in one process, so the machine's drift hits all of them alike:

* ``sgd-const``   the thesis' baseline: SGD, constant step 0.05, no momentum;
* ``sgd-tuned``   what a practitioner would pick: momentum 0.9, cosine schedule over the budget;
* ``mlsgd-best``  MLSGD in the best configuration the runner offers (see BEST below);
* ``mlsgd-thesis`` (optional) MLSGD as in the thesis: constant step 0.05, no momentum.

The SGD contenders run through the same runner as a one-level path (``mlsgd.path = [finest]``,
``optimizer_state = "keep"``, ``epochs = --sgd-eval``), i.e. plain SGD on the finest level whose
momentum and schedule run on across visits, so that it is validated every ``--sgd-eval`` epochs
(``method = "sgd"`` validates once per epoch only; ``--sgd-runner method`` uses it instead).
They start from the finest level's own initialisation (``init = "independent"``); MLSGD from
the nested one (the finest network = the prolongated coarsest one).

A schedule "over the budget" needs a horizon in epochs: a calibration run of each scheduled
contender measures its seconds per cycle (MLSGD) or per visit (SGD) and the horizon is the
number that fits in the budget. Constant-step contenders plan far more than fits; the budget
stops them.

Hierarchies: the shipped files, changed only through overrides (the preset's scaling plus the
benchmark's mechanics), never copied. ``--preset cifar10`` runs the thesis' CIFAR-10 files
with only the mechanics changed (use it on a GPU: ``--device cuda``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

FILES = {
    ("depth", "fmnist"): "hierarchies/fashion-mnist/depth.toml",
    ("resolution", "fmnist"): "hierarchies/resolution-fashion-mnist.toml",
    ("depth", "cifar10"): "hierarchies/depth-cifar10.toml",
    ("resolution", "cifar10"): "hierarchies/resolution-cifar10.toml",
    # issue 9: the depth x resolution graph (fine, shallow, lowres, both)
    ("graph", "fmnist"): "hierarchies/beyond/fmnist-depth-resolution.toml",
}

# Scaling of the Fashion-MNIST twins so that one comparison (3 contenders x 3 seeds) takes
# about 20 minutes on 2 idle cores. Each entry: (reason, overrides).
SCALING = {
    "depth": {
        "model.channels": [8, 16, 32],          # file: 16/32/64 (~2.2x cheaper per image)
        "data.subset": 10_000,                  # file: all 50 000 training images
        "data.validation": 5_000,               # file: 10 000 (evaluated after every epoch)
        "mlsgd.epochs": {"fine": 0.5, "mid": 0.75, "coarse": 1.0},  # file: 3 / 5 / 7
    },
    "resolution": {
        "model.channels": [16, 32],             # file: 32/64 (~3x cheaper per image)
        "data.subset": 10_000,
        "data.validation": 5_000,
        "mlsgd.epochs": {"fine": 1.0, "coarse": 0.5},                # file: 7 / 3
    },
    "graph": {                                  # channels as in the file (16/32, 2 stages)
        "data.subset": 10_000,
        "data.validation": 5_000,
        "mlsgd.epochs": {"fine": 0.5, "shallow": 0.75, "lowres": 0.75, "both": 1.0},  # 3/5/5/7
    },
}
SMOKE = {
    "data.source": "synthetic",
    "data.options": {"train": 250, "test": 50, "size": 16, "channels": 1, "seed": 0},
    "data.validation": 50,
    "mlsgd.batch_size": 50,
    "mlsgd.bn_recalibration": 100,
}
SMOKE_THRESHOLDS = [0.02, 0.05, 0.1]
SMOKE_CHANNELS = {"depth": [4, 4, 4], "resolution": [4, 4], "graph": [4, 4]}

PRESETS: dict[str, dict[str, Any]] = {
    # data: file key; scale: apply SCALING; budget: seconds (or None: budget_epochs x the
    # calibrated finest epoch); thresholds: validation-accuracy ladder
    # (in 100 s on 2 idle cores: depth ~8 finest epochs, tuned SGD ~84 %, constant-step SGD
    # ~75 %; resolution ~12 finest epochs, ~87 % and ~83 %)
    "fmnist-small": {"data": "fmnist", "scale": True, "budget": 100.0, "budget_epochs": None,
                     "thresholds": {"depth": [0.70, 0.75, 0.80, 0.82, 0.84],
                                    "resolution": [0.75, 0.80, 0.84, 0.86, 0.88],
                                    "graph": [0.75, 0.80, 0.84, 0.86, 0.88]}},
    "fmnist": {"data": "fmnist", "scale": False, "budget": None, "budget_epochs": 30.0,
               "thresholds": [0.85, 0.88, 0.90]},
    "cifar10": {"data": "cifar10", "scale": False, "budget": None, "budget_epochs": 100.0,
                "thresholds": [0.80, 0.84, 0.85]},
}

MECHANICS = {
    "report.checkpoint": "none",     # no checkpoint writing (it would be excluded anyway)
    "report.plot": False,
    "mlsgd.eval.every": "epoch",     # finest level: after every (partial) epoch + prolongation
    "mlsgd.eval.batch_size": 250,    # 2x faster per image than the default 1000 on a CPU
    "mlsgd.divergence.action": "reject",
}

BASE_LR = 0.05
# MLSGD's best configuration the runner offers (chosen after short trials, see README.md):
# momentum 0.9 on every level with step sizes 0.05·sqrt(h_L/h_l) (0.05 / 0.035 / 0.025 on the
# depth hierarchy: with momentum, the coarsest level at h = 4 diverged at 0.05, and 0.05·h_L/h_l
# was stable but slower), one cosine schedule spanning the whole multilevel run, nested
# initialisation, BatchNorm statistics re-estimated after every prolongation (2000 images),
# optimiser state reset at each visit (the thesis' convention; "keep" gained nothing).
BEST = {
    "mlsgd.optimizer": {"momentum": 0.9},
    "mlsgd.schedule": {"kind": "cosine"},
    "mlsgd.init": "nested",
    "mlsgd.bn_recalibration": 2000,
    "mlsgd.optimizer_state": "reset",
}
CONSTANT = {"mlsgd.optimizer": {"momentum": 0.0}, "mlsgd.schedule": {"kind": "constant"}}
# lr: a number (every level), "h" (BASE_LR x h_finest / h_level) or "sqrth" (its square root)
CONTENDERS: dict[str, dict[str, Any]] = {
    "sgd-const": {"kind": "sgd", "scheduled": False, "lr": BASE_LR,
                  "describe": "SGD, step 0.05 constant, no momentum (thesis baseline)",
                  "overrides": CONSTANT},
    "sgd-tuned": {"kind": "sgd", "scheduled": True, "lr": BASE_LR,
                  "describe": "SGD, step 0.05, momentum 0.9, cosine to 0 over the budget",
                  "overrides": {"mlsgd.optimizer": {"momentum": 0.9},
                                "mlsgd.schedule": {"kind": "cosine"}}},
    "mlsgd-best": {"kind": "mlsgd", "scheduled": True, "lr": "sqrth",
                   "describe": "MLSGD, no correction, step 0.05·sqrt(h_L/h_l), momentum 0.9 on "
                               "every level, cosine over the run, nested init, BN "
                               "re-estimation",
                   "overrides": BEST},
    "mlsgd-thesis": {"kind": "mlsgd", "scheduled": False, "lr": BASE_LR,
                     "describe": "MLSGD, no correction, step 0.05 constant, no momentum (thesis)",
                     "overrides": CONSTANT},
    # variants for trials (not run by default)
    "mlsgd-invh": {"kind": "mlsgd", "scheduled": True, "lr": "h",
                   "describe": "mlsgd-best with step 0.05·h_L/h_l",
                   "overrides": BEST},
    "mlsgd-samelr": {"kind": "mlsgd", "scheduled": True, "lr": BASE_LR,
                     "describe": "mlsgd-best with step 0.05 on every level",
                     "overrides": BEST},
    "mlsgd-warm": {"kind": "mlsgd", "scheduled": True, "lr": "sqrth",
                   "describe": "mlsgd-best with a linear warm-up over the first epoch",
                   "overrides": {**BEST, "mlsgd.schedule": {"kind": "cosine", "warmup": 1.0}}},
    "mlsgd-keep": {"kind": "mlsgd", "scheduled": True, "lr": "sqrth",
                   "describe": "mlsgd-best with optimizer_state = keep",
                   "overrides": {**BEST, "mlsgd.optimizer_state": "keep"}},
    "mlsgd-transfer": {"kind": "mlsgd", "scheduled": True, "lr": "sqrth",
                       "describe": "mlsgd-best with optimizer_state = transfer",
                       "overrides": {**BEST, "mlsgd.optimizer_state": "transfer"}},
    "mlsgd-nobn": {"kind": "mlsgd", "scheduled": True, "lr": "sqrth",
                   "describe": "mlsgd-best without BN re-estimation",
                   "overrides": {**BEST, "mlsgd.bn_recalibration": 0}},
    "mlsgd-indep": {"kind": "mlsgd", "scheduled": True, "lr": "sqrth",
                    "describe": "mlsgd-best with independent initialisation",
                    "overrides": {**BEST, "mlsgd.init": "independent"}},
    # issue 9 (beyond the thesis), each against mlsgd-thesis (--reference mlsgd-thesis): the
    # settings of the shipped hierarchies/beyond/ files, constant steps as there
    "mlsgd-momentum": {"kind": "mlsgd", "scheduled": False, "lr": 0.01,
                       "describe": "beyond/fmnist-depth-momentum.toml: momentum 0.9 on every "
                                   "level, step 0.01 constant, momentum moved with R / P",
                       "overrides": {"mlsgd.optimizer": {"name": "sgd", "momentum": 0.9},
                                     "mlsgd.schedule": {"kind": "constant"},
                                     "mlsgd.optimizer_state": "transfer"}},
    "mlsgd-adam": {"kind": "mlsgd", "scheduled": False, "lr": 0.001,
                   "describe": "beyond/fmnist-depth-adam.toml: Adam (0.9, 0.999) on every "
                               "level, step 1e-3 constant, state kept per level",
                   "overrides": {"mlsgd.optimizer": {"name": "adam", "betas": [0.9, 0.999]},
                                 "mlsgd.schedule": {"kind": "constant"},
                                 "mlsgd.optimizer_state": "keep"}},
    # the thesis' corrected configuration (depth-cifar10-sto.toml): the corrected coarse
    # problems diverge at the uncorrected step 0.05 (also with lambda = 0.25 or 1)
    "mlsgd-stochastic": {"kind": "mlsgd", "scheduled": False, "lr": 0.001,
                         "describe": "the thesis' corrected method (depth-cifar10-sto.toml): "
                                     "stochastic correction (3.125 %, no VR) from cycle 1, "
                                     "step 0.001, lambda 5",
                         "overrides": {**CONSTANT, "mlsgd.step_regularization": 5.0,
                                       "mlsgd.uncorrected_cycles": 1, "mlsgd.correction": {
                                           "strategy": "stochastic", "fraction": 0.03125,
                                           "variance_reduction": False}}},
    "mlsgd-stochastic-fast": {"kind": "mlsgd", "scheduled": False, "lr": 0.01,
                              "describe": "mlsgd-delayed's settings with the correction on "
                                          "from cycle 0 (isolates the delay)",
                              "overrides": {**CONSTANT, "mlsgd.step_regularization": 2.0,
                                            "mlsgd.correction": {
                                                "strategy": "stochastic", "fraction": 0.03125,
                                                "variance_reduction": False}}},
    "mlsgd-delayed": {"kind": "mlsgd", "scheduled": False, "lr": 0.01,
                      "describe": "beyond/fmnist-depth-delayed.toml: step 0.01, lambda 2, "
                                  "uncorrected, then the stochastic correction from half the "
                                  "cycles that fit in the budget or once ||P* grad F_L|| < 0.3",
                      "overrides": {**CONSTANT, "mlsgd.step_regularization": 2.0,
                                    "mlsgd.correction": {
                                        "strategy": "delayed", "inner": "stochastic",
                                        "fraction": 0.03125, "variance_reduction": False,
                                        "after_cycle": "half", "gradient_norm_below": 0.3}}},
    # the graph hierarchy (--hierarchy graph): the thesis' chains inside it and the graph's
    # paths, all with the thesis' plain constant-step SGD
    "mlsgd-depth2": {"kind": "mlsgd", "scheduled": False, "lr": BASE_LR,
                     "describe": "thesis 4.2 (depth only): path shallow -> fine",
                     "overrides": {**CONSTANT, "mlsgd.path": ["shallow", "fine"]}},
    "mlsgd-res2": {"kind": "mlsgd", "scheduled": False, "lr": BASE_LR,
                   "describe": "thesis 4.3 (resolution only): path lowres -> fine",
                   "overrides": {**CONSTANT, "mlsgd.path": ["lowres", "fine"]}},
    "mlsgd-graph": {"kind": "mlsgd", "scheduled": False, "lr": BASE_LR,
                    "describe": "beyond/fmnist-depth-resolution.toml: path both -> shallow -> "
                                "fine (both coarsenings)",
                    "overrides": {**CONSTANT, "mlsgd.path": ["both", "shallow", "fine"]}},
    "mlsgd-alternate": {"kind": "mlsgd", "scheduled": False, "lr": BASE_LR,
                        "describe": "beyond/fmnist-depth-resolution-alternate.toml: cycles "
                                    "alternate both -> shallow -> fine / both -> lowres -> fine",
                        "overrides": {**CONSTANT, "mlsgd.path": [
                            ["both", "shallow", "fine"], ["both", "lowres", "fine"]]}},
}
DEFAULT_CONTENDERS = ["sgd-const", "sgd-tuned", "mlsgd-best"]
# --beyond (issue 9): each feature against the thesis' method, same budget; (hierarchy,
# contenders, reference)
BEYOND = [
    ("depth", ["mlsgd-thesis", "mlsgd-momentum", "mlsgd-adam", "mlsgd-stochastic",
               "mlsgd-stochastic-fast", "mlsgd-delayed"], "mlsgd-thesis"),
    ("graph", ["mlsgd-depth2", "mlsgd-res2", "mlsgd-graph", "mlsgd-alternate"],
     "mlsgd-depth2"),
]


# --------------------------------------------------------------------------- configuration


class Setup:
    """Everything about one hierarchy x preset: base overrides, levels, thresholds."""

    def __init__(self, args: Any, hierarchy: str) -> None:
        import mlsgd_dsl

        preset = PRESETS[args.preset]
        self.args = args
        self.hierarchy = hierarchy
        self.file = str(C.ROOT / FILES[hierarchy, preset["data"]])
        self.base: dict[str, Any] = dict(MECHANICS)
        self.scaling: dict[str, Any] = {}
        if preset["scale"]:
            self.scaling.update(SCALING[hierarchy])
        if args.preset == "cifar10" and args.download:
            self.scaling["data.options"] = {"download": True}
        if args.smoke:
            self.scaling.update(SMOKE)
            self.scaling["model.channels"] = SMOKE_CHANNELS[hierarchy]
            self.scaling.pop("data.subset", None)
        self.base.update(self.scaling)
        h = mlsgd_dsl.load(self.file, overrides=self.base)
        c = mlsgd_dsl.compile(h)
        self.finest = c.finest
        self.levels = list(c.levels)
        self.file_thresholds = list(h.report.thresholds)
        ladder = preset["thresholds"]
        if isinstance(ladder, dict):
            ladder = ladder[hierarchy]
        self.thresholds = args.thresholds or (SMOKE_THRESHOLDS if args.smoke else ladder)
        self.base["report.thresholds"] = self.thresholds
        self.epochs = {n: h.for_level(h.mlsgd.epochs, n) for n in self.levels}
        self.h = {n: c.h(n) for n in self.levels}
        self.path = c.path(0)
        self.cycle = h.mlsgd.cycle
        self.batch = h.for_level(h.mlsgd.batch_size, self.finest)

    def overrides(self, name: str, seed: int, horizon: int | None) -> dict[str, Any]:
        spec = CONTENDERS[name]
        o = {**self.base, "mlsgd.correction": "none", **spec["overrides"],
             "mlsgd.lr": self.lr(name), "mlsgd.seed": seed,
             "mlsgd.time_budget": self.budget * self.args.slack}
        corr = o["mlsgd.correction"]
        if isinstance(corr, dict) and corr.get("after_cycle") == "half":
            # delayed: switch at half of the cycles that fit in the budget (at the latest)
            o["mlsgd.correction"] = {**corr, "after_cycle": max(1, round(0.5 * self.fit))}
        if spec["kind"] == "sgd":
            o["mlsgd.init"] = "independent"
            if self.args.sgd_runner == "method":
                o["mlsgd.method"] = "sgd"
                o["mlsgd.sgd_epochs"] = float(horizon) * self.args.sgd_eval
            else:
                o["mlsgd.path"] = [self.finest]
                o["mlsgd.optimizer_state"] = "keep"
                o["mlsgd.epochs"] = self.args.sgd_eval
                o["mlsgd.cycles"] = int(horizon)
        else:
            o["mlsgd.cycles"] = int(horizon)
        return o

    def lr(self, name: str) -> float | dict[str, float]:
        rule = CONTENDERS[name]["lr"]
        if rule == "h":
            return {n: BASE_LR * self.h[self.finest] / self.h[n] for n in self.levels}
        if rule == "sqrth":
            return {n: BASE_LR * (self.h[self.finest] / self.h[n]) ** 0.5 for n in self.levels}
        return float(rule)

    budget: float = 0.0
    fit: float = 1.0  # MLSGD cycles of the first MLSGD contender that fit in the budget


def load_compiled(setup: Setup, overrides: dict[str, Any]) -> Any:
    import mlsgd_dsl

    return mlsgd_dsl.compile(mlsgd_dsl.load(setup.file, overrides=overrides))


def run_one(setup: Setup, name: str, seed: int, horizon: int, out: Path) -> dict[str, Any]:
    """One training run; returns its raw record (threshold times from the metric rows)."""
    import mlsgd_dsl
    from mlsgd_dsl.errors import UserError
    from mlsgd_dsl.runner.records import read_rows

    overrides = setup.overrides(name, seed, horizon)
    c = load_compiled(setup, overrides)
    record: dict[str, Any] = {"contender": name, "seed": seed, "horizon": horizon}
    t0 = time.time()
    try:
        summary = mlsgd_dsl.run(c, out_dir=out, quiet=True, device=setup.args.device,
                                validate=False, overwrite=True)
    except UserError as exc:  # e.g. NaN on the finest level: report, go on with the others
        record.update(error=str(exc).splitlines()[0], wall=time.time() - t0)
        rows = read_rows(out) if (out / "metrics.jsonl").is_file() else []
        record["time_to"] = time_to(rows, setup.thresholds)
        return record
    rows = read_rows(out)
    record.update(
        time_to=time_to(rows, setup.thresholds),
        val=summary.get("val_acc"), test=summary.get("test_acc"),
        train_time=summary.get("training_time"), wall=time.time() - t0,
        cycles=summary.get("cycles"), finest_epochs=(summary.get("epochs") or {}).get(
            setup.finest), global_epochs=summary.get("global_epochs"),
        bn_time=summary.get("bn_time"), bn_images=summary.get("bn_images"),
        stopped=summary.get("stopped"), evals=sum(r.get("val_acc") is not None for r in rows),
        best_val=max((r["val_acc"] for r in rows if r.get("val_acc") is not None),
                     default=None),
        rejected=sum(1 for r in rows if str(r.get("event") or "").startswith(
            ("diverged", "rejected"))),
        switched=next((f"cycle {r['cycle']}: {r['event']}" for r in rows
                       if str(r.get("event") or "").startswith("switched")), None),
    )
    return record


def time_to(rows: list[dict[str, Any]], thresholds: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for t in thresholds:
        first = None
        for r in rows:
            if r.get("val_acc") is not None and r["val_acc"] >= t:
                first = float(r["train_time"])
                break
        out[f"{t:g}"] = first
    return out


# --------------------------------------------------------------------------- calibration


def calibrate(setup: Setup, contenders: list[str], work: Path) -> dict[str, Any]:
    """Seconds per cycle (MLSGD) / per visit (SGD) from short runs of the real configurations,
    and the budget. The runs double as a warm-up of the process."""
    import mlsgd_dsl
    from mlsgd_dsl.runner.cycle import visit_order
    from mlsgd_dsl.runner.records import read_rows

    args = setup.args
    cal: dict[str, Any] = {}
    setup.budget = 1e9
    kinds = {CONTENDERS[n]["kind"] for n in contenders}
    need_sgd = "sgd" in kinds or args.budget is None
    if need_sgd:
        name = "sgd-tuned" if "sgd-tuned" in contenders else next(
            (n for n in contenders if CONTENDERS[n]["kind"] == "sgd"), "sgd-tuned")
        visits = max(2, math.ceil(args.calibration_epochs / args.sgd_eval))
        o = setup.overrides(name, seed=10_000, horizon=visits)
        o.update({"mlsgd.path": [setup.finest], "mlsgd.optimizer_state": "keep",
                  "mlsgd.epochs": args.sgd_eval, "mlsgd.cycles": visits})
        o.pop("mlsgd.method", None)
        o.pop("mlsgd.sgd_epochs", None)
        out = work / "calibrate-sgd"
        mlsgd_dsl.run(load_compiled(setup, o), out_dir=out, quiet=True, device=args.device,
                      validate=False, overwrite=True)
        times = [0.0] + [r["train_time"] for r in read_rows(out) if r.get("train_loss")
                         is not None]
        durations = [b - a for a, b in zip(times, times[1:])]
        steady = durations[1:] or durations  # the first visit includes the warm-up
        cal["sgd_visit"] = C.median(steady)
        cal["finest_epoch"] = cal["sgd_visit"] / args.sgd_eval
    if "mlsgd" in kinds:
        name = next(n for n in contenders if CONTENDERS[n]["kind"] == "mlsgd")
        o = setup.overrides(name, seed=10_000, horizon=2)
        # a long cycle (the unscaled files: 3/5/7 epochs) is calibrated with its epochs scaled
        # by f and its time divided by f (the per-cycle parts that do not scale, BatchNorm
        # re-estimation and transfers, are well under 1 % of a cycle)
        level_epochs = sum(setup.epochs[n] for n in visit_order(setup.path, setup.cycle))
        f = min(1.0, args.calibration_cycle_epochs / level_epochs)
        if f < 1.0:
            o["mlsgd.epochs"] = {n: setup.epochs[n] * f for n in setup.levels}
        out = work / "calibrate-mlsgd"
        mlsgd_dsl.run(load_compiled(setup, o), out_dir=out, quiet=True, device=args.device,
                      validate=False, overwrite=True)
        rows = read_rows(out)
        ends = {}
        for r in rows:
            ends[r["cycle"]] = max(ends.get(r["cycle"], 0.0), r["train_time"])
        if len(ends) >= 2:
            cal["mlsgd_cycle"] = (ends[1] - ends[0]) / f
        else:
            cal["mlsgd_cycle"] = ends.get(0) / f
        cal["mlsgd_cycle_first"] = ends.get(0) / f
        cal["mlsgd_calibration_scale"] = f
    if args.budget is not None:
        setup.budget = float(args.budget)
        cal["budget_from"] = "--budget"
    elif PRESETS[args.preset]["budget"] is not None and args.budget_epochs is None:
        setup.budget = float(PRESETS[args.preset]["budget"])
        cal["budget_from"] = f"preset {args.preset}"
    else:
        epochs = args.budget_epochs or PRESETS[args.preset]["budget_epochs"]
        setup.budget = float(epochs) * cal["finest_epoch"]
        cal["budget_from"] = f"{epochs:g} finest epochs x {cal['finest_epoch']:.1f} s"
    if args.smoke and args.budget is None:  # one MLSGD cycle, so that every code path runs
        setup.budget = 1.1 * max(cal.get("mlsgd_cycle") or 0.0, cal.get("sgd_visit") or 0.0)
        cal["budget_from"] = "smoke: 1.1 x the calibrated cycle"
    cal["budget"] = setup.budget
    horizons = {}
    for name in contenders:
        spec = CONTENDERS[name]
        unit = cal["sgd_visit"] if spec["kind"] == "sgd" else cal["mlsgd_cycle"]
        fit = setup.budget / unit if unit else 1.0
        # scheduled: the schedule spans what fits in the budget; constant: the budget stops it
        horizons[name] = max(1, round(fit)) if spec["scheduled"] else max(10, math.ceil(
            3 * fit) + 10)
    cal["horizons"] = horizons
    if cal.get("mlsgd_cycle"):
        setup.fit = setup.budget / cal["mlsgd_cycle"]
    return cal


# --------------------------------------------------------------------------- report


def evaluation_protocol(records: list[dict[str, Any]]) -> str:
    """How the scored networks' BatchNorm statistics came about, and what that cost."""
    images = {r.get("bn_images") for r in records if r.get("bn_images")}
    if not images:
        return "running BatchNorm statistics (no re-estimation before evaluation)"
    return (f"BatchNorm statistics re-estimated on {'/'.join(map(str, sorted(images)))} "
            "training images before every evaluation (`mlsgd.eval.recalibrate`, every contender "
            "alike), excluded from train_time like the evaluation itself; its cost per run "
            + C.spread([r.get("bn_time") for r in records], "{:.1f}") + " s")


def summarise(setup: Setup, records: list[dict[str, Any]], contenders: list[str],
              cal: dict[str, Any], info: dict[str, Any], started: float,
              seeds: list[int], reference: str | None = None) -> str:
    th = [f"{t:g}" for t in setup.thresholds]
    by = {n: [r for r in records if r["contender"] == n] for n in contenders}
    unit = {n: ("visit" if CONTENDERS[n]["kind"] == "sgd" else "cycle") for n in contenders}
    args = setup.args
    body = C.preamble(info, started, {
        "hierarchy": f"`{Path(setup.file).relative_to(C.ROOT)}` with overrides "
                     f"`{json.dumps(setup.scaling)}`" + (" (SMOKE: tiny synthetic data; the "
                                                        "numbers mean nothing)" if args.smoke
                                                        else ""),
        "clock": "the runner's train_time (training only; validation after every finest "
                 "epoch / prolongation, checkpoints and logging excluded)",
        "budget": f"{setup.budget:.1f} s of train_time per run ({cal['budget_from']}); "
                  f"seeds {seeds}; contenders interleaved, order rotated per seed",
        "calibration": ", ".join(f"{k} {C.fmt(v, '{:.2f}')} s" for k, v in cal.items()
                                 if k in ("finest_epoch", "sgd_visit", "mlsgd_cycle",
                                          "mlsgd_cycle_first")),
        "evaluation": evaluation_protocol(records),
        "SGD runner": (f"one-level path, validated every {args.sgd_eval:g} epoch"
                       if args.sgd_runner == "path" else "method = 'sgd' (validated per epoch)"),
    })
    body += "\n**Contenders**\n\n" + C.table(
        ["contender", "what", "horizon (planned cycles / SGD visits)", "overrides"],
        [[n, CONTENDERS[n]["describe"], f"{cal['horizons'][n]} {unit[n]}s"
          + ("" if CONTENDERS[n]["scheduled"] else " (budget stops it)"),
          f"`{json.dumps({'mlsgd.lr': setup.lr(n), **CONTENDERS[n]['overrides']})}`"]
         for n in contenders])

    body += "\n**Per contender** (median (min–max) over seeds; [k/n]: reached in k of n " \
            "seeds; times in s of train_time)\n\n"
    rows = []
    for n in contenders:
        rs = by[n]
        rows.append([n, *(C.spread([r["time_to"].get(t) for r in rs], "{:.0f}") for t in th),
                     C.spread([100 * r["val"] if r.get("val") is not None else None
                               for r in rs], "{:.2f}"),
                     C.spread([100 * r["test"] if r.get("test") is not None else None
                               for r in rs], "{:.2f}"),
                     C.spread([r.get("train_time") for r in rs], "{:.0f}"),
                     C.spread([r.get("finest_epochs") for r in rs], "{:.1f}")])
    body += C.table(["contender", *(f"t to {100 * float(t):g}%" for t in th), "final val %",
                     "final test %", "train time", "finest epochs"], rows)

    if reference:
        pairs = [(n, reference) for n in contenders if n != reference]
        body += f"\n**Ratios** t(contender) / t({reference}) to each threshold, paired by " \
                "seed (median (min–max) of the per-seed ratios; < 1: faster than the " \
                "reference); final accuracy differences in points (contender − reference)\n\n"
    else:
        pairs = [(m, s) for m in contenders if CONTENDERS[m]["kind"] == "mlsgd"
                 for s in contenders if CONTENDERS[s]["kind"] == "sgd"]
        body += "\n**Ratios** t(MLSGD) / t(SGD) to each threshold, paired by seed (median " \
                "(min–max) of the per-seed ratios; < 1: MLSGD faster); final accuracy " \
                "differences in points (MLSGD − SGD)\n\n"
    rows = []
    headline = []
    for m, s in pairs:
        cells = []
        for t in th:
            ratios = []
            for seed in seeds:
                a = next((r for r in by[m] if r["seed"] == seed), None)
                b = next((r for r in by[s] if r["seed"] == seed), None)
                ta = a["time_to"].get(t) if a else None
                tb = b["time_to"].get(t) if b else None
                ratios.append(ta / tb if ta is not None and tb else None)
            cells.append(C.spread(ratios, "{:.2f}"))
            full = C.clean(ratios)
            if len(full) == len(seeds):
                headline.append((m, s, t, C.median(full)))
        dv = [100 * (a.get("val", math.nan) - b.get("val", math.nan))
              for a in by[m] for b in by[s] if a["seed"] == b["seed"]
              and a.get("val") is not None and b.get("val") is not None]
        dt = [100 * (a.get("test", math.nan) - b.get("test", math.nan))
              for a in by[m] for b in by[s] if a["seed"] == b["seed"]
              and a.get("test") is not None and b.get("test") is not None]
        rows.append([f"{m} / {s}", *cells, C.spread(dv, "{:+.2f}"),
                     C.spread(dt, "{:+.2f}")])
    body += C.table(["pair", *(f"ratio to {100 * float(t):g}%" for t in th), "Δ val",
                     "Δ test"], rows)
    if headline:
        body += "\nHeadline (highest threshold every seed of both reached): " + "; ".join(
            f"{m} / {s} to {100 * float(t):g}%: {r:.2f}x the time"
            for m, s, t, r in (max((x for x in headline if x[:2] == pair),
                                   key=lambda x: float(x[2]))
                               for pair in dict.fromkeys(x[:2] for x in headline))) + "\n"

    body += "\n<details><summary>Raw runs</summary>\n\n" + C.table(
        ["contender", "seed", *(f"t {100 * float(t):g}%" for t in th), "val %", "test %",
         "best val %", "train time", "wall", "cycles", "finest ep.", "all-level ep.", "evals",
         "rejected", "stopped", "switched"],
        [[r["contender"], r["seed"], *(C.fmt(r["time_to"].get(t), "{:.1f}") for t in th),
          C.pct(r.get("val")), C.pct(r.get("test")), C.pct(r.get("best_val")),
          C.fmt(r.get("train_time"), "{:.1f}"), C.fmt(r.get("wall"), "{:.0f}"),
          r.get("cycles"), C.fmt(r.get("finest_epochs"), "{:.2f}"),
          C.fmt(r.get("global_epochs"), "{:.2f}"), r.get("evals"), r.get("rejected"),
          r.get("error") or r.get("stopped"), r.get("switched") or ""] for r in records])
    body += "\n</details>\n"
    return body


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--hierarchy", choices=["depth", "resolution", "graph", "all"],
                   default=None, help="hierarchy to benchmark (default: depth; with --smoke: "
                                      "all = depth and resolution; graph: the depth x "
                                      "resolution file of hierarchies/beyond/)")
    p.add_argument("--beyond", action="store_true",
                   help="issue 9's comparisons instead: momentum, Adam, the stochastic and the "
                        "delayed correction against mlsgd-thesis on the depth hierarchy; the "
                        "depth x resolution graph's paths against the depth-only chain")
    p.add_argument("--reference", default=None,
                   help="report ratios against this contender instead of MLSGD / SGD pairs")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="fmnist-small: scaled Fashion-MNIST (~20 min per hierarchy on 2 idle "
                        "cores, the default); fmnist: the unscaled twins; cifar10: the thesis' "
                        "CIFAR-10 files (use on a GPU)")
    p.add_argument("--budget", type=float, default=None,
                   help="train_time budget per run in seconds (default: the preset's)")
    p.add_argument("--budget-epochs", type=float, default=None,
                   help="budget as a number of calibrated finest-level epochs")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                   help=f"comma-separated, from {', '.join(CONTENDERS)}")
    p.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")],
                   default=None, help="validation-accuracy ladder, e.g. 0.8,0.85,0.88")
    p.add_argument("--sgd-eval", type=float, default=0.5,
                   help="SGD is validated every this many epochs")
    p.add_argument("--sgd-runner", choices=["path", "method"], default="path",
                   help="run SGD as a one-level path (validated every --sgd-eval epochs) or "
                        "with method = 'sgd' (validated per epoch)")
    p.add_argument("--calibration-epochs", type=float, default=0.75,
                   help="finest epochs of the SGD calibration run")
    p.add_argument("--calibration-cycle-epochs", type=float, default=4.0,
                   help="MLSGD calibration: a cycle longer than this many level-epochs runs "
                        "with its epochs scaled down to it")
    p.add_argument("--slack", type=float, default=1.0,
                   help="trials on a busy machine: the time budget is this factor times the "
                        "budget the horizons are sized for (> 1: every contender completes "
                        "its planned work; compare final accuracies, not times)")
    p.add_argument("--download", action="store_true",
                   help="--preset cifar10: let the data source download CIFAR-10")
    args = p.parse_args(argv)
    args.preset = args.preset or "fmnist-small"
    if args.device == "cuda" and args.preset == "fmnist-small" and "--preset" not in sys.argv:
        print("note: --device cuda with the CPU-sized preset; the GPU configuration is "
              "--preset cifar10", file=sys.stderr)
    if args.smoke:
        args.seeds = args.seeds or 2
        args.calibration_epochs = min(args.calibration_epochs, 0.5)
    args.seeds = args.seeds or 3
    hierarchies = [args.hierarchy or ("all" if args.smoke else "depth")]
    if hierarchies == ["all"]:
        hierarchies = ["depth", "resolution"]
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders + [args.reference or contenders[0]]
               if c not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {list(CONTENDERS)}")
    if args.reference and args.reference not in contenders:
        p.error(f"--reference {args.reference} is not among --contenders")
    if args.beyond:
        if args.preset != "fmnist-small":
            p.error("--beyond runs the Fashion-MNIST files: --preset fmnist-small only")
        jobs = [(h, list(cs), ref, f"beyond-{h}") for h, cs, ref in BEYOND
                if args.hierarchy in (None, "all", h)]
        if not jobs:
            p.error(f"--beyond compares on {' and '.join(h for h, _, _ in BEYOND)}, not on "
                    f"--hierarchy {args.hierarchy}")
    else:
        jobs = [(h, contenders, args.reference, h) for h in hierarchies]
    C.setup_torch(args)
    seeds = list(range(args.seeds))
    results = C.results_path(args)
    info = C.machine(args.device)

    with C.workdir(args) as work:
        for hierarchy, contenders, reference, label in jobs:
            started = time.time()
            setup = Setup(args, hierarchy)
            wd = work / f"tta-{hierarchy}"
            print(f"[{hierarchy}] {setup.file}: calibrating ...", flush=True)
            cal = calibrate(setup, contenders, wd)
            print(f"[{hierarchy}] calibration {json.dumps(cal, default=str)}", flush=True)
            records = []
            for seed in seeds:
                for name in C.rotate(contenders, seed):
                    rec = run_one(setup, name, seed, cal["horizons"][name],
                                  wd / f"{name}-seed{seed}")
                    records.append(rec)
                    print(f"[{hierarchy}] seed {seed} {name:13s} val {C.pct(rec.get('val'))} "
                          f"test {C.pct(rec.get('test'))} time_to {rec['time_to']} "
                          f"train {C.fmt(rec.get('train_time'), '{:.1f}')} s wall "
                          f"{C.fmt(rec.get('wall'), '{:.0f}')} s"
                          + (f" ERROR {rec['error']}" if rec.get("error") else ""), flush=True)
            body = summarise(setup, records, contenders, cal, info, started, seeds,
                             reference)
            # a budget other than the preset's gets its own section, so that two budgets'
            # tables stand side by side instead of replacing each other
            own = args.budget is not None and args.budget != PRESETS[args.preset]["budget"]
            suffix = f"/{args.budget:g}s" if own else ""
            key = f"time_to_accuracy/{label}/{args.preset}/{args.device}{suffix}"
            title = (("Beyond the thesis: " if args.beyond else "")
                     + f"Time to accuracy — {hierarchy} hierarchy, preset {args.preset}, "
                     f"{args.device}" + (f", budget {args.budget:g} s" if own else "")
                     + (" (smoke)" if args.smoke else ""))
            C.report(results, key, title, body)
    return 0


def download_hint(message: str) -> str:
    return (" (with --preset cifar10, --download lets the source fetch it)"
            if "cifar10" in message else "")


if __name__ == "__main__":
    raise SystemExit(C.cli(main, download_hint))
