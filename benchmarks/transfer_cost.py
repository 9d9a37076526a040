"""Transfer cost: one restriction + prolongation of all parameters against one finest epoch.

For every shipped hierarchy (``hierarchies/**/*.toml`` — the thesis' files, the Fashion-MNIST
twins, ``beyond/`` — and, when the ``mlsgd-width`` plugin is installed, its
``width-synthetic.toml``), one *round* is
what a cycle of the runner does with the operators: along every path of the hierarchy, the
finest state dict (parameters and BatchNorm buffers) restricted edge by edge down to the
coarsest level and copied into each coarse model, then a step of every coarse level's
parameters prolongated edge by edge up and added to the finer level's parameters. The round is
timed many times (median). Files that share a network and transfer (they differ only in
``[mlsgd]`` settings) are measured once and listed together.

The finest-level epoch it is compared with is *estimated* from a timed fraction of an epoch: a
number of training steps (random inputs of the level's shape, the hierarchy's batch size and
augmentation, SGD with ℓ2 as weight decay) times the number of batches in an epoch of the
hierarchy's training set (data-set size from the data source, minus validation, or the
subset). ``--epoch-batches 0`` times a whole epoch instead. Target: round < 1 % of an epoch.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import time
from typing import Any

import _common as C

TRAIN_SIZES = {"fashion-mnist": 60_000, "mnist": 60_000, "cifar10": 50_000}
WIDTH = "plugins/mlsgd-width/hierarchies/width-synthetic.toml"
# --smoke: two shipped files (a depth and a resolution hierarchy) made tiny
SMOKE_OVERRIDES = {
    "hierarchies/quickstart.toml": {"model.channels": [4, 4], "mlsgd.batch_size": 20},
    "hierarchies/resolution-fashion-mnist.toml": {"model.channels": [4, 4],
                                                  "mlsgd.batch_size": 20},
    WIDTH: {"mlsgd.batch_size": 20},
}


def shipped(smoke: bool) -> list[str]:
    if smoke:
        files = ["hierarchies/quickstart.toml", "hierarchies/resolution-fashion-mnist.toml"]
    else:
        files = sorted((str(p.relative_to(C.ROOT)) for p in
                        (C.ROOT / "hierarchies").rglob("*.toml")),
                       key=lambda f: (f.count("/"), f))
    if importlib.util.find_spec("mlsgd_width") is not None and (C.ROOT / WIDTH).is_file():
        files.append(WIDTH)
    return files


def signature(h: Any) -> str:
    d = h.model_dump(mode="json")
    keep = {k: d.get(k) for k in ("model", "levels", "edges", "transfer")}
    keep["data"] = {k: d["data"].get(k) for k in ("source", "options", "augment", "validation",
                                                  "subset")}
    keep["batch"] = d["mlsgd"].get("batch_size")
    keep["path"] = d["mlsgd"].get("path")
    return json.dumps(keep, sort_keys=True)


def train_images(h: Any) -> int:
    d = h.data
    total = TRAIN_SIZES.get(d.source)
    if total is None:
        total = int((d.options or {}).get("train", 6000))  # the synthetic source's default
    val = int(d.validation) if d.validation >= 1 else int(round(d.validation * total))
    n = total - val
    return min(n, d.subset) if d.subset else n


def round_trip(compiled: Any, models: dict[str, Any], steps: dict[str, Any]) -> None:
    """One cycle's worth of transfers along every path (as the runner does them)."""
    import torch

    with torch.no_grad():
        for path in compiled.paths:
            for fine, coarse in zip(path[::-1], path[::-1][1:]):     # down: restrict
                tr = compiled.transfer(coarse, fine)
                sd = tr.restrict(models[fine].state_dict())
                own = models[coarse].state_dict()
                for k, v in sd.items():
                    own[k].copy_(v)
            for coarse, fine in zip(path, path[1:]):                 # up: prolongate a step
                tr = compiled.transfer(coarse, fine)
                up = tr.prolongate(steps[coarse])
                names = [n for n, _ in models[fine].named_parameters()]
                params = [p for _, p in models[fine].named_parameters()]
                torch._foreach_add_(params, [up[n] for n in names])


def time_round(compiled: Any, device: str, min_time: float, min_reps: int) -> list[float]:
    import torch

    used = []
    for path in compiled.paths:
        used += [n for n in path if n not in used]
    models = {n: compiled.model(n).to(device) for n in used}
    gen = torch.Generator().manual_seed(0)
    steps = {n: {k: 1e-3 * torch.randn(p.shape, generator=gen).to(device)
                 for k, p in models[n].named_parameters()} for n in used}
    round_trip(compiled, models, steps)  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        seconds, _ = C.timed(lambda: round_trip(compiled, models, steps), device)
        times.append(seconds)
        if len(times) >= 10_000:
            break
    return times


