"""Helpers shared by the benchmark scripts: arguments, machine facts, statistics, RESULTS.md.

Every script is run as ``python benchmarks/NAME.py [--smoke] [--device cpu|cuda] [--results
PATH]``; it prints its tables and replaces its own section of ``benchmarks/RESULTS.md`` (a
section is delimited by ``<!-- BEGIN key -->`` / ``<!-- END key -->`` comments, so rerunning one
benchmark leaves the others' sections alone). ``--smoke`` runs a tiny configuration in seconds;
without an explicit ``--results`` a smoke run writes nothing (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Written by the scripts in this folder (see [README.md](README.md)); each section is "
    "replaced when its script is rerun. Times are seconds unless marked otherwise; ratios are "
    "measured side by side in one process (contenders interleaved), so the machine's drift "
    "largely cancels in them.\n"
)


# --------------------------------------------------------------------------- arguments


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny configuration that runs in seconds (CI); its numbers mean nothing")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the models and data live")
    p.add_argument("--results", default=None,
                   help="markdown file whose section this script replaces (default: "
                        "benchmarks/RESULTS.md; with --smoke: none unless given; '-': none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, i.e. all cores or "
                        "$OMP_NUM_THREADS)")
    p.add_argument("--workdir", default=None,
                   help="folder for run folders (default: a temporary folder, deleted)")
    return p


def results_path(args: argparse.Namespace) -> Path | None:
    if args.results == "-":
        return None
    if args.results is None:
        return None if args.smoke else RESULTS
    return Path(args.results)


def setup_torch(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the runner does (13x slower fresh networks otherwise)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name}: --device cuda requested but torch sees no CUDA "
                 "device")


@contextlib.contextmanager
def workdir(args: argparse.Namespace):
    """The folder run folders go to: ``--workdir`` (kept) or a temporary one (removed).

    The benchmarks own it: they pass ``overwrite=True``, so a rerun replaces its runs."""
    if args.workdir:
        path = Path(args.workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="mlsgd-bench-") as tmp:
            yield Path(tmp)


# --------------------------------------------------------------------------- timing


def sync(device: Any) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: Any = "cpu") -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    """``items`` rotated by ``k``: repetition k starts with a different contender, so none is
    always first (warm caches) or last (a drifting machine)."""
    items = list(items)
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


# --------------------------------------------------------------------------- statistics


def clean(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def median(values: Iterable[float | None]) -> float | None:
    v = clean(values)
    return statistics.median(v) if v else None


def spread(values: Iterable[float | None], fmt: str = "{:.3g}") -> str:
    """``median (min–max)`` of the finite values; ``[k/n]`` when only k of n are finite (e.g. a
    threshold some seeds never reached)."""
    values = list(values)
    v, n = clean(values), len(values)
    if not v:
        return "–" if not n else f"never [0/{n}]"
    text = fmt.format(statistics.median(v))
    if len(v) > 1:
        text += f" ({fmt.format(min(v))}–{fmt.format(max(v))})"
    if len(v) < n:
        text += f" [{len(v)}/{n}]"
    return text


def fmt(value: float | None, spec: str = "{:.3g}") -> str:
    return "–" if value is None or not math.isfinite(value) else spec.format(value)


def pct(value: float | None) -> str:
    return fmt(None if value is None else 100 * value, "{:.2f}")


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":")[0].strip().lower()
            if key in ("model name", "cpu model", "hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict[str, Any]:
    import torch

    import mlsgd_dsl

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": cores,
        "torch threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "memory": _mem_total(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mlsgd-dsl": mlsgd_dsl.__version__,
        "platform": platform.platform(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "?"


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    env = ""
    if "OMP_NUM_THREADS" in os.environ:
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
    return env + "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def cli(main: Callable[[], int], hint: Callable[[str], str] | None = None) -> int:
    """Run a script's ``main``; a user error (missing data set, bad override, a plugin that is
    not installed) ends in one line on stderr and exit code 2, not a traceback."""
    from mlsgd_dsl.errors import UserError

    try:
        return main()
    except UserError as exc:
        extra = hint(str(exc)) if hint else ""
        print(f"{Path(sys.argv[0]).name}: error: {exc}{extra}", file=sys.stderr)
        return 2


def load_note(load5: float, threads: int) -> str:
    """The benchmark itself keeps about ``threads`` cores busy; more load means company."""
    if load5 > threads + 0.75:
        return (f"above this benchmark's own {threads} threads: the machine was shared and "
                "absolute times are inflated; the side-by-side ratios are what to read")
    return f"about this benchmark's own {threads} threads: no other work on the machine"


def preamble(info: dict[str, Any], started: float, extra: dict[str, Any] | None = None) -> str:
    """The lines every section starts with: date, command, machine, versions."""
    import torch

    info = dict(info)
    end = os.getloadavg()
    info["load average at end"] = " ".join(f"{x:.2f}" for x in end)
    info["torch threads"] = torch.get_num_threads()
    elapsed = time.time() - started
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"- date: {date}; wall time of the benchmark: {elapsed / 60:.1f} min",
        f"- command: `{command_line()}`",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; torch threads "
        f"{info['torch threads']} (OMP_NUM_THREADS {info['OMP_NUM_THREADS']}); device "
        f"{info['device']}" + (f" ({info['gpu']}, CUDA {info['cuda']})" if "gpu" in info
                               else ""),
        f"- load average (1/5/15 min) at start {info['load average at start']}, at end "
        f"{info['load average at end']} ({load_note(end[1], info['torch threads'])})",
        f"- versions: python {info['python']}, torch {info['torch']}, mlsgd-dsl "
        f"{info['mlsgd-dsl']}; {info['platform']}",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- markdown


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return "–" if x is None else str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(map(cell, headers)) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_section(path: Path | None, key: str, title: str, body: str) -> None:
    """Replace (or append) the section ``key`` of ``path``; other sections stay as they are.

    The file is rewritten atomically (temporary file + rename) under an exclusive lock on it,
    so two benchmarks finishing at the same time do not lose each other's section.
    """
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    block = f"{begin}\n## {title}\n\n{body.rstrip()}\n{end}\n"
    import fcntl

    for _ in range(100):
        with open(path, "a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
                    continue  # replaced while we waited: lock the new file
                handle.seek(0)
                text = handle.read()
                if not text.strip():
                    text = HEADER
                i, j = text.find(begin), text.find(end)
                if i >= 0 and j > i:
                    rest = text[j + len(end):].lstrip("\n")
                    text = text[:i] + block + ("\n" + rest if rest else "")
                else:
                    text = text.rstrip("\n") + "\n\n" + block
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)
                return
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    raise RuntimeError(f"could not lock {path}")


def report(path: Path | None, key: str, title: str, body: str) -> None:
    """Print the section and write it to ``path``."""
    print(f"\n## {title}\n\n{body}")
    write_section(path, key, title, body)
    if path is not None:
        print(f"(written to {path}, section {key!r})")


def dump_json(path: Path | None, data: Any) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
