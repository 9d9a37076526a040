"""Correction overhead: seconds per cycle of each correction strategy against no correction.

The shipped Fashion-MNIST twins of the thesis' corrected runs (``hierarchies/fashion-mnist/
depth{,-det,-det-vr,-sto,-sto-vr}.toml``: deterministic / stochastic (3.125 %) × variance
reduction, step sizes and λ as in the thesis) run one V-cycle each with the thesis' epochs per
level (3 / 5 / 7), every cycle corrected (``uncorrected_cycles = 0``), interleaved: repetition
by repetition, each strategy in turn (order rotated). The cycle's time is the runner's
``train_time`` (evaluation excluded). Ratio = strategy / none, paired per repetition. Targets:
deterministic (± VR) ≤ 1.3x, stochastic (± VR) ≤ 1.1x (the thesis saw 1.6–2x).

Where the time goes is measured with timers put around the runner's own calls in this process
(nothing in the package is changed): gradient passes (``Driver.gradient``: full data,
sampled, or through a variance-reduction snapshot), snapshot copies, BatchNorm re-estimation,
transfers (``Transfer.restrict/prolongate/adjoint``), angle checks (``AngleCheck.ok``) and the
forward passes of the VR snapshot inside the training steps. Times are exclusive (a transfer
inside an angle check counts once, as transfer). "Training steps" is the rest of the cycle:
the levels' SGD steps, including the VR snapshot's backward passes.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import _common as C

STRATEGIES = {
    "none": ("hierarchies/fashion-mnist/depth.toml", None),
    "det": ("hierarchies/fashion-mnist/depth-det.toml", 1.3),
    "det-vr": ("hierarchies/fashion-mnist/depth-det-vr.toml", 1.3),
    "sto": ("hierarchies/fashion-mnist/depth-sto.toml", 1.1),
    "sto-vr": ("hierarchies/fashion-mnist/depth-sto-vr.toml", 1.1),
    # optional: the deterministic correction plus the angle condition checked at every step
    # (mu close to -1: it measures the cost and practically never rejects)
    "det-angle": ("hierarchies/fashion-mnist/depth-det.toml", 1.3),
}
EXTRA = {"det-angle": {"mlsgd.angle": {"mu": -0.99, "gradient": "full", "every": 1}}}
DEFAULT = ["none", "det", "det-vr", "sto", "sto-vr"]
SCALING = {"model.channels": [8, 16, 32], "data.subset": 5_000, "data.validation": 5_000}
SMOKE = {
    "data.source": "synthetic",
    "data.options": {"train": 250, "test": 50, "size": 16, "channels": 1, "seed": 0},
    "data.validation": 50, "mlsgd.batch_size": 50, "mlsgd.full_batch_size": 100,
    "model.channels": [4, 4, 4], "mlsgd.epochs": {"fine": 1, "mid": 1, "coarse": 1},
    "mlsgd.bn_recalibration": 100,
}
MECHANICS = {"report.checkpoint": "none", "report.plot": False, "mlsgd.eval.every": "cycle",
             "mlsgd.uncorrected_cycles": 0, "mlsgd.cycles": 1}
CATEGORIES = ["full gradient", "sampled gradient", "snapshot gradient", "snapshot copy",
              "BN re-estimation", "transfers", "angle checks", "VR snapshot forward"]


class Profiler:
    """Exclusive wall time per category, from timers wrapped around the runner's calls."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stack: list[list[Any]] = []
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.images: dict[str, int] = {}
        self.saved: list[tuple[Any, str, Any]] = []

    def reset(self) -> None:
        self.total, self.count, self.images = {}, {}, {}

    def enter(self, cat: str) -> None:
        C.sync(self.device)
        self.stack.append([cat, time.perf_counter(), 0.0])

    def leave(self) -> None:
        C.sync(self.device)
        cat, start, child = self.stack.pop()
        spent = time.perf_counter() - start
        self.total[cat] = self.total.get(cat, 0.0) + spent - child
        self.count[cat] = self.count.get(cat, 0) + 1
        if self.stack:
            self.stack[-1][2] += spent

    def wrap(self, owner: Any, attr: str, category: Any) -> None:
        original = getattr(owner, attr)
        self.saved.append((owner, attr, original))
        prof = self

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cat = category(*args, **kwargs) if callable(category) else category
            prof.enter(cat)
            try:
                return original(*args, **kwargs)
            finally:
                prof.leave()

        setattr(owner, attr, wrapper)

    def install(self) -> None:
        from mlsgd_dsl import operators
        from mlsgd_dsl.runner import angle, bn, driver

        def gradient_category(trainer: Any, lvl: str, sample: Any = None, *,
                              model: Any = None) -> str:
            if model is not None:
                cat = "snapshot gradient"
            elif sample is not None:
                cat = "sampled gradient"
            else:
                cat = "full gradient"
            n = len(sample.indices) if sample is not None else len(
                trainer.levels[lvl].data.train_x)
            self.images[cat] = self.images.get(cat, 0) + n
            return cat

        self.wrap(driver.Driver, "gradient", gradient_category)
        self.wrap(bn, "recalibrate", "BN re-estimation")
        for name in ("restrict", "prolongate", "adjoint"):
            self.wrap(operators.Transfer, name, "transfers")
        self.wrap(angle.AngleCheck, "ok", "angle checks")
        # snapshot copies, and the VR snapshot's forward passes in the training steps
        original = driver.Driver.snapshot
        prof = self

        def snapshot(trainer: Any, lvl: str) -> Any:
            prof.enter("snapshot copy")
            try:
                snap = original(trainer, lvl)
            finally:
                prof.leave()
            forward = snap.forward

            def timed_forward(*a: Any, **k: Any) -> Any:
                if prof.stack:  # inside a gradient pass: counted there
                    return forward(*a, **k)
                prof.enter("VR snapshot forward")
                try:
                    return forward(*a, **k)
                finally:
                    prof.leave()

            snap.forward = timed_forward
            return snap

        self.saved.append((driver.Driver, "snapshot", original))
        driver.Driver.snapshot = snapshot

    def uninstall(self) -> None:
        for owner, attr, original in reversed(self.saved):
            setattr(owner, attr, original)
        self.saved.clear()