def epoch_estimate(compiled: Any, h: Any, device: str, batches: int) -> dict[str, Any]:
    """Seconds of one finest-level epoch, from ``batches`` timed steps (0: a whole epoch)."""
    import torch
    import torch.nn.functional as F

    from mlsgd_dsl.data.augment import augment_batch

    finest = compiled.finest
    node = compiled.nodes[finest]
    bsz = int(h.for_level(h.mlsgd.batch_size, finest))
    n = train_images(h)
    per_epoch = max(1, n // bsz)
    model = compiled.model(finest).to(device).train()
    l2 = h.mlsgd.objective.l2
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": [p for p in params if p.ndim > 1],
                            "weight_decay": 2 * l2},
                           {"params": [p for p in params if p.ndim <= 1]}], lr=0.01,
                          momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, *node.input_shape, generator=gen).to(device)
    y = torch.randint(node.num_classes, (bsz,), generator=gen).to(device)
    aug = h.data.augment
    smooth = h.mlsgd.objective.smoothness if callable(getattr(model, "smoothness", None)) \
        else 0.0

    def step() -> None:
        xb = augment_batch(x, flip=aug.flip, crop=aug.crop, generator=gen) \
            if (aug.flip or aug.crop) else x
        out = model(xb)
        loss = F.cross_entropy(out, y)
        if smooth:
            loss = loss + smooth * model.smoothness()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()  # warm-up
    count = per_epoch if batches <= 0 else min(batches, per_epoch)
    seconds, _ = C.timed(lambda: [step() for _ in range(count)], device)
    return {"epoch": seconds / count * per_epoch, "timed_batches": count,
            "batches_per_epoch": per_epoch, "batch": bsz, "images": n,
            "estimated": count < per_epoch}


def main(argv: list[str] | None = None) -> int:
    import mlsgd_dsl

    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--epoch-batches", type=int, default=None,
                   help="timed training steps for the epoch estimate (0: a whole epoch; "
                        "default 20, with --smoke 2)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timed rounds per hierarchy (default 2, with --smoke 0.1)")
    args = p.parse_args(argv)
    if args.epoch_batches is None:
        args.epoch_batches = 2 if args.smoke else 20
    if args.min_time is None:
        args.min_time = 0.1 if args.smoke else 2.0
    C.setup_torch(args)
    info = C.machine(args.device)
    started = time.time()

    from mlsgd_dsl.errors import UserError

    groups: dict[str, dict[str, Any]] = {}
    failed: list[list[str]] = []
    for file in shipped(args.smoke):
        try:
            h = mlsgd_dsl.load(str(C.ROOT / file),
                               overrides=SMOKE_OVERRIDES.get(file) if args.smoke else None)
        except UserError as exc:  # e.g. a plugin that is not installed
            failed.append([f"`{file}`", str(exc).splitlines()[0]])
            continue
        sig = signature(h)
        if sig in groups:
            groups[sig]["files"].append(file)
            continue
        groups[sig] = {"files": [file], "h": h}

    rows, raw = [], []
    for g in groups.values():
        h = g["h"]
        compiled = mlsgd_dsl.compile(h)
        times = time_round(compiled, args.device, args.min_time, 5 if args.smoke else 20)
        epoch = epoch_estimate(compiled, h, args.device, args.epoch_batches)
        rnd = statistics.median(times)
        frac = rnd / epoch["epoch"]
        params = {n: compiled.nodes[n].n_parameters for n in compiled.levels}
        edges = sum(len(p) - 1 for p in compiled.paths)
        label = ", ".join(f"`{f}`" for f in g["files"])
        print(f"{g['files'][0]} (+{len(g['files']) - 1}): round {1e3 * rnd:.2f} ms "
              f"({len(times)} reps), epoch {epoch['epoch']:.1f} s -> {100 * frac:.4f} %",
              flush=True)
        rows.append([label, " / ".join(f"{params[n]:,}" for n in compiled.levels[::-1]), edges,
                     f"{1e3 * rnd:.2f} ({1e3 * min(times):.2f}–{1e3 * max(times):.2f})",
                     f"{epoch['epoch']:.1f}" + (" (est.)" if epoch["estimated"] else ""),
                     f"{100 * frac:.4f}", "yes" if frac < 0.01 else "no"])
        raw.append({"files": g["files"], "round_s": times, **epoch})

    body = C.preamble(info, started, {
        "round": "restrict the finest state dict (parameters + buffers) down every edge of "
                 "every path and copy it in, then prolongate a parameter step up every edge "
                 "and add it (what one cycle does); median (min–max) of the timed rounds",
        "epoch": (f"estimated from {args.epoch_batches} timed training steps (random inputs "
                  "of the finest level's shape, the file's batch size and augmentation, SGD "
                  "with momentum and ℓ2) × batches per epoch of the file's training set"
                  if args.epoch_batches > 0 else "a whole timed epoch of training steps on "
                                                 "random inputs of the finest level's shape"),
    })
    body += "\n" + C.table(["hierarchy file(s)", "parameters (finest → coarsest)", "edges",
                            "round ms", "finest epoch s", "round / epoch %", "< 1 %"], rows)
    if failed:
        body += "\nNot measured (the file does not load here):\n\n" + C.table(
            ["file", "error"], failed)
    body += "\n<details><summary>Raw</summary>\n\n" + "\n".join(
        f"- {r['files'][0]}: epoch {r['epoch']:.2f} s from {r['timed_batches']} of "
        f"{r['batches_per_epoch']} batches of {r['batch']} ({r['images']} images); rounds "
        f"{len(r['round_s'])}, min {1e3 * min(r['round_s']):.3f} ms, median "
        f"{1e3 * statistics.median(r['round_s']):.3f} ms" for r in raw) + "\n</details>\n"
    C.report(C.results_path(args), f"transfer_cost/{args.device}",
             f"Transfer cost — {args.device}" + (" (smoke)" if args.smoke else ""), body)
    return 0 if all(math.isfinite(r["epoch"]) for r in raw) else 1


if __name__ == "__main__":
    raise SystemExit(C.cli(main))
