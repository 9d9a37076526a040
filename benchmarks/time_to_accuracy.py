"""Time to accuracy: named configurations of the shipped hierarchies, side by side at equal
training-time budgets — a thin caller of ``mlsgd-dsl bench`` (``mlsgd_dsl.bench.run_bench``).

This script only decides *what* runs: a preset (which file, scaled how, which budget and
thresholds) and named contenders, each a set of overrides:

* ``sgd-const``   the thesis' baseline: SGD, constant step 0.05, no momentum;
* ``sgd-tuned``   what a practitioner would pick: momentum 0.9, cosine schedule over the budget;
* ``mlsgd-best``  MLSGD in the best configuration the runner offers (see BEST below);
* ``mlsgd-thesis`` (optional) MLSGD as in the thesis: constant step 0.05, no momentum;
* further variants for trials and issue 9's ``--beyond`` comparisons (CONTENDERS below).

The bench runs them: same data and seeds, ``mlsgd.time_budget`` with the budget planner
(``mlsgd.plan = "auto"``: cycles and epochs fitted to the budget from measured level costs,
so every schedule ends with the budget), the finest network validated after every finest epoch
and every prolongation, contenders interleaved seed by seed with the order rotated. The clock
is the runner's ``train_time`` (evaluation, BatchNorm re-estimation for it, checkpoints and
logging excluded). The SGD contenders run as a one-level path (``mlsgd.path = [finest]``,
``optimizer_state = "keep"``, visits of ``--sgd-eval`` epochs): plain SGD whose momentum and
schedule run on across visits, validated every ``--sgd-eval`` epochs (``method = "sgd"`` would
validate once per epoch). They start from the finest level's own initialisation; MLSGD from
the nested one. This script then writes the bench's table (one per SGD contender as the
reference) and the per-seed raw rows as its section of RESULTS.md.

Hierarchies: the shipped files, changed only through overrides (the preset's scaling plus the
benchmark's mechanics), never copied. ``--preset cifar10`` runs the thesis' CIFAR-10 files
with only the mechanics changed (use it on a GPU: ``--device cuda``).
"""

from __future__ import annotations

