"""Plot runs against each other from their metrics files.

    python examples/plot_runs.py runs/a runs/b [runs/c ...] --out plots
    python examples/plot_runs.py --tiny --out plots   # first trains two tiny runs (CI)

Without run folders the script trains two itself: the quickstart with MLSGD and its finest
network trained by plain SGD (``mlsgd.method = "sgd"``, the baseline, for as many epochs as
MLSGD spends on all levels together), into OUT/mlsgd and OUT/sgd. It writes
OUT/plot_runs.png: validation accuracy and the finest level's training loss against training
time. ``mlsgd-dsl compare`` draws the first panel for you; this script
shows how to draw anything else from ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import mlsgd_dsl  # noqa: E402
from mlsgd_dsl.runner.records import read_rows  # noqa: E402
from mlsgd_dsl.runner.summary import finest_level  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "hierarchies" / "quickstart.toml"
TINY = {"data.options.train": 400, "data.options.test": 200, "data.validation": 100,
        "mlsgd.cycles": 1, "mlsgd.batch_size": 50}


def train_two(out: Path, tiny: bool) -> list[Path]:
    """The quickstart with MLSGD and with the SGD baseline (same finest network)."""
    base = TINY if tiny else {}
    cycles = mlsgd_dsl.load(QUICKSTART, base).mlsgd.cycles
    # MLSGD trains one epoch per level and cycle; give SGD as many epochs as all levels get
    sgd = {"mlsgd.method": "sgd", "mlsgd.sgd_epochs": 3 * cycles}
    runs = []
    for name, extra in (("mlsgd", {}), ("sgd", sgd)):
        compiled = mlsgd_dsl.compile(mlsgd_dsl.load(QUICKSTART, {**base, **extra}))
        # this script owns out/mlsgd and out/sgd: a rerun replaces them
        summary = mlsgd_dsl.run(compiled, out_dir=out / name, quiet=True, overwrite=True)
        print(f"{name}: val acc {summary['val_acc']:.3f} after {summary['training_time']:.1f} s")
        runs.append(out / name)
    return runs


def plot(runs: list[Path], path: Path) -> None:
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        rows = read_rows(run)  # one dict per line of metrics.jsonl
        finest = finest_level(rows)  # the level whose network is validated
        evaluated = [r for r in rows if r["val_acc"] is not None]
        line, = acc_ax.plot([r["train_time"] for r in evaluated],
                            [r["val_acc"] for r in evaluated], marker="o", label=run.name)
        # rows of coarse levels carry the coarse networks' losses: keep the finest level's
        trained = [r for r in rows if r["level"] == finest and r["train_loss"] is not None]
        loss_ax.plot([r["train_time"] for r in trained], [r["train_loss"] for r in trained],
                     marker=".", color=line.get_color(), label=run.name)
    acc_ax.set(xlabel="training time [s]", ylabel="validation accuracy",
               title="validation accuracy")
    loss_ax.set(xlabel="training time [s]", ylabel="cross entropy",
                title="training loss, finest level")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                        help="run folders (default: train two, see above)")
    parser.add_argument("--tiny", action="store_true", help="tiny data (CI)")
    parser.add_argument("--out", type=Path, default=Path("runs/plot-runs"),
                        help="folder for plot_runs.png (and the two runs it trains)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = args.runs or train_two(args.out, args.tiny)
    path = args.out / "plot_runs.png"
    plot(runs, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
