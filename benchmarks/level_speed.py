"""Speed of each level against the machine: achieved training FLOP/s, and what helps.

For every level of the (scaled) depth and resolution hierarchies of the time-to-accuracy
benchmark, in one process:

* **achieved**: the runner's training step (``train_visit`` on a copy of the level, exactly
  what a visit runs) timed over ``--batches`` batches after a warm-up; training FLOPs per image
  = 3 × the compiler's forward estimate (``torch.utils.flop_counter``: 2 per multiply-add;
  backward ≈ 2 × forward);
* **peaks** in the same process: a square fp32 matmul (``--matmul-size``) and, per level, the
  forward + backward of its most expensive convolution alone at its own shape (batch,
  channels, image size) — what this machine does on that shape at best;
* **variants** of the step, interleaved with the default (order rotated per repetition):
  ``channels_last`` (network in NHWC memory format: ``mlsgd.channels_last``), ``compile``
  (``torch.compile`` of the training step, inductor: ``mlsgd.compile``; compilation in the
  warm-up, timed apart, with an empty inductor cache unless ``TORCHINDUCTOR_CACHE_DIR`` is
  set), their combination, and on a GPU ``bf16`` (``torch.autocast`` to bfloat16).

Ratio = variant / default seconds per batch, paired per repetition (below 1: faster).
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
import time
from typing import Any

import _common as C

FILES = {"depth": "hierarchies/fashion-mnist/depth.toml",
         "resolution": "hierarchies/resolution-fashion-mnist.toml"}
# as time_to_accuracy.py's fmnist-small preset
SCALING = {
    "depth": {"model.channels": [8, 16, 32], "data.subset": 10_000, "data.validation": 5_000},
    "resolution": {"model.channels": [16, 32], "data.subset": 10_000, "data.validation": 5_000},
}
SMOKE = {
    "data.source": "synthetic",
    "data.options": {"train": 250, "test": 50, "size": 16, "channels": 1, "seed": 0},
    "data.validation": 50, "mlsgd.batch_size": 50,
}
SMOKE_CHANNELS = {"depth": [4, 4, 4], "resolution": [4, 4]}
MECHANICS = {"report.checkpoint": "none", "report.plot": False}


def twin(level: Any, variant: str) -> Any:
    """A copy of ``level`` whose training step runs as ``variant``."""
    import torch

    from mlsgd_dsl.runner.plan import _twin

    parts = variant.split("+")
    t = _twin(level)
    # the runner's own switches (mlsgd.channels_last, mlsgd.compile)
    t.accelerate(compile="compile" in parts and "bf16" not in parts,
                 channels_last="channels_last" in parts)
    if "bf16" in parts:
        inner = t.model

        class Autocast(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: Any) -> Any:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return self.inner(x).float()

        t.train_model = torch.compile(Autocast()) if "compile" in parts else Autocast()
    return t


def step_seconds(level: Any, batches: int, device: Any) -> float:
    """Seconds per training batch of ``level`` (``train_visit``, timed)."""
    import torch

    from mlsgd_dsl.runner.level import FixedHost, Visit, train_visit

    host = FixedHost(torch.Generator().manual_seed(0))
    nb = level.batches_per_epoch
    timed = max(1, min(batches, nb))
    C.sync(device)
    start = time.perf_counter()
    result = train_visit(level, Visit(epochs=timed / nb), host)
    C.sync(device)
    return (time.perf_counter() - start) / max(1, result.steps)


def warm(level: Any) -> None:
    import torch

    from mlsgd_dsl.runner.level import FixedHost, Visit, train_visit

    nb = level.batches_per_epoch
    train_visit(level, Visit(epochs=min(3, nb) / nb), FixedHost(torch.Generator().manual_seed(1)))


def matmul_peak(n: int, device: Any, reps: int = 5) -> float:
    """GFLOP/s of an n × n fp32 matmul (2n³ FLOPs), best of ``reps``."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = min(C.timed(lambda: a @ b, device)[0] for _ in range(reps))
    return 2.0 * n ** 3 / best / 1e9