def compile_strategy(args: Any, name: str) -> Any:
    import mlsgd_dsl

    file, _ = STRATEGIES[name]
    o = {**MECHANICS, **SCALING, **EXTRA.get(name, {})}
    if args.smoke:
        o.update(SMOKE)
        o.pop("data.subset", None)
    if args.full_batch_size:
        o["mlsgd.full_batch_size"] = args.full_batch_size
    c = mlsgd_dsl.compile(mlsgd_dsl.load(str(C.ROOT / file), overrides=o))
    c.data(args.device)  # cached on the compiled object: every repetition reuses the tensors
    return c, o


def one_cycle(args: Any, compiled: Any, out: Path, prof: Profiler) -> dict[str, Any]:
    import mlsgd_dsl
    from mlsgd_dsl.runner.records import read_rows

    prof.reset()
    summary = mlsgd_dsl.run(compiled, out_dir=out, quiet=True, device=args.device,
                            validate=False, overwrite=True)
    rows = read_rows(out)
    events = [str(r.get("event")) for r in rows if r.get("event")]
    return {"cycle": float(summary["training_time"]), "parts": dict(prof.total),
            "counts": dict(prof.count), "images": dict(prof.images),
            "events": [e for e in events
                       if e.startswith(("diverged", "rejected", "early_stop", "time"))],
            "epochs": summary.get("epochs")}


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=None, help="cycles per strategy (default 3)")
    p.add_argument("--strategies", default=",".join(DEFAULT),
                   help=f"comma-separated, from {', '.join(STRATEGIES)}")
    p.add_argument("--full-batch-size", type=int, default=None,
                   help="override mlsgd.full_batch_size (chunk of the gradient passes)")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 3)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [n for n in names if n not in STRATEGIES]
    if bad:
        p.error(f"unknown strategies {bad}")
    if "none" not in names:
        names.insert(0, "none")
    C.setup_torch(args)
    info = C.machine(args.device)
    started = time.time()
    compiled = {}
    overrides = {}
    for n in names:
        compiled[n], overrides[n] = compile_strategy(args, n)
    prof = Profiler(args.device)
    prof.install()
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    try:
        with C.workdir(args) as work:
            # warm-up: a short uncorrected cycle (first-call allocations, lazy imports)
            import mlsgd_dsl

            warm = mlsgd_dsl.compile(mlsgd_dsl.load(
                str(C.ROOT / STRATEGIES["none"][0]),
                overrides={**overrides["none"], "mlsgd.epochs": 0.05}))
            mlsgd_dsl.run(warm, out_dir=work / "warmup", quiet=True, device=args.device,
                          validate=False, overwrite=True)
            for rep in range(args.reps):
                for n in C.rotate(names, rep):
                    r = one_cycle(args, compiled[n], work / f"{n}-{rep}", prof)
                    results[n].append(r)
                    print(f"rep {rep} {n:9s} cycle {r['cycle']:.2f} s  " + ", ".join(
                        f"{k} {v:.2f}" for k, v in sorted(r["parts"].items())) +
                        (f"  events {r['events']}" if r["events"] else ""), flush=True)
    finally:
        prof.uninstall()

    base = results["none"]
    rows, parts_rows = [], []
    for n in names:
        rs = results[n]
        ratios = [r["cycle"] / b["cycle"] for r, b in zip(rs, base)]
        target = STRATEGIES[n][1]
        med = C.median(ratios)
        rows.append([n, f"`{STRATEGIES[n][0]}`", C.spread([r["cycle"] for r in rs], "{:.1f}"),
                     C.spread(ratios, "{:.3f}"), f"≤ {target}" if target else "–",
                     ("yes" if med <= target else "no") if target and med else "–",
                     sum(len(r["events"]) for r in rs)])
        parts = {c: C.median([r["parts"].get(c, 0.0) for r in rs]) for c in CATEGORIES}
        cyc = C.median([r["cycle"] for r in rs])
        steps = C.median([r["cycle"] - sum(r["parts"].values()) for r in rs])
        base_steps = C.median([r["cycle"] - sum(r["parts"].values()) for r in base])
        imgs = {c: C.median([r["images"].get(c, 0) for r in rs]) for c in
                ("full gradient", "sampled gradient", "snapshot gradient")}
        parts_rows.append([n, f"{cyc:.1f}", f"{steps:.1f} ({steps - base_steps:+.1f})",
                           *(f"{parts[c]:.2f}" if parts[c] else "–" for c in CATEGORIES),
                           ", ".join(f"{c.split()[0]} {int(v):,}" for c, v in imgs.items()
                                     if v) or "–"])
    ex = compiled["none"]
    h = ex.hierarchy
    body = C.preamble(info, started, {
        "hierarchies": "the Fashion-MNIST twins of the thesis' corrected runs, overrides "
                       f"`{json.dumps({**SCALING, **(SMOKE if args.smoke else {})})}` (+ "
                       f"`{json.dumps(MECHANICS)}`)",
        "cycle": "V-cycle, epochs per level "
                 + ", ".join(f"{n} {h.for_level(h.mlsgd.epochs, n):g}"
                             for n in ex.levels[::-1])
                 + f"; {len(ex.data(args.device)[ex.finest].train_x)} training images; "
                   f"full-gradient chunks of {h.mlsgd.full_batch_size}",
        "repetitions": f"{args.reps} cycles per strategy, interleaved (order rotated), "
                       "ratios paired per repetition",
    })
    body += "\n" + C.table(["strategy", "file", "s / cycle", "ratio to none", "target",
                            "met", "rejections"], rows)
    body += ("\n**Where the time goes** (seconds per cycle, medians; exclusive times; "
             "training steps = the rest, with the change against none in brackets: for VR "
             "strategies it holds the snapshot's backward passes)\n\n")
    body += C.table(["strategy", "cycle", "training steps", *CATEGORIES,
                     "images in gradient passes"], parts_rows)
    body += "\n<details><summary>Raw</summary>\n\n" + "\n".join(
        f"- {n} rep {i}: cycle {r['cycle']:.3f} s; " + ", ".join(
            f"{k} {v:.3f} s ×{r['counts'].get(k, 0)}" for k, v in sorted(r["parts"].items()))
        + (f"; events {r['events']}" if r["events"] else "")
        for n in names for i, r in enumerate(results[n])) + "\n</details>\n"
    C.report(C.results_path(args), f"correction_overhead/{args.device}",
             f"Correction overhead — {args.device}" + (" (smoke)" if args.smoke else ""), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(C.cli(main))
