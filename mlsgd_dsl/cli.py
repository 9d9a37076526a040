"""The ``mlsgd-dsl`` command line.

Every user mistake ends as ``mlsgd-dsl: error: FILE: key.path: what is wrong`` on stderr with
exit code 2; ``validate`` exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
from .errors import UserError

EXIT_FAILED_CHECK = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

#: Ctrl-C while torch and the plugins import is only noted, and acted on once they are loaded:
#: a KeyboardInterrupt raised inside an import can be swallowed by a bare ``except:``, or
#: abort the process from a C++ callback (pybind11: "terminate called after throwing ...").
_interrupted = threading.Event()


def _defer_sigint(signum: int, frame: object) -> None:
    _interrupted.set()


def _arm_interrupts() -> None:
    """End of start-up: honour a Ctrl-C noted so far; from now on Ctrl-C interrupts at once."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
    if signal.getsignal(signal.SIGINT) is _defer_sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlsgd-dsl", description="Declarative multilevel SGD "
                                "(MLSGD) hierarchies: validate, run, compare, evaluate, export.")
    p.add_argument("--version", action="version", version=f"mlsgd-dsl {__version__}")
    p.add_argument("-p", dest="plugin_flags", action="append", default=[], metavar="no:NAME",
                   help="block plugin NAME (repeatable), like pytest's -p no:NAME")
    p.add_argument("--no-plugin-autoload", action="store_true",
                   help="do not load plugins from entry points "
                        "(or set MLSGD_DSL_DISABLE_PLUGIN_AUTOLOAD=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_file(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("file", type=Path, help="hierarchy file (TOML)")
        s.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY.PATH=VALUE", help="override a value (TOML syntax)")
        return s

    v = with_file("validate", "check a hierarchy file before training")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--seed", type=int, default=0, help="seed of the numerical checks")

    r = with_file("run", "train a hierarchy and write a run folder")
    r.add_argument("--out", type=Path, default=None,
                   help="run folder, new or empty (default: a new runs/NAME-TIME)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out already holds")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    r.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (with --out "
                        "OTHER: continue a copy in OTHER, RUN_DIR untouched)")
    r.add_argument("--force", action="store_true",
                   help="resume even though the hierarchy changed since the checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--no-validate", action="store_true",
                   help="skip the coherence checks before training")
    r.add_argument("--sweep", action="append", default=[], metavar="KEY.PATH=V1,V2",
                   help="train every combination of these values (repeatable), one run "
                        "folder each under --out; rerun to resume (docs/sweeps.md)")
    r.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="with or without --sweep: N seeds per combination, then the medians")

    b = with_file("bench", "MLSGD against a practitioner's SGD on the same network, at equal "
                  "training-time budgets, side by side (docs/bench.md)")
    b.add_argument("--budget", type=float, required=True, metavar="SECONDS",
                   help="training time of every run (evaluation and checkpoints excluded)")
    b.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per contender")
    b.add_argument("--contenders", default="file,cascade,sgd",
                   help="comma-separated: file (the file as written), V, W, F, cascade, fmg "
                        "(the file with that cycle kind), sgd (the baseline)")
    b.add_argument("--thresholds", default=None, metavar="A,B,...",
                   help="validation accuracies to time (default: the file's "
                        "report.thresholds)")
    b.add_argument("--baseline-schedule", choices=["cosine", "onecycle"], default="cosine",
                   help="the SGD baseline's learning-rate schedule over the budget")
    b.add_argument("--baseline-lr", type=float, default=None,
                   help="the SGD baseline's step (default: the finest level's lr)")
    b.add_argument("--out", type=Path, default=None,
                   help="bench folder (default runs/NAME-bench); rerun to continue it")
    b.add_argument("--overwrite", action="store_true",
                   help="replace a bench folder that holds a bench with other settings")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)

    g = with_file("graph", "print the level graph (Mermaid or Graphviz DOT)")
    g.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    g.add_argument("--png", type=Path, default=None,
                   help="also render a PNG (needs Graphviz' dot on PATH)")

    s = sub.add_parser("schema", help="print the JSON Schema of hierarchy files")
    s.add_argument("--indent", type=int, default=2)
    s.add_argument("--markdown", action="store_true",
                   help="print the key reference and the built-ins' options "
                        "(docs/hierarchy-file.md) instead")

    pl = sub.add_parser("plugins", help="list installed plugins and what they provide")
    pl.add_argument("--verbose", "-v", action="store_true",
                    help="also print each provided name's description and options table")

    e = sub.add_parser("evaluate", help="accuracy and loss of a run's network on the test "
                       "split", description="accuracy and loss of a run's trained network on "
                       "the test split (or, with --set data...., another data set of the same "
                       "shape)")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    e.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="data.KEY=VALUE", help="another data set (data.* keys only)")
    x = sub.add_parser("export", help="write a run's network for plain PyTorch",
                       description="write a run's network (with its input normalisation) as "
                       "a file plain PyTorch loads without mlsgd-dsl")
    x.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    x.add_argument("--format", choices=["torchscript", "exported"], default="exported")
    x.add_argument("--out", type=Path, default=None,
                   help="file (default RUN_DIR/network.pt2 or network.torchscript.pt)")

    c = sub.add_parser("compare", help="side-by-side table of several runs + overlay plot")
    c.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    c.add_argument("--out", type=Path, default=None, help="folder for compare.png")
    return p


def _registry(args: argparse.Namespace):
    from .registry import build_registry, set_default_registry

    blocked = []
    for flag in args.plugin_flags:
        if not flag.startswith("no:") or len(flag) <= 3:
            raise UserError(f"-p {flag}: expected -p no:NAME")
        blocked.append(flag[3:])
    autoload = False if args.no_plugin_autoload else None
    reg = build_registry(block=blocked, autoload=autoload)
    set_default_registry(reg)
    return reg