import json
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
    # data: file key; scale: apply SCALING; budget: seconds (None: --budget required);
    # thresholds: validation-accuracy ladder
    # (on the 2-core machine of RESULTS.md a scaled finest epoch takes ~30 s, so 100 s hold
    # ~3 finest epochs: tuned SGD ends near 79 % on depth, 82 % on resolution)
    "fmnist-small": {"data": "fmnist", "scale": True, "budget": 100.0,
                     "thresholds": {"depth": [0.70, 0.75, 0.80, 0.82, 0.84],
                                    "resolution": [0.75, 0.80, 0.84, 0.86, 0.88],
                                    "graph": [0.75, 0.80, 0.84, 0.86, 0.88]}},
    "fmnist": {"data": "fmnist", "scale": False, "budget": None,
               "thresholds": [0.85, 0.88, 0.90]},
    "cifar10": {"data": "cifar10", "scale": False, "budget": None,
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
    "sgd-const": {"kind": "sgd", "lr": BASE_LR,
                  "describe": "SGD, step 0.05 constant, no momentum (thesis baseline)",
                  "overrides": CONSTANT},
    "sgd-tuned": {"kind": "sgd", "lr": BASE_LR,
                  "describe": "SGD, step 0.05, momentum 0.9, cosine to 0 over the budget",
                  "overrides": {"mlsgd.optimizer": {"momentum": 0.9},
                                "mlsgd.schedule": {"kind": "cosine"}}},
    "mlsgd-best": {"kind": "mlsgd", "lr": "sqrth",
                   "describe": "MLSGD, no correction, step 0.05·sqrt(h_L/h_l), momentum 0.9 on "
                               "every level, cosine over the run, nested init, BN "
                               "re-estimation",
                   "overrides": BEST},
    "mlsgd-thesis": {"kind": "mlsgd", "lr": BASE_LR,
                     "describe": "MLSGD, no correction, step 0.05 constant, no momentum (thesis)",
                     "overrides": CONSTANT},
    # variants for trials (not run by default)
    "mlsgd-invh": {"kind": "mlsgd", "lr": "h",
                   "describe": "mlsgd-best with step 0.05·h_L/h_l",
                   "overrides": BEST},
    "mlsgd-samelr": {"kind": "mlsgd", "lr": BASE_LR,
                     "describe": "mlsgd-best with step 0.05 on every level",
                     "overrides": BEST},
    "mlsgd-warm": {"kind": "mlsgd", "lr": "sqrth",
                   "describe": "mlsgd-best with a linear warm-up over the first epoch",
                   "overrides": {**BEST, "mlsgd.schedule": {"kind": "cosine", "warmup": 1.0}}},
    "mlsgd-keep": {"kind": "mlsgd", "lr": "sqrth",
                   "describe": "mlsgd-best with optimizer_state = keep",
                   "overrides": {**BEST, "mlsgd.optimizer_state": "keep"}},
    "mlsgd-transfer": {"kind": "mlsgd", "lr": "sqrth",
                       "describe": "mlsgd-best with optimizer_state = transfer",
                       "overrides": {**BEST, "mlsgd.optimizer_state": "transfer"}},
    "mlsgd-nobn": {"kind": "mlsgd", "lr": "sqrth",
                   "describe": "mlsgd-best without BN re-estimation",
                   "overrides": {**BEST, "mlsgd.bn_recalibration": 0}},
    "mlsgd-indep": {"kind": "mlsgd", "lr": "sqrth",
                    "describe": "mlsgd-best with independent initialisation",
                    "overrides": {**BEST, "mlsgd.init": "independent"}},
    # issue 9 (beyond the thesis), each against mlsgd-thesis (--reference mlsgd-thesis): the
    # settings of the shipped hierarchies/beyond/ files, constant steps as there
    "mlsgd-momentum": {"kind": "mlsgd", "lr": 0.01,
                       "describe": "beyond/fmnist-depth-momentum.toml: momentum 0.9 on every "
                                   "level, step 0.01 constant, momentum moved with R / P",
                       "overrides": {"mlsgd.optimizer": {"name": "sgd", "momentum": 0.9},
                                     "mlsgd.schedule": {"kind": "constant"},
                                     "mlsgd.optimizer_state": "transfer"}},
    "mlsgd-adam": {"kind": "mlsgd", "lr": 0.001,
                   "describe": "beyond/fmnist-depth-adam.toml: Adam (0.9, 0.999) on every "
                               "level, step 1e-3 constant, state kept per level",
                   "overrides": {"mlsgd.optimizer": {"name": "adam", "betas": [0.9, 0.999]},
                                 "mlsgd.schedule": {"kind": "constant"},
                                 "mlsgd.optimizer_state": "keep"}},
    # the thesis' corrected configuration (depth-cifar10-sto.toml): the corrected coarse
    # problems diverge at the uncorrected step 0.05 (also with lambda = 0.25 or 1)
    "mlsgd-stochastic": {"kind": "mlsgd", "lr": 0.001,
                         "describe": "the thesis' corrected method (depth-cifar10-sto.toml): "
                                     "stochastic correction (3.125 %, no VR) from cycle 1, "
                                     "step 0.001, lambda 5",
                         "overrides": {**CONSTANT, "mlsgd.step_regularization": 5.0,
                                       "mlsgd.uncorrected_cycles": 1, "mlsgd.correction": {
                                           "strategy": "stochastic", "fraction": 0.03125,
                                           "variance_reduction": False}}},
    "mlsgd-stochastic-fast": {"kind": "mlsgd", "lr": 0.01,
                              "describe": "mlsgd-delayed's settings with the correction on "
                                          "from cycle 0 (isolates the delay)",
                              "overrides": {**CONSTANT, "mlsgd.step_regularization": 2.0,
                                            "mlsgd.correction": {
                                                "strategy": "stochastic", "fraction": 0.03125,
                                                "variance_reduction": False}}},
    "mlsgd-delayed": {"kind": "mlsgd", "lr": 0.01,
                      "describe": "beyond/fmnist-depth-delayed.toml: step 0.01, lambda 2, "
                                  "uncorrected, then the stochastic correction from cycle 2 "
                                  "(about half of what 60 s fit on 2 cores) or once "
                                  "||P* grad F_L|| < 0.3",
                      "overrides": {**CONSTANT, "mlsgd.step_regularization": 2.0,
                                    "mlsgd.correction": {
                                        "strategy": "delayed", "inner": "stochastic",
                                        "fraction": 0.03125, "variance_reduction": False,
                                        "after_cycle": 2, "gradient_norm_below": 0.3}}},
    # the graph hierarchy (--hierarchy graph): the thesis' chains inside it and the graph's
    # paths, all with the thesis' plain constant-step SGD
    "mlsgd-depth2": {"kind": "mlsgd", "lr": BASE_LR,
                     "describe": "thesis 4.2 (depth only): path shallow -> fine",
                     "overrides": {**CONSTANT, "mlsgd.path": ["shallow", "fine"]}},
    "mlsgd-res2": {"kind": "mlsgd", "lr": BASE_LR,
                   "describe": "thesis 4.3 (resolution only): path lowres -> fine",
                   "overrides": {**CONSTANT, "mlsgd.path": ["lowres", "fine"]}},
    "mlsgd-graph": {"kind": "mlsgd", "lr": BASE_LR,
                    "describe": "beyond/fmnist-depth-resolution.toml: path both -> shallow -> "
                                "fine (both coarsenings)",
                    "overrides": {**CONSTANT, "mlsgd.path": ["both", "shallow", "fine"]}},
    "mlsgd-alternate": {"kind": "mlsgd", "lr": BASE_LR,
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
SMOKE_BUDGET = 3.0  # seconds: the planner fits one short cycle, so every code path runs


# --------------------------------------------------------------------------- configuration


class Setup:
    """Everything about one hierarchy x preset: base overrides, levels, thresholds, budget."""

    def __init__(self, args: Any, hierarchy: str) -> None:
        import mlsgd_dsl

        preset = PRESETS[args.preset]
        self.args = args
        self.hierarchy = hierarchy
        self.file = C.ROOT / FILES[hierarchy, preset["data"]]
        self.scaling: dict[str, Any] = {}
        if preset["scale"]:
            self.scaling.update(SCALING[hierarchy])
        if args.preset == "cifar10" and args.download:
            self.scaling["data.options"] = {"download": True}
        if args.smoke:
            self.scaling.update(SMOKE)
            self.scaling["model.channels"] = SMOKE_CHANNELS[hierarchy]
            self.scaling.pop("data.subset", None)
        ladder = preset["thresholds"]
        if isinstance(ladder, dict):
            ladder = ladder[hierarchy]
        self.thresholds = args.thresholds or (SMOKE_THRESHOLDS if args.smoke else ladder)
        self.base = {**MECHANICS, **self.scaling, "report.thresholds": self.thresholds}
        c = mlsgd_dsl.compile(mlsgd_dsl.load(self.file, overrides=self.base))
        self.finest = c.finest
        self.levels = list(c.levels)
        self.h = {n: c.h(n) for n in self.levels}
        self.budget = (args.budget if args.budget is not None else
                       SMOKE_BUDGET if args.smoke else preset["budget"])

    def overrides(self, name: str) -> dict[str, Any]:
        """Contender ``name``'s overrides on top of :attr:`base` and the bench's own."""
        spec = CONTENDERS[name]
        o = {"mlsgd.correction": "none", **spec["overrides"], "mlsgd.lr": self.lr(name)}
        if spec["kind"] == "sgd":
            o.update({"mlsgd.init": "independent", "mlsgd.path": [self.finest],
                      "mlsgd.optimizer_state": "keep", "mlsgd.epochs": self.args.sgd_eval})
        return o

    def lr(self, name: str) -> float | dict[str, float]:
        rule = CONTENDERS[name]["lr"]
        if rule == "h":
            return {n: BASE_LR * self.h[self.finest] / self.h[n] for n in self.levels}
        if rule == "sqrth":
            return {n: BASE_LR * (self.h[self.finest] / self.h[n]) ** 0.5 for n in self.levels}
        return float(rule)


# --------------------------------------------------------------------------- report


def summarise(setup: Setup, out: Path, contenders: list[str], references: list[str],
              info: dict[str, Any], started: float) -> str:
    from bench_report import tables

    body = C.preamble(info, started, {
        "hierarchy": f"`{setup.file.relative_to(C.ROOT)}` with overrides "
                     f"`{json.dumps(setup.scaling)}`" + (" (SMOKE: tiny synthetic data; the "
                                                        "numbers mean nothing)"
                                                        if setup.args.smoke else ""),
        "runner": "`mlsgd_dsl.bench.run_bench` (what `mlsgd-dsl bench` runs): budget planner "
                  "(`mlsgd.plan = \"auto\"`), finest network validated after every finest "
                  "epoch and prolongation, SGD contenders as a one-level path validated every "
                  f"{setup.args.sgd_eval:g} epoch",
        "clock": "the runner's train_time (training only; evaluation, BatchNorm "
                 "re-estimation for it, checkpoints and logging excluded)",
        "budget": f"{setup.budget:g} s of train_time per run; seeds "
                  f"{list(range(setup.args.seeds))}; contenders interleaved, order rotated "
                  "per seed",
    })
    body += "\n**Contenders**\n\n" + C.table(
        ["contender", "what", "overrides"],
        [[n, CONTENDERS[n]["describe"], f"`{json.dumps(setup.overrides(n))}`"]
         for n in contenders])
    return body + tables(out, setup.thresholds, references)


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
                   help="report ratios against this contender (default: every SGD contender)")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="fmnist-small: scaled Fashion-MNIST (~25 min per hierarchy on 2 idle "
                        "cores, the default); fmnist: the unscaled twins; cifar10: the thesis' "
                        "CIFAR-10 files (use on a GPU); the last two need --budget")
    p.add_argument("--budget", type=float, default=None,
                   help="train_time budget per run in seconds (default: the preset's)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                   help=f"comma-separated, from {', '.join(CONTENDERS)}")
    p.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")],
                   default=None, help="validation-accuracy ladder, e.g. 0.8,0.85,0.88")
    p.add_argument("--sgd-eval", type=float, default=0.5,
                   help="SGD is validated every this many epochs")
    p.add_argument("--download", action="store_true",
                   help="--preset cifar10: let the data source download CIFAR-10")
    args = p.parse_args(argv)
    args.preset = args.preset or "fmnist-small"
    if args.device == "cuda" and args.preset == "fmnist-small" and "--preset" not in sys.argv:
        print("note: --device cuda with the CPU-sized preset; the GPU configuration is "
              "--preset cifar10", file=sys.stderr)
    if args.budget is None and not args.smoke and PRESETS[args.preset]["budget"] is None:
        p.error(f"--preset {args.preset} has no default budget: give --budget SECONDS")
    args.seeds = args.seeds or (2 if args.smoke else 3)
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
    results = C.results_path(args)
    info = C.machine(args.device)
    from mlsgd_dsl.bench import run_bench

    with C.workdir(args) as work:
        for hierarchy, names, reference, label in jobs:
            started = time.time()
            setup = Setup(args, hierarchy)
            references = ([reference] if reference else
                          [n for n in names if CONTENDERS[n]["kind"] == "sgd"] or [names[0]])
            out = work / f"tta-{label}"
            print(f"[{hierarchy}] {setup.file}: {len(names)} contenders x {args.seeds} seeds, "
                  f"{setup.budget:g} s each ({out})", flush=True)
            print(run_bench(setup.file, list(setup.base.items()), budget=setup.budget,
                            seeds=args.seeds, contenders=names, thresholds=setup.thresholds,
                            out=out, overwrite=True, device=args.device,
                            custom={n: list(setup.overrides(n).items()) for n in names},
                            baseline=references[0]), flush=True)
            body = summarise(setup, out, names, references, info, started)
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
