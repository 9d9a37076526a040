"""Running against re-estimated BatchNorm statistics, on the weights a run folder holds.

    python benchmarks/bn_statistics.py RUN_DIR [--images 250,500,1000,2000,5000] [--seeds 3]

Loads the run's ``resolved.toml`` and the finest network of ``checkpoint.pt`` (and
``checkpoint.prev.pt``, the cycle before, and ``network.safetensors``, the network the run
handed over at its end, when present), and scores each on the run's
validation split: once with the statistics stored in the checkpoint, then with statistics
re-estimated on N training images (``mlsgd_dsl.runner.bn.recalibrate``; several seeds per N,
so the spread shows how many images are enough). Run it on a folder written with
``mlsgd.eval.recalibrate = 0`` to see what the running averages alone report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import mlsgd_dsl
from mlsgd_dsl.errors import UserError
from mlsgd_dsl.runner import bn
from mlsgd_dsl.runner.checkpoint import CHECKPOINT_NAME, load_checkpoint, previous_path


def score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 1000):
            correct += int((model(x[start:start + 1000]).argmax(1) == y[start:start + 1000])
                           .sum())
    return correct / max(len(x), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--images", default="250,500,1000,2000,5000",
                   type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    try:
        compiled = mlsgd_dsl.compile(mlsgd_dsl.load(args.run_dir / "resolved.toml"))
    except UserError as exc:
        print(f"bn_statistics: error: {exc}", file=sys.stderr)
        return 2
    data = compiled.data("cpu")[compiled.finest]
    batch = compiled.for_level(compiled.hierarchy.mlsgd.batch_size, compiled.finest)
    current = args.run_dir / CHECKPOINT_NAME
    states = []
    for path in (previous_path(current), current):
        if path.is_file():
            ck = load_checkpoint(path, map_location="cpu")
            states.append((f"{path.name} (after cycle {ck['cycles_done']})", ck["finest"]))
    if (args.run_dir / "network.safetensors").is_file():
        from mlsgd_dsl.handover import read_network

        states.append(("network.safetensors (end of the run)", read_network(args.run_dir)[0]))
    model = compiled.model(compiled.finest)
    for label, state in states:
        model.load_state_dict(state)
        print(f"{label}: stored statistics {score(model, data.val_x, data.val_y):.4f}")
        for images in args.images:
            accs, seconds = [], []
            for seed in range(args.seeds):
                model.load_state_dict(state)
                start = time.perf_counter()
                bn.recalibrate(model, data.train_x, images=images, batch_size=batch,
                               generator=torch.Generator().manual_seed(seed))
                seconds.append(time.perf_counter() - start)
                accs.append(score(model, data.val_x, data.val_y))
            print(f"  re-estimated on {images:>6,} images: {statistics.median(accs):.4f} "
                  f"({min(accs):.4f}-{max(accs):.4f} over {args.seeds} seeds), "
                  f"{statistics.median(seconds):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