def _compiled(args: argparse.Namespace):
    from .compiler import compile as compile_hierarchy
    from .loader import load

    reg = _registry(args)
    _arm_interrupts()
    return compile_hierarchy(load(args.file, args.overrides, registry=reg))


def cmd_validate(args: argparse.Namespace) -> int:
    from .validation import validate

    compiled = _compiled(args)
    report = validate(compiled, seed=args.seed)
    if args.json:
        print(json.dumps({"ok": report.ok, "rows": [r.__dict__ for r in report.rows]},
                         indent=2))
    else:
        print(f"{args.file}: {compiled.hierarchy.name} — levels (coarsest first): "
              + ", ".join(f"{n} ({compiled.nodes[n].n_parameters:,} params, h={compiled.h(n):g})"
                          for n in compiled.levels))
        print(report.table())
    return 0 if report.ok else EXIT_FAILED_CHECK


def cmd_run(args: argparse.Namespace) -> int:
    from .runner.run import run

    if args.sweep or args.seeds is not None:
        return cmd_sweep(args)
    overrides = list(args.overrides)
    if args.resume is not None and not args.file.exists():
        raise UserError(f"{args.file}: no such file")
    compiled = _compiled(argparse.Namespace(**{**vars(args), "overrides": overrides}))
    _arm_interrupts()
    summary = run(compiled, out_dir=args.out, resume=args.resume, device=args.device,
                  quiet=args.quiet, validate=not args.no_validate, force=args.force,
                  overwrite=args.overwrite)
    if summary.get("rank", 0):  # under torchrun, rank 0 reports for all
        return 0
    out = summary.get("run_dir", "")
    final = summary.get("final", summary)
    acc = final.get("val_acc")
    print(f"run folder: {out}")
    if acc is not None:
        print(f"final validation accuracy {acc:.4f}, test accuracy "
              f"{final.get('test_acc', float('nan')):.4f}, training time "
              f"{final.get('training_time', 0):.1f} s")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    if args.resume is not None:
        raise UserError("--resume does not combine with --sweep/--seeds: run the same sweep "
                        "again and it resumes its unfinished runs")
    _registry(args)
    print(run_sweep(args.file, args.overrides, args.sweep, args.seeds, out=args.out,
                    device=args.device, quiet=args.quiet, validate=not args.no_validate),
          end="")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import parse_contenders, run_bench

    contenders = parse_contenders(args.contenders)
    thresholds = None
    if args.thresholds is not None:
        try:
            thresholds = [float(x) for x in args.thresholds.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--thresholds {args.thresholds!r}: expected comma-separated "
                            "accuracies such as 0.8,0.85") from None
    _registry(args)
    _arm_interrupts()
    print(run_bench(args.file, args.overrides, budget=args.budget, seeds=args.seeds,
                    contenders=contenders, thresholds=thresholds, out=args.out,
                    overwrite=args.overwrite, device=args.device,
                    schedule=args.baseline_schedule, baseline_lr=args.baseline_lr), end="")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .handover import evaluate_run

    _registry(args)
    result = evaluate_run(args.run_dir, args.overrides)
    print(f"{args.run_dir}: test accuracy {result['test_acc']:.4f}, loss "
          f"{result['test_loss']:.4f} ({result['images']} images of {result['source']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .handover import export

    _registry(args)
    path = export(args.run_dir, args.format, args.out)
    how = "torch.jit.load(PATH)" if args.format == "torchscript" else \
        "torch.export.load(PATH).module()"
    print(f"{path}  (load with {how}; input: images on the [0, 1] scale, N x C x H x W)")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from .graphviz import render

    compiled = _compiled(args)
    print(render(compiled, args.format, png=args.png))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .schema import json_schema

    if args.markdown:
        from .docgen import builtin_options_markdown, reference_markdown

        print(reference_markdown() + "\n" + builtin_options_markdown(), end="")
        return 0
    print(json.dumps(json_schema(_registry(args)), indent=args.indent))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import conflict_hint

    reg = _registry(args)
    for p in reg.provided:
        dist = f"{p.distribution} {p.version}" if p.distribution else f"built-in ({__version__})"
        print(f"{p.plugin}  [{dist}]")
        for kind, names in p.items.items():
            shown = [f"{n} (CONFLICT)" if n in reg.conflicts[kind] else n for n in names]
            print(f"    {kind}: {', '.join(shown)}")
            if args.verbose:
                from .docgen import options_text

                for name in names:
                    record = next(e.record for e in [reg.items[kind].get(name),
                                                     *reg.conflicts[kind].get(name, [])]
                                  if e is not None and e.plugin == p.plugin)
                    print(options_text(record, indent="        "), end="")
    for kind, table in reg.conflicts.items():
        for name, entries in sorted(table.items()):
            print(f"CONFLICT {conflict_hint(kind, name, entries)}")
    for message in reg.broken.values():
        print(f"BROKEN {message}")
    if reg.blocked:
        print(f"blocked: {', '.join(sorted(reg.blocked))}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .runner.compare import compare

    print(compare(args.runs, out=args.out))
    return 0


COMMANDS = {"validate": cmd_validate, "run": cmd_run, "graph": cmd_graph,
            "schema": cmd_schema, "plugins": cmd_plugins, "compare": cmd_compare,
            "evaluate": cmd_evaluate, "export": cmd_export, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _interrupted.clear()
    previous = None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous = signal.signal(signal.SIGINT, _defer_sigint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            code = COMMANDS[args.command](args)
        _arm_interrupts()  # a command that never armed (plugins, schema): a noted Ctrl-C
        return code
    except UserError as exc:
        print(f"mlsgd-dsl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mlsgd-dsl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
