"""Peak memory: an MLSGD run against the SGD run of the finest level alone.

Each contender runs in its own child process (``python benchmarks/memory.py --child SPEC``),
which reports its peak resident set size (``ru_maxrss`` of ``getrusage(RUSAGE_SELF)``, the same
as ``VmHWM`` in ``/proc/self/status``) and, on a GPU, ``torch.cuda.max_memory_allocated``.
Contenders run interleaved (repetition by repetition, order rotated):

* ``baseline``: imports, data loaded onto the device, the level models built — no training
  (what every contender pays before the first step);
* ``sgd``: ``method = "sgd"`` on the finest level;
* ``mlsgd``: one MLSGD V-cycle without correction (all levels' models, optimisers, BatchNorm
  re-estimation, transfers);
* ``mlsgd-det-vr``: one corrected V-cycle (deterministic, variance reduction: full-gradient
  passes in chunks of ``full_batch_size`` and a snapshot model per level).

Every run trains a few batches per level (peak memory is reached in the first steps: the
largest batch's activations), then the runner's final evaluation of train/validation/test.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

FILES = {"depth": "hierarchies/fashion-mnist/depth.toml",
         "resolution": "hierarchies/resolution-fashion-mnist.toml"}
# Shipped networks (channels as in the files), fewer images so that the final evaluation is
# short; the data tensors are a small part of the peak either way (reported by `baseline`).
SCALING = {"data.subset": 5_000, "data.validation": 2_000, "data.test_subset": 2_000}
SMOKE = {
    "data.source": "synthetic",
    "data.options": {"train": 250, "test": 50, "size": 16, "channels": 1, "seed": 0},
    "data.validation": 50, "mlsgd.batch_size": 50, "mlsgd.full_batch_size": 100,
    "mlsgd.bn_recalibration": 100,
}
SMOKE_CHANNELS = {"depth": [4, 4, 4], "resolution": [4, 4]}
MECHANICS = {"report.checkpoint": "none", "report.plot": False, "mlsgd.eval.every": "cycle",
             "mlsgd.cycles": 1}
EPOCHS = 0.05  # per level visit (a few batches)
CONTENDERS = {
    "baseline": {},
    "sgd": {"mlsgd.method": "sgd", "mlsgd.sgd_epochs": EPOCHS, "mlsgd.correction": "none"},
    "mlsgd": {"mlsgd.correction": "none"},
    "mlsgd-det-vr": {"mlsgd.correction": {"strategy": "deterministic",
                                          "variance_reduction": True},
                     "mlsgd.uncorrected_cycles": 0},
}
DEFAULT = ["baseline", "sgd", "mlsgd", "mlsgd-det-vr"]


def peak() -> dict[str, float]:
    out = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0] + "_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def child(spec: dict[str, Any]) -> int:
    import torch

    import mlsgd_dsl

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    compiled = mlsgd_dsl.compile(mlsgd_dsl.load(spec["file"], overrides=spec["overrides"]))
    before = peak()
    t0 = time.perf_counter()
    if spec["contender"] == "baseline":
        compiled.data(spec["device"])
        models = {n: compiled.model(n).to(spec["device"]) for n in compiled.levels}
        del models
    else:
        mlsgd_dsl.run(compiled, out_dir=spec["out"], quiet=True, device=spec["device"],
                      validate=False, overwrite=True)
    result = {"contender": spec["contender"], "seconds": time.perf_counter() - t0,
              "at_start_mib": before.get("VmHWM_mib", before["ru_maxrss_mib"]), **peak()}
    if spec["device"] == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    print("MEMORY " + json.dumps(result), flush=True)
    return 0


def scaling(args: Any, hierarchy: str) -> dict[str, Any]:
    o = dict(SCALING)
    if args.smoke:
        o.update(SMOKE)
        o["model.channels"] = SMOKE_CHANNELS[hierarchy]
        for k in ("data.subset", "data.test_subset"):
            o.pop(k, None)
    return o


def run_child(args: Any, hierarchy: str, contender: str, work: Path) -> dict[str, Any]:
    o = {**MECHANICS, **scaling(args, hierarchy), "mlsgd.epochs": EPOCHS}
    o.update(CONTENDERS[contender])
    spec = {"file": str(C.ROOT / FILES[hierarchy]), "overrides": o, "contender": contender,
            "device": args.device, "threads": args.threads,
            "out": str(work / f"{hierarchy}-{contender}-{time.time_ns()}")}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                           json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(C.HERE), os.environ.get("PYTHONPATH", "")])})
    line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("MEMORY ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"child {hierarchy}/{contender} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(line[len("MEMORY "):])


def main(argv: list[str] | None = None) -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child" and argv is None:
        return child(json.loads(sys.argv[2]))
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--hierarchy", choices=["depth", "resolution", "all"], default=None,
                   help="default: all (with --smoke: depth)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 2; smoke 1)")
    p.add_argument("--contenders", default=None,
                   help=f"comma-separated from {', '.join(CONTENDERS)} (default: all; smoke: "
                        "sgd,mlsgd)")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 2)
    hierarchies = [args.hierarchy or ("depth" if args.smoke else "all")]
    if hierarchies == ["all"]:
        hierarchies = ["depth", "resolution"]
    contenders = (args.contenders.split(",") if args.contenders
                  else ["sgd", "mlsgd"] if args.smoke else DEFAULT)
    bad = [c for c in contenders if c not in CONTENDERS]
    if bad:
        p.error(f"unknown contenders {bad}")
    C.setup_torch(args)
    info = C.machine(args.device)
    started = time.time()
    res: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with C.workdir(args) as work:
        for rep in range(args.reps):
            for hierarchy in hierarchies:
                for c in C.rotate(contenders, rep):
                    r = run_child(args, hierarchy, c, work)
                    res.setdefault((hierarchy, c), []).append(r)
                    print(f"rep {rep} {hierarchy} {c}: peak RSS {r['ru_maxrss_mib']:.0f} MiB"
                          + (f", CUDA {r['cuda_max_allocated_mib']:.0f} MiB"
                             if "cuda_max_allocated_mib" in r else "")
                          + f" ({r['seconds']:.1f} s)", flush=True)

    cuda = args.device == "cuda"
    body = C.preamble(info, started, {
        "runs": f"each contender in a child process; {EPOCHS:g} epochs per level visit, one "
                "cycle; mechanics " + json.dumps(MECHANICS),
        "peak": "ru_maxrss (= VmHWM) of the child, MiB; ratio against sgd",
    })
    for hierarchy in hierarchies:
        base = C.median([r["ru_maxrss_mib"] for r in res.get((hierarchy, "sgd"), [])])
        rows = []
        for c in contenders:
            rs = res[hierarchy, c]
            rss = C.median([r["ru_maxrss_mib"] for r in rs])
            row = [c, C.spread([r["ru_maxrss_mib"] for r in rs], "{:.0f}"),
                   f"{rss / base:.2f}" if base else "–",
                   f"{rss - base:+.0f}" if base else "–",
                   C.spread([r["at_start_mib"] for r in rs], "{:.0f}")]
            if cuda:
                row.append(C.spread([r.get("cuda_max_allocated_mib") for r in rs], "{:.0f}"))
            rows.append(row)
        body += (f"\n**{hierarchy}** (`{FILES[hierarchy]}`, overrides "
                 f"`{json.dumps(scaling(args, hierarchy))}`)\n\n") + C.table(
            ["contender", "peak RSS MiB", "/ sgd", "Δ MiB vs sgd",
             "after import + compile MiB", *(["CUDA max allocated MiB"] if cuda else [])],
            rows)
    C.report(C.results_path(args), f"memory/{'+'.join(hierarchies)}/{args.device}",
             f"Peak memory — {', '.join(hierarchies)}, {args.device}"
             + (" (smoke)" if args.smoke else ""), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(C.cli(main))