def conv_peak(model: Any, batch: Any, device: Any, reps: int = 5) -> tuple[str, float]:
    """The most expensive convolution of ``model`` on ``batch``, alone, forward + backward:
    (its shape, GFLOP/s). Convolutions are found by recording ``F.conv2d`` calls, so those a
    model makes without an ``nn.Conv2d`` module (the thesis network's ``K x``) count too."""
    import torch
    import torch.nn.functional as F

    calls: list[tuple[float, tuple[int, ...], Any, dict[str, Any]]] = []
    original = F.conv2d

    def recording(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                  dilation: Any = 1, groups: int = 1) -> Any:
        out = original(x, weight, bias, stride, padding, dilation, groups)
        macs = out.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]
        calls.append((2.0 * macs, tuple(x.shape), weight.detach().clone(),
                      {"stride": stride, "padding": padding, "dilation": dilation,
                       "groups": groups}))
        return out

    F.conv2d = recording
    try:
        with torch.no_grad():
            copy.deepcopy(model)(batch)
    finally:
        F.conv2d = original
    if not calls:
        return "–", float("nan")
    flops, shape, weight, kw = max(calls, key=lambda c: c[0])
    x = torch.randn(shape, device=device, requires_grad=True)
    w = weight.requires_grad_(True)

    def step() -> None:
        F.conv2d(x, w, None, **kw).sum().backward()

    step()
    best = min(C.timed(step, device)[0] for _ in range(reps))
    return f"{shape} * {tuple(w.shape)}", 3.0 * flops / best / 1e9


def bench_hierarchy(args: Any, name: str, variants: list[str], work: Any) -> dict[str, Any]:
    import torch

    import mlsgd_dsl
    from mlsgd_dsl.runner.run import Trainer

    torch._dynamo.reset()  # each hierarchy's compilations afresh, within the recompile limit
    overrides = {**MECHANICS, **SCALING[name]}
    if args.smoke:
        overrides.update(SMOKE)
        overrides["model.channels"] = SMOKE_CHANNELS[name]
        overrides.pop("data.subset", None)
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(str(C.ROOT / FILES[name]),
                                                overrides=overrides))
    trainer = Trainer(compiled, out_dir=work / f"{name}-trainer", quiet=True,
                      device=args.device, validate=False, overwrite=True)
    device = trainer.device
    levels = {n: trainer.levels[n] for n in compiled.levels[::-1]}  # finest first
    twins = {(n, v): twin(lv, v) for n, lv in levels.items() for v in variants}
    warmup: dict[tuple[str, str], float] = {}
    for key, t in twins.items():
        start = time.perf_counter()
        warm(t)  # torch.compile compiles here
        warmup[key] = time.perf_counter() - start
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        for n in levels:
            for v in C.rotate(variants, rep):
                times.setdefault((n, v), []).append(step_seconds(twins[n, v], args.batches,
                                                                 device))
            print(f"[{name}] rep {rep} {n}: " + ", ".join(
                f"{v} {1e3 * times[n, v][-1]:.1f} ms" for v in variants), flush=True)
    rows = []
    for n, lv in levels.items():
        fwd = compiled.nodes[n].flops
        batch = lv.data.train_x[:lv.batch_size]
        shape, conv = conv_peak(lv.model, batch, device)
        default = times[n, "default"]
        achieved = [3.0 * fwd * lv.batch_size / s / 1e9 for s in default] if fwd else []
        rows.append({"level": n, "forward_flops": fwd, "batch": lv.batch_size,
                     "default": default, "achieved": achieved, "conv_shape": shape,
                     "conv_peak": conv,
                     "warmup": {v: warmup[n, v] for v in variants},
                     "ratios": {v: [a / b for a, b in zip(times[n, v], default)]
                                for v in variants if v != "default"}})
    return {"name": name, "file": FILES[name], "overrides": overrides, "levels": rows}


