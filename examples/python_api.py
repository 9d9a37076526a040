"""The Python API end to end: load → compile → validate → run → read the summary.

    python examples/python_api.py                 # the quickstart as shipped (about a minute)
    python examples/python_api.py --tiny          # a few seconds (what CI runs)
    python examples/python_api.py --out runs/api  # the run folder (new or empty)

Everything the command line does is four calls; see docs/python-api.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import mlsgd_dsl
from mlsgd_dsl.runner.records import read_rows

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "hierarchies" / "quickstart.toml"

# The same values as `--set key=value` on the command line: a 400-image data set, one cycle.
TINY = {"data.options.train": 400, "data.options.test": 200, "data.validation": 100,
        "mlsgd.cycles": 1, "mlsgd.batch_size": 50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny data, one cycle (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder, new or empty (default: a new runs/quickstart-TIME)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    # 1. load: TOML -> a validated Hierarchy (a mistake raises mlsgd_dsl.ConfigError, whose
    #    message names the file and the key path, exactly as the CLI prints it)
    hierarchy = mlsgd_dsl.load(QUICKSTART, overrides=TINY if args.tiny else None)
    print(f"loaded {hierarchy.name!r}: levels {list(hierarchy.levels)} (finest first)")

    # 2. compile: levels, the level graph and the transfer operators of every edge
    compiled = mlsgd_dsl.compile(hierarchy)
    for level in compiled.levels:  # coarsest first
        node = compiled.nodes[level]
        print(f"  {level:<6} h={node.h:g}  {node.n_parameters:>6,} parameters  "
              f"input {node.input_shape}")

    # The operators are usable on their own: prolongate the coarsest level's weights to the
    # finest level (P = P_fine·P_mid, composed along the graph) and load them into a model.
    coarse, fine = compiled.levels[0], compiled.finest
    transfer = compiled.transfer(coarse, fine)
    weights = transfer.prolongate(compiled.model(coarse).state_dict())
    compiled.model(fine).load_state_dict(weights)
    print(f"  {transfer!r}: {len(weights)} tensors prolongated")

    # 3. validate: the report `mlsgd-dsl validate` prints (run() validates by default too)
    report = mlsgd_dsl.validate(compiled)
    print(report.table().splitlines()[-1])
    if not report.ok:
        raise SystemExit(report.table())

    # 4. run: trains, writes the run folder, returns the summary (also in summary.json)
    summary = mlsgd_dsl.run(compiled, out_dir=args.out, quiet=True, validate=False)  # done above

    # 5. read the summary and the per-epoch metrics
    print(f"run folder {summary['run_dir']}: {summary['cycles']} cycle(s), "
          f"val acc {summary['val_acc']:.3f}, test acc {summary['test_acc']:.3f}, "
          f"training time {summary['training_time']:.1f} s")
    for threshold, seconds in summary["time_to"].items():
        reached = f"after {seconds:.1f} s" if seconds is not None else "not reached"
        print(f"  {float(threshold):.0%} validation accuracy: {reached}")
    rows = read_rows(summary["run_dir"])
    evaluated = [r for r in rows if r["val_acc"] is not None]
    print(f"metrics.jsonl: {len(rows)} rows, {len(evaluated)} with a validation accuracy; "
          f"epochs per level {summary['epochs']}")


if __name__ == "__main__":
    main()
