"""Framework overhead: seconds per epoch of each level under the runner against a plain loop.

For every level of the hierarchy, in one process and interleaved (runner epoch, plain epoch,
order alternating from repetition to repetition):

* **runner**: the runner's level solver — ``Level.new_optimizer()`` + ``train_visit(level,
  Visit(epochs=1))``, exactly what ``Driver.smooth`` runs for one visit of one epoch (batches
  from a seeded permutation, augmentation on whole batches, ℓ2 and smoothness terms, loss and
  accuracy accumulated on the device, the divergence check); no correction;
* **plain**: a hand-written PyTorch loop over the same model (a copy), the same in-memory
  tensors, batch size, augmentation function (``mlsgd_dsl.data.augment.augment_batch``, the same
  random crops and flips), ``torch.optim.SGD`` with the same step size and momentum and the ℓ2
  term as ``weight_decay = 2·l2`` on the non-bias weights (the same gradient), the smoothness
  penalty in the loss, and the same per-epoch loss/accuracy bookkeeping.

For the finest level a third contender, **run()**, is ``mlsgd_dsl.run`` with ``method = "sgd"``
for one epoch, timed by its own ``training_time`` (the whole public path: trainer set-up
excluded, per-epoch logging and evaluation excluded as the runner excludes them).

Ratio = runner / plain per repetition (paired), median and spread; target within 3 %.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import _common as C

FILES = {"quickstart": "hierarchies/quickstart.toml",
         "depth": "hierarchies/fashion-mnist/depth.toml"}
# The depth twin scaled as in time_to_accuracy.py (channels 8/16/32, 10 000 training images).
SCALING = {
    "quickstart": {},
    "depth": {"model.channels": [8, 16, 32], "data.subset": 10_000, "data.validation": 5_000},
}
SMOKE = {
    "data.source": "synthetic",
    "data.options": {"train": 250, "test": 50, "size": 16, "channels": 1, "seed": 0},
    "data.validation": 50, "mlsgd.batch_size": 50,
}
SMOKE_CHANNELS = {"quickstart": [4, 4], "depth": [4, 4, 4]}
MECHANICS = {"report.checkpoint": "none", "report.plot": False, "mlsgd.correction": "none"}


def plain_epoch(model: Any, x: Any, y: Any, *, batch: int, optimizer: Any, generator: Any,
                flip: bool, crop: float, fill: Any, smoothness: float) -> tuple[float, float]:
    """One epoch of a hand-written training loop."""
    import torch
    import torch.nn.functional as F

    from mlsgd_dsl.data.augment import augment_batch

    model.train()
    n = len(x)
    nb = max(1, n // batch)
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    augment = flip or crop > 0
    for b in range(nb):
        idx = perm[b * batch:(b + 1) * batch]
        xb, yb = x[idx], y[idx]
        if augment:
            xb = augment_batch(xb, flip=flip, crop=crop, fill=fill, generator=generator)
        out = model(xb)
        ce = F.cross_entropy(out, yb)
        loss = ce + smoothness * model.smoothness() if smoothness else ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += ce.detach()
            correct += (out.detach().argmax(1) == yb).sum()
    return float(loss_sum) / nb, float(correct) / (nb * batch)


def plain_optimizer(model: Any, spec: Any, lr: float, l2: float) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in params if p.ndim > 1]
    others = [p for p in params if p.ndim <= 1]
    groups = [{"params": weights, "weight_decay": 2.0 * l2},
              {"params": others, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=spec.momentum,
                           nesterov=spec.nesterov and spec.momentum > 0)


def bench_hierarchy(args: Any, name: str, work: Path) -> dict[str, Any]:
    import torch

    import mlsgd_dsl
    from mlsgd_dsl.runner.level import FixedHost, Visit, train_visit
    from mlsgd_dsl.runner.run import Trainer

    overrides = {**MECHANICS, **SCALING[name]}
    if args.smoke:
        overrides.update(SMOKE)
        overrides["model.channels"] = SMOKE_CHANNELS[name]
        overrides.pop("data.subset", None)
    overrides["mlsgd.optimizer"] = {"momentum": args.momentum}
    file = str(C.ROOT / FILES[name])
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(file, overrides=overrides))
    trainer = Trainer(compiled, out_dir=work / f"{name}-trainer", quiet=True,
                      device=args.device, validate=False, overwrite=True)
    device = trainer.device
    spec = compiled.hierarchy.mlsgd
    aug = compiled.hierarchy.data.augment

    host = FixedHost(torch.Generator().manual_seed(0))
    contenders: dict[str, dict[str, Any]] = {}
    for level_name, lv in trainer.levels.items():
        model = copy.deepcopy(lv.model)
        opt = plain_optimizer(model, lv.optimizer_spec, lv.lr, spec.objective.l2)
        gen = torch.Generator().manual_seed(0)
        smooth = spec.objective.smoothness if callable(getattr(model, "smoothness", None)) \
            else 0.0

        def runner_epoch(lv=lv, epochs=1.0) -> None:
            lv.new_optimizer()  # optimizer_state = "reset": a fresh optimiser every visit
            train_visit(lv, Visit(epochs=epochs), host)

        def plain(model=model, lv=lv, opt=opt, gen=gen, smooth=smooth) -> None:
            plain_epoch(model, lv.data.train_x, lv.data.train_y, batch=lv.batch_size,
                        optimizer=opt, generator=gen, flip=aug.flip, crop=aug.crop,
                        fill=lv.augment.fill, smoothness=smooth)

        contenders[level_name] = {"runner": runner_epoch, "plain": plain, "level": lv}

    sgd_compiled = None
    finest = compiled.finest
    if not args.no_run:
        sgd_overrides = {**overrides, "mlsgd.method": "sgd", "mlsgd.sgd_epochs": 1.0,
                         "mlsgd.eval.every": "cycle"}
        sgd_compiled = mlsgd_dsl.compile(mlsgd_dsl.load(file, overrides=sgd_overrides))
        sgd_compiled.data(device)  # cached on the object: later runs reuse the tensors

    def run_epoch(k: int) -> float:
        summary = mlsgd_dsl.run(sgd_compiled, out_dir=work / f"{name}-run{k}", quiet=True,
                                device=args.device, validate=False, overwrite=True)
        return float(summary["training_time"])

    # warm-up: a few batches of everything (first-call allocations, lazy initialisation)
    for c in contenders.values():
        lv = c["level"]
        frac = min(1.0, 3 / max(1, lv.batches_per_epoch))
        c["runner"](epochs=frac)
        C.timed(c["plain"], device)
    if sgd_compiled is not None:
        run_epoch(-1)

    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        for level_name in C.rotate(list(contenders), rep):
            c = contenders[level_name]
            order = ["runner", "plain"] if rep % 2 == 0 else ["plain", "runner"]
            if level_name == finest and sgd_compiled is not None:
                order = C.rotate(order + ["run()"], rep)
            for who in order:
                if who == "run()":
                    seconds = run_epoch(rep)
                else:
                    seconds, _ = C.timed(c[who], device)
                times.setdefault((level_name, who), []).append(seconds)
            print(f"[{name}] rep {rep} {level_name}: " + ", ".join(
                f"{w} {times[level_name, w][-1]:.3f} s" for w in order), flush=True)

    levels = []
    for level_name in compiled.levels[::-1]:  # finest first
        if level_name not in contenders:
            continue
        lv = contenders[level_name]["level"]
        plain = times[level_name, "plain"]
        entry = {"level": level_name, "images": len(lv.data.train_x), "batch": lv.batch_size,
                 "batches": lv.batches_per_epoch, "plain": plain,
                 "runner": times[level_name, "runner"]}
        entry["ratio"] = [a / b for a, b in zip(entry["runner"], plain)]
        if (level_name, "run()") in times:
            entry["run()"] = times[level_name, "run()"]
            entry["run_ratio"] = [a / b for a, b in zip(entry["run()"], plain)]
        levels.append(entry)
    return {"name": name, "file": FILES[name], "overrides": overrides, "levels": levels}


def section(args: Any, results: list[dict[str, Any]], info: dict[str, Any],
            started: float) -> str:
    import json

    body = C.preamble(info, started, {
        "what": "seconds per epoch of each level; runner = Level.new_optimizer() + "
                "train_visit(Visit(epochs=1)) (the level solver, no correction); plain = a "
                "hand-written loop (same model copy, tensors, batch size, augment_batch, SGD "
                "with weight_decay = 2·l2 on the weights, smoothness in the loss); run() = "
                "mlsgd_dsl.run(method='sgd', 1 epoch) training_time (finest level only)",
        "repetitions": f"{args.reps}, interleaved per level, order alternating; ratio = "
                       "runner/plain paired per repetition; target: within 3 %",
        "optimizer": f"SGD, momentum {args.momentum}",
    })
    for r in results:
        body += (f"\n**{r['name']}** (`{r['file']}`, overrides "
                 f"`{json.dumps({k: v for k, v in r['overrides'].items() if k not in MECHANICS})}`)"
                 "\n\n")
        rows = []
        for e in r["levels"]:
            ratio = C.median(e["ratio"])
            rows.append([e["level"], e["images"], f"{e['batches']} × {e['batch']}",
                         C.spread(e["plain"], "{:.3f}"), C.spread(e["runner"], "{:.3f}"),
                         C.spread(e["ratio"], "{:.3f}"),
                         "yes" if ratio is not None and abs(ratio - 1) <= 0.03 else "no",
                         C.spread(e["run_ratio"], "{:.3f}") if "run_ratio" in e else "–"])
        body += C.table(["level", "images", "batches", "plain s/epoch", "runner s/epoch",
                         "runner / plain", "within 3 %", "run() / plain"], rows)
        body += "\nRaw seconds per epoch (plain | runner | run()):\n\n" + "\n".join(
            f"- {e['level']}: " + " | ".join(
                ", ".join(f"{x:.3f}" for x in e.get(k, [])) or "–"
                for k in ("plain", "runner", "run()")) for e in r["levels"]) + "\n"
    return body


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--hierarchy", choices=["quickstart", "depth", "all"], default="all")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per level (default 5; with --smoke 2)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of both loops")
    p.add_argument("--no-run", action="store_true", help="skip the mlsgd_dsl.run contender")
    args = p.parse_args(argv)
    args.reps = args.reps or (2 if args.smoke else 5)
    C.setup_torch(args)
    info = C.machine(args.device)
    started = time.time()
    names = ["quickstart", "depth"] if args.hierarchy == "all" else [args.hierarchy]
    with C.workdir(args) as work:
        results = [bench_hierarchy(args, n, work) for n in names]
    body = section(args, results, info, started)
    C.report(C.results_path(args), f"overhead/{args.hierarchy}/{args.device}",
             f"Framework overhead — {', '.join(names)}, {args.device}"
             + (" (smoke)" if args.smoke else ""), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(C.cli(main))