def section(args: Any, results: list[dict[str, Any]], variants: list[str], peak: float,
            info: dict[str, Any], started: float) -> str:
    body = C.preamble(info, started, {
        "what": "seconds per training batch of each level (train_visit on a copy, "
                f"{args.batches} batches, after a warm-up); achieved = 3 × forward FLOPs × "
                "batch / seconds; conv peak = the level's most expensive convolution alone "
                "(forward + backward) at its shape",
        "matmul peak": f"{peak:.1f} GFLOP/s ({args.matmul_size}² fp32)",
        "warm-up": "seconds of the 3-batch warm-up beyond the default step's: for compile, "
                   "the compilation a run pays once per level and shape"
                   + (" (inductor cache empty at the start: a first run's cost)"
                      if args.empty_inductor_cache else
                      f" (inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']})"),
        "repetitions": f"{args.reps}, variants interleaved, order rotated; ratio = variant / "
                       "default per repetition (below 1: faster)",
    })
    for r in results:
        body += f"\n**{r['name']}** (`{r['file']}`)\n\n"
        rows = []
        for e in r["levels"]:
            ach = C.median(e["achieved"])
            rows.append([e["level"], C.fmt(e["forward_flops"] and e["forward_flops"] / 1e6,
                                           "{:.2f}"),
                         e["batch"], C.spread([1e3 * s for s in e["default"]], "{:.1f}"),
                         C.spread(e["achieved"], "{:.2f}"),
                         f"{e['conv_peak']:.2f}", C.fmt(ach and ach / e["conv_peak"], "{:.2f}"),
                         f"{ach / peak:.2f}" if ach else "–",
                         *(C.spread(e["ratios"][v], "{:.3f}") for v in variants
                           if v != "default"),
                         *(f"{e['warmup'][v] - e['warmup']['default']:+.1f}"
                           for v in variants if v != "default")])
        body += C.table(["level", "forward MFLOP / image", "batch", "ms / batch",
                         "achieved GFLOP/s", "conv peak GFLOP/s", "achieved / conv peak",
                         "achieved / matmul peak",
                         *(f"{v} / default" for v in variants if v != "default"),
                         *(f"{v} warm-up s (− default's)" for v in variants
                           if v != "default")], rows)
        body += "\nLargest convolution per level (input * weight): " + "; ".join(
            f"{e['level']} {e['conv_shape']}" for e in r["levels"]) + "\n"
    return body


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--hierarchy", choices=["depth", "resolution", "all"], default="all")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; smoke 1)")
    p.add_argument("--batches", type=int, default=None,
                   help="timed batches per repetition (default 20; smoke 2)")
    p.add_argument("--variants", default=None,
                   help="comma-separated among channels_last, compile, bf16 and their "
                        "combinations with + (default: channels_last,compile,"
                        "channels_last+compile; on cuda also bf16, bf16+compile)")
    p.add_argument("--matmul-size", type=int, default=2048)
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 5)
    args.batches = args.batches or (2 if args.smoke else 20)
    chosen = (args.variants.split(",") if args.variants else
              ["channels_last", "compile", "channels_last+compile"]
              + (["bf16", "bf16+compile"] if args.device == "cuda" else []))
    parts = [part for v in chosen for part in v.split("+")]
    unknown = [part for part in parts if part not in ("channels_last", "compile", "bf16")]
    if unknown or ("bf16" in parts and args.device != "cuda"):
        p.error(f"--variants {args.variants}: choose among channels_last, compile, bf16 "
                "and their combinations with + (bf16 on --device cuda only)")
    variants = ["default", *chosen]
    C.setup_torch(args)
    info = C.machine(args.device)
    args.empty_inductor_cache = not os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if args.empty_inductor_cache:
        # an empty inductor cache: the warm-up column shows the compilation a first run of
        # these shapes pays (later runs of the same shapes on this machine hit the cache)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
        atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)
    started = time.time()
    peak = matmul_peak(256 if args.smoke else args.matmul_size, args.device)
    names = ["depth", "resolution"] if args.hierarchy == "all" else [args.hierarchy]
    with C.workdir(args) as work:
        results = [bench_hierarchy(args, n, variants, work) for n in names]
    body = section(args, results, variants, peak, info, started)
    C.report(C.results_path(args), f"level_speed/{args.hierarchy}/{args.device}",
             f"Speed of each level — {', '.join(names)}, {args.device}"
             + (" (smoke)" if args.smoke else ""), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(C.cli(main))
