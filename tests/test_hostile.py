"""Hostile inputs (issue 8, part 2): malformed and adversarial hierarchy files and ``--set``.

The contract under test: whatever a file or an override says, ``mlsgd-dsl validate`` ends with
a clear one-line message and exit code 2 (or, for a file that happens to be valid, 0 / 1) —
never a traceback, never a hang, never a multi-gigabyte allocation. Through the Python API only
:class:`mlsgd_dsl.errors.UserError` may escape ``load`` / ``compile``.

* Property tests (hypothesis, derandomized, no example database) draw files from
  ``tests/hostile_strategies.py``: random mutations of every shipped hierarchy, absurd sizes,
  NaN/inf, hostile unicode, very long strings, deep nesting, inheritance and edge cycles, glob
  patterns that match everything or nothing, raw bytes, random documents, random ``--set``
  items. Most examples go through ``load`` + ``compile`` (fast); a subset goes through the
  in-process CLI, whose stderr must equal the API's message.
* Every call runs under a guard: a SIGALRM watchdog turns a hang into a failure, ``RLIMIT_AS``
  turns a runaway allocation into a failure instead of taking the machine down, and the peak
  RSS of the call (``/proc/self/clear_refs`` + ``VmHWM``) must grow by less than 1 GiB.
* Named cases pin the expected key path of the message for 85 known-nasty inputs. Cases that
  the core gets wrong today are ``xfail(strict=False)`` with the bug in the reason.

``HOSTILE_EXAMPLES_SCALE=10`` runs ten times more examples; ``HOSTILE_TIME_LIMIT`` sets the
per-call limit in seconds (default 5).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import mmap
import os
import re
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402

try:
    import hostile_strategies as hs
except ModuleNotFoundError:  # pytest in importlib mode does not put tests/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hostile_strategies as hs

import mlsgd_dsl  # noqa: E402
from mlsgd_dsl import cli  # noqa: E402
from mlsgd_dsl import registry as registry_module  # noqa: E402
from mlsgd_dsl.errors import UserError, format_path  # noqa: E402

TIME_LIMIT_S = float(os.environ.get("HOSTILE_TIME_LIMIT", "5"))
WATCHDOG_S = 2 * TIME_LIMIT_S
RSS_LIMIT = 1 << 30
AS_HEADROOM = 3 << 30
SCALE = float(os.environ.get("HOSTILE_EXAMPLES_SCALE", "1"))
ERROR_PREFIX = "mlsgd-dsl: error: "
ALLOCATION_FAILURES = ("can't allocate memory", "DefaultCPUAllocator", "MemoryError",
                       "bad_alloc", "Cannot allocate memory", "out of memory")
STATS: Counter[str] = Counter()


def n_examples(n: int) -> int:
    return max(1, round(n * SCALE))


HYPOTHESIS = dict(
    deadline=timedelta(seconds=2 * TIME_LIMIT_S + 2),
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)


# =========================================================================== guard


class Hang(BaseException):
    """Raised by the watchdog; a BaseException so that ``except Exception`` cannot eat it."""


@dataclass
class Usage:
    seconds: float = 0.0
    rss_growth: int = 0


def _status() -> dict[str, int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    return {k: int(v) * 1024 for k, v in re.findall(r"^(Vm\w+):\s+(\d+) kB", text, re.M)}


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def bounded(watchdog_s: float = WATCHDOG_S, headroom: int = AS_HEADROOM) -> Iterator[Usage]:
    """Time, peak-RSS growth, an address-space ceiling and a watchdog around one call."""
    usage = Usage()
    exact = _reset_peak()
    before = _status()
    base = before.get("VmRSS", 0) if exact else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    limited = False
    if before.get("VmSize"):
        soft = before["VmSize"] + headroom
        if old_limit[1] != resource.RLIM_INFINITY:
            soft = min(soft, old_limit[1])
        try:
            resource.setrlimit(resource.RLIMIT_AS, (soft, old_limit[1]))
            limited = True
        except (ValueError, OSError):
            pass
    alarm = threading.current_thread() is threading.main_thread()
    if alarm:
        def on_alarm(signum: int, frame: Any) -> None:
            raise Hang(f"still running after {watchdog_s:g} s (watchdog)")

        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        # Repeats: a Hang raised inside a gc callback or __del__ is swallowed as unraisable.
        signal.setitimer(signal.ITIMER_REAL, watchdog_s, 0.5)
    start = time.perf_counter()
    try:
        yield usage
    finally:
        usage.seconds = time.perf_counter() - start
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM,
                          old_handler if old_handler is not None else signal.SIG_DFL)
        if limited:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
        after = _status()
        peak = after.get("VmHWM", 0) if exact else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        usage.rss_growth = max(0, peak - base)


def check_usage(usage: Usage, what: str) -> None:
    assert usage.seconds < TIME_LIMIT_S, \
        f"took {usage.seconds:.1f} s (limit {TIME_LIMIT_S:g} s): {what}"
    assert usage.rss_growth < RSS_LIMIT, \
        f"peak RSS grew by {usage.rss_growth / 2**30:.2f} GiB: {what}"


def check_no_allocation_failure(text: str, what: str) -> None:
    for needle in ALLOCATION_FAILURES:
        assert needle not in text, f"a multi-GB allocation was attempted ({needle!r}): {what}"


# =========================================================================== fixtures


class _StandInCorrections:
    """Only used while ``mlsgd_dsl.builtins.corrections`` does not import."""

    MLSGD_DSL_API = ">=1.0"

    def __init__(self) -> None:
        from mlsgd_dsl.api import CorrectionStrategy, NoOptions
        from mlsgd_dsl.hookspecs import hookimpl

        def mlsgd_corrections() -> list:
            return [CorrectionStrategy(name="none", options=NoOptions,
                                       create=lambda options: None)]

        self.mlsgd_corrections = hookimpl(mlsgd_corrections)


@pytest.fixture(scope="module", autouse=True)
def hostile_registry() -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    try:
        importlib.import_module("mlsgd_dsl.builtins.corrections")
    except ImportError:
        original = registry_module.build_registry
        standin = _StandInCorrections()

        def build_registry(*, block: Any = (), autoload: Any = None,
                           extra_plugins: Any = ()) -> Any:
            return original(block=block, autoload=autoload,
                            extra_plugins=[*extra_plugins, ("hostile-standin", standin)])

        patch.setattr(registry_module, "build_registry", build_registry)
    registry_module.set_default_registry(registry_module.build_registry())
    # Warm up imports, the registry and torch so that no example pays for them.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with contextlib.suppress(Exception):
            cli.main(["validate", str(hs.QUICKSTART)])
    registry_module.set_default_registry(registry_module.build_registry())
    yield
    patch.undo()
    registry_module.set_default_registry(None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


_counter = itertools.count()


@contextlib.contextmanager
def materialised(ex: hs.Example, root: Path) -> Iterator[tuple[Path, list[str]]]:
    """Write the example's files into a fresh folder; yield the main path and every name by
    which a message may refer to one of the files."""
    folder = root / f"ex{next(_counter)}"
    folder.mkdir()
    try:
        for name, data in ex.files.items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        main = folder / ex.main
        names = {str(main), str(main.resolve())}
        for name in ex.files:
            names |= {str(folder / name), str((folder / name).resolve())}
        yield main, sorted(names, key=len, reverse=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# =========================================================================== checks


@dataclass
class ApiOutcome:
    error: UserError | None = None
    compiled: Any = None
    message: str = ""


def check_message(text: str, names: list[str], what: str, input_size: int) -> None:
    """One readable error: names a file (or ``--set``), bounded, no traceback."""
    assert text.strip(), f"empty error message: {what}"
    assert "Traceback (most recent call last)" not in text, f"traceback in message: {what}"
    first = text.splitlines()[0]
    assert any(first.startswith(n) or f": {n}:" in first or first.startswith(f"{n}:")
               for n in [*names, "--set"]), \
        f"message does not start with the file (or --set): {first[:300]!r}: {what}"
    assert text.count("\n") <= 12, f"message has {text.count(chr(10)) + 1} lines: {what}"
    assert len(text) <= 4 * input_size + 4096, \
        f"message of {len(text)} chars for an input of {input_size} bytes: {what}"
    check_no_allocation_failure(text, what)


def _kind(ex: hs.Example) -> str:
    return re.split(r"[: ]", ex.label or "example", maxsplit=1)[0]


def run_api(ex: hs.Example, main: Path, names: list[str], overrides: Any = None
            ) -> ApiOutcome:
    """``load`` + ``compile`` under the guard; only UserError may escape."""
    outcome = ApiOutcome()
    what = ex.label or repr(ex)[:300]
    with bounded() as usage:
        stage = "load"
        try:
            h = mlsgd_dsl.load(main, overrides)
            stage = "compile"
            outcome.compiled = mlsgd_dsl.compile(h)
        except UserError as exc:
            outcome.error = exc
        except Hang:
            pytest.fail(f"hang (> {WATCHDOG_S:g} s) in load/compile: {what}")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{type(exc).__name__} escaped load/compile: {exc!s:.500}\n"
                        f"input: {what}\n" + "".join(traceback.format_exception(exc)))
    check_usage(usage, what)
    if outcome.error is not None:
        outcome.message = str(outcome.error)
        size = ex.size() + (hs.QUICKSTART.stat().st_size if overrides is not None else 0)
        check_message(outcome.message, names, what, size)
        event(f"refused by {stage} ({type(outcome.error).__name__})")
        event(f"{_kind(ex)}: refused by {stage}")
    else:
        event("valid")
        event(f"{_kind(ex)}: valid")
    return outcome


def run_cli(argv: list[str], what: str) -> tuple[int, str, str, Usage]:
    out, err = io.StringIO(), io.StringIO()
    with bounded() as usage:
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli.main(argv)
        except SystemExit as exc:  # argparse usage errors are a clean exit 2
            rc = exc.code if isinstance(exc.code, int) else 2
            assert rc == 2 and "error:" in err.getvalue(), \
                f"SystemExit({exc.code!r}) out of cli.main: {what}"
        except Hang:
            pytest.fail(f"hang (> {WATCHDOG_S:g} s) in the CLI: {what}")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001
            pytest.fail(f"{type(exc).__name__} escaped cli.main: {exc!s:.500}\n"
                        f"input: {what}\n" + "".join(traceback.format_exception(exc)))
    return rc, out.getvalue(), err.getvalue(), usage


def check_cli(ex: hs.Example, main: Path, names: list[str], api: ApiOutcome,
              overrides: list[str] | None = None) -> None:
    """The CLI agrees with the API: same first line on stderr, exit 2; or 0/1 for valid."""
    what = ex.label or repr(ex)[:300]
    argv = ["validate", str(main), *[f"--set={o}" for o in overrides or []]]
    rc, out, err, usage = run_cli(argv, what)
    STATS["cli runs"] += 1
    check_usage(usage, what)
    assert "Traceback" not in out + err, f"traceback printed: {what}\n{err[-2000:]}"
    check_no_allocation_failure(out + err, what)
    assert rc in (0, 1, 2), f"exit code {rc}: {what}"
    if api.error is not None:
        assert rc == 2, f"the API refused the file ({api.message[:200]}) but the CLI " \
                        f"exited {rc}: {what}"
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.startswith(ERROR_PREFIX)]
        assert len(lines) == 1, f"expected one '{ERROR_PREFIX}' line, got {err[:1000]!r}"
        text = err[err.index(ERROR_PREFIX) + len(ERROR_PREFIX):]
        check_message(text, names, what, ex.size() + 4096)
        if api.error is not None:
            assert text.splitlines()[0] == api.message.splitlines()[0], \
                f"CLI and API disagree:\n  {text.splitlines()[0][:300]}\n  " \
                f"{api.message.splitlines()[0][:300]}"
    else:
        assert out.strip(), f"exit {rc} without a report: {what}"


def check_file(ex: hs.Example, root: Path, through_cli: bool = False) -> None:
    STATS["files"] += 1
    with materialised(ex, root) as (main, names):
        api = run_api(ex, main, names)
        if through_cli:
            check_cli(ex, main, names, api)


# =========================================================================== property tests


@settings(max_examples=n_examples(150), **HYPOTHESIS)
@given(ex=hs.shipped_mutations)
def test_mutated_shipped_files(ex: hs.Example, workdir: Path) -> None:
    """Every shipped hierarchy, with keys deleted / replaced / duplicated / renamed / nested at
    random depths, or its text edited line by line."""
    STATS["test mutated"] = 1
    check_file(ex, workdir)


@settings(max_examples=n_examples(250), **HYPOTHESIS)
@given(ex=hs.adversarial_files)
def test_adversarial_files(ex: hs.Example, workdir: Path) -> None:
    """Absurd sizes, NaN/inf, hostile unicode, long strings, deep nesting, inheritance and edge
    cycles, glob patterns, raw bytes."""
    STATS["test adversarial"] = 1
    check_file(ex, workdir)


@settings(max_examples=n_examples(60), **HYPOTHESIS)
@given(ex=hs.random_documents())
def test_random_documents(ex: hs.Example, workdir: Path) -> None:
    STATS["test random"] = 1
    check_file(ex, workdir)


@settings(max_examples=n_examples(60), **HYPOTHESIS)
@given(ex=hs.cli_hostile_files)
def test_hostile_files_through_cli(ex: hs.Example, workdir: Path) -> None:
    """The same inputs through ``mlsgd-dsl validate FILE`` in-process: exit 2 and one
    ``mlsgd-dsl: error: FILE: key.path: ...`` line equal to the API's message, or 0 / 1."""
    STATS["test cli"] = 1
    check_file(ex, workdir, through_cli=True)


@settings(max_examples=n_examples(150), **HYPOTHESIS)
@given(items=hs.overrides)
def test_hostile_overrides(items: Any, workdir: Path) -> None:
    """Random key paths and values against the quickstart, as ``--set`` strings (invalid TOML,
    empty keys, missing ``=``, deeply dotted keys, quoted unicode keys, injected lines) or as
    the API's ``{"key.path": value}`` mapping (values TOML cannot hold)."""
    STATS["test overrides"] = 1
    STATS["overrides"] += 1
    ex = hs.Example(files={}, overrides=items, label=f"--set {items!r:.300}")
    names = [str(hs.QUICKSTART), str(hs.QUICKSTART.resolve())]
    run_api(ex, hs.QUICKSTART, names, overrides=items)


@settings(max_examples=n_examples(40), **HYPOTHESIS)
@given(items=hs.cli_overrides)
def test_hostile_overrides_through_cli(items: list[str], workdir: Path) -> None:
    STATS["test overrides cli"] = 1
    STATS["overrides"] += 1
    ex = hs.Example(files={"quickstart.toml": hs.QUICKSTART.read_bytes()},
                    main="quickstart.toml", overrides=items, label=f"--set {items!r:.300}")
    with materialised(ex, workdir) as (main, names):
        api = run_api(ex, main, names, overrides=items)
        check_cli(ex, main, names, api, overrides=items)


# =========================================================================== named cases

QS = hs.QUICKSTART.read_text(encoding="utf-8")


def qs(old: str, new: str) -> str:
    assert old in QS, old
    return QS.replace(old, new, 1)


def qs_levels(**extends: str) -> str:
    text = QS
    for level, parent in extends.items():
        text = text.replace(f"[levels.{level}]\n", f'[levels.{level}]\nextends = "{parent}"\n')
    return text


def dag(n: int) -> str:
    """``n`` identical levels, every pair joined by an edge: 2^(n-2) paths end to end."""
    text = ('name = "dag"\n[data]\nsource = "synthetic"\n'
            "options = { train = 100, test = 100, size = 8 }\n"
            '[model]\nfamily = "ruthotto-resnet"\nchannels = [1]\nlayers = 1\n')
    names = [f"l{i}" for i in range(n)]
    text += "".join(f"[levels.{name}]\n" for name in names)
    for i, j in itertools.combinations(range(n), 2):
        text += f'[[edges]]\ncoarse = "{names[j]}"\nfine = "{names[i]}"\n'
    return text


@dataclass
class Case:
    id: str
    text: str | bytes | None = None  # the main file ("h.toml"); None: see ``main``
    path: tuple | str | None = None  # expected key path right after the file name
    contains: tuple[str, ...] = ()   # further substrings of the message
    overrides: tuple[str, ...] = ()
    extra: dict[str, str | bytes] = field(default_factory=dict)
    main: str | None = None          # absolute path to validate instead of h.toml
    rc: tuple[int, ...] = (2,)
    xfail: str | None = None
    check: Callable[[Path, str], None] | None = None  # extra assertion (folder, stderr)
    #: files the message may name (default: the main file); a cycle closes in another file
    files: tuple[str, ...] = ()
    limit_s: float = TIME_LIMIT_S  # a refusal that needs no parsing should be instant
    setup: Callable[[Path], None] | None = None  # makes special files in the case folder


def _no_side_effect(folder: Path, err: str) -> None:
    assert not (folder / "created-by-hostile-file").exists(), \
        "validating the file called os.mkdir: a hierarchy file can run arbitrary callables"


def _symlink_loop(folder: Path) -> None:
    (folder / "loop.toml").symlink_to("loop.toml")


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "fifo.toml")


def _npz_claiming_3_tb(folder: Path) -> None:
    """An .npz whose train_x header says (10**9, 3, 32, 32) uint8 but holds no data."""
    import zipfile

    import numpy as np

    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.uint8))
    header["shape"] = (10**9, 3, 32, 32)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(folder / "big.npz", "w") as archive:
        archive.writestr("train_x.npy", buffer.getvalue())
        for key, array in (("train_y", np.arange(4) % 2), ("test_y", np.arange(4) % 2),
                           ("test_x", np.zeros((4, 3, 32, 32), np.uint8))):
            member = io.BytesIO()
            np.save(member, array)
            archive.writestr(f"{key}.npy", member.getvalue())


def _short_message(folder: Path, err: str) -> None:
    line = next(ln for ln in err.splitlines() if ln.startswith(ERROR_PREFIX))
    assert len(line) <= 1_000, f"the error line is {len(line)} characters long"


LONG = "m" * 10_000
RTL = "\u202eevil\u202c"
CASES = [
    # ------------------------------------------------------------- not a hierarchy at all
    Case("not-toml", 'name = "x" = 1\n', contains=("not valid TOML",)),
    Case("not-utf8", b'name = "\xff\xfe"\n', contains=("not UTF-8",)),
    Case("utf16", QS.encode("utf-16"), contains=("not UTF-8",)),
    Case("empty-file", "", path="name", contains=("required key is missing",)),
    Case("bom", "\ufeff" + QS, contains=("not valid TOML",)),
    Case("over-1-MiB", "# " + "x" * (1 << 20) + "\n", contains=("capped",)),
    Case("directory", main="<dir>", contains=("directory",)),
    Case("missing-file", main="<missing>", contains=("no such file",)),
    Case("nested-arrays-10000", "x = " + "[" * 10_000 + "]" * 10_000 + "\n" + QS,
         contains=("nested deeper",)),
    Case("nested-inline-tables-40", "x = " + "{a = " * 40 + "1" + "}" * 40 + "\n" + QS,
         contains=("nested deeper",)),
    Case("table-header-40-deep", QS + "[" + ".".join(["a"] * 40) + "]\n",
         contains=("nested deeper",)),
    Case("dotted-key-3000-parts", ".".join(["a"] * 3000) + " = 1\n" + QS,
         contains=("dotted parts",)),
    # ------------------------------------------------------------- wrong types and sizes
    Case("levels-is-an-array", 'name = "x"\nlevels = [1, 2]\n', path="levels"),
    Case("33-levels", 'name = "x"\n' + "".join(
        f'[levels.l{i}]\nmodel = {{ family = "ruthotto-resnet", channels = [1], layers = 1 }}\n'
        for i in range(33)), path="levels", contains=("32",)),
    Case("cycles-1e15", qs("cycles = 3", "cycles = 1000000000000000"), path="mlsgd.cycles"),
    Case("batch-size-1e12", qs("batch_size = 100", "batch_size = 1000000000000"),
         path="mlsgd.batch_size"),
    Case("negative-layers", qs("model = { layers = 2 }", "model = { layers = -2 }"),
         path="levels.mid.model.layers"),
    Case("layers-is-a-string", qs("model = { layers = 2 }", 'model = { layers = "two" }'),
         path="levels.mid.model.layers"),
    Case("nan-learning-rate", qs("lr = 0.01", "lr = nan"), path="mlsgd.lr"),
    Case("inf-h", qs("h = 1.0", "h = inf"), path="levels.fine.h"),
    Case("negative-h", qs("h = 2.0", "h = -2.0"), path="levels.mid.h"),
    Case("seed-10e100", qs("correction = \"none\"", 'correction = "none"\nseed = 1' + "0" * 100),
         path="mlsgd.seed"),
    Case("channels-100000", qs("channels = [8, 16]", "channels = [100000]"),
         path="levels.fine.model"),
    Case("channels-zero", qs("channels = [8, 16]", "channels = [0]"),
         path="levels.fine.model.channels"),
    Case("epochs-for-unknown-level",
         qs("epochs = { fine = 1, mid = 1, coarse = 1 }",
            "epochs = { fine = 1, mid = 1, coarse = 1, nope = 1 }"), path="mlsgd.epochs.nope"),
    Case("coarsen-factor-1e12", qs("model = { layers = 1 }", "model = { layers = 1 }\ndata = "
                                   '{ coarsen = [{ method = "avgpool", '
                                   "factor = 1000000000000 }] }"),
         path="levels.coarse.data.coarsen[0]"),
    # ------------------------------------------------------------- unicode names and keys
    Case("rtl-level-name", qs("[levels.mid]", f'[levels."{RTL}"]'), path=("levels", RTL)),
    Case("combining-mark-level-name", qs("[levels.mid]", '[levels."e\u0301"]'),
         path=("levels", "e\u0301")),
    Case("emoji-top-level-key", '"\U0001f600" = 1\n' + QS, path=("\U0001f600",),
         contains=("unknown key",)),
    Case("control-char-key", '"a\\u0007b" = 1\n' + QS, path=("a\u0007b",),
         contains=("unknown key",)),
    Case("zero-width-family", qs('family = "ruthotto-resnet"', 'family = "ruthotto\u200b-resnet"'),
         path="levels.fine.model.family"),
    Case("long-level-name", qs("[levels.mid]", f"[levels.{LONG}]"), path=("levels", LONG)),
    # ------------------------------------------------------------- inheritance
    Case("extends-itself", qs_levels(mid="mid"), path="levels.mid.extends",
         contains=("inheritance cycle",)),
    Case("extends-cycle-2", qs_levels(fine="mid", mid="fine"), path="levels.mid.extends",
         contains=("inheritance cycle",)),
    Case("extends-cycle-3", qs_levels(fine="mid", mid="coarse", coarse="fine"),
         path="levels.coarse.extends", contains=("inheritance cycle",)),
    Case("extends-missing-level", qs_levels(mid="nope"), path="levels.mid.extends",
         contains=("not a level",)),
    Case("extends-not-a-string", qs("[levels.mid]\n", "[levels.mid]\nextends = 3\n"),
         path="levels.mid.extends"),
    Case("file-extends-itself", 'extends = "h.toml"\n' + QS, path="extends",
         contains=("inheritance cycle",)),
    Case("file-extends-cycle-2", 'extends = "b.toml"\n' + QS, path="extends",
         contains=("inheritance cycle",), extra={"b.toml": 'extends = "h.toml"\n'},
         files=("b.toml",)),
    Case("file-extends-cycle-3", 'extends = "b.toml"\n' + QS, path="extends",
         contains=("inheritance cycle",),
         extra={"b.toml": 'extends = "c.toml"\n', "c.toml": 'extends = "h.toml"\n'},
         files=("b.toml", "c.toml")),
    Case("file-extends-missing", 'extends = "nope.toml"\n' + QS, path="extends",
         contains=("cannot read",)),
    Case("file-extends-directory", 'extends = "."\n' + QS, path="extends"),
    # ------------------------------------------------------------- the level graph
    Case("edges-cycle-2", QS + '[[edges]]\ncoarse = "mid"\nfine = "fine"\n'
         '[[edges]]\ncoarse = "fine"\nfine = "mid"\n', path="edges", contains=("cycle",)),
    Case("edges-cycle-3", QS + '[[edges]]\ncoarse = "coarse"\nfine = "mid"\n[[edges]]\n'
         'coarse = "mid"\nfine = "fine"\n[[edges]]\ncoarse = "fine"\nfine = "coarse"\n',
         path="edges", contains=("cycle",)),
    Case("edge-to-itself", QS + '[[edges]]\ncoarse = "mid"\nfine = "mid"\n', path="edges[0]"),
    Case("edge-unknown-level", QS + '[[edges]]\ncoarse = "nope"\nfine = "fine"\n',
         path="edges[0].coarse"),
    Case("two-finest-levels", QS + '[[edges]]\ncoarse = "coarse"\nfine = "mid"\n[[edges]]\n'
         'coarse = "coarse"\nfine = "fine"\n', path="edges", contains=("one finest",)),
    # ------------------------------------------------------------- patterns
    Case("pattern-matches-everything", qs('"blocks.*.layers.*"', '"*"'),
         path=("transfer", "rules", "*")),
    Case("pattern-matches-nothing", qs('"blocks.*.layers.*"', '"zzz"'),
         path=("transfer", "rules", "zzz"), contains=("matches no parameter",)),
    Case("patterns-overlap", qs('rules = { "blocks.*.layers.*" = "depth.constant" }',
                                'rules = { "blocks.*.layers.*" = "depth.constant", '
                                '"blocks.*" = "identity" }'),
         path=("transfer", "rules", "blocks.*"), contains=("matched by both",)),
    Case("unknown-rule", qs('= "depth.constant"', '= "depth.cubic"'),
         path=("transfer", "rules", "blocks.*.layers.*"), contains=("no transfer rule",)),
    Case("rule-factor-0", qs('= "depth.constant"', '= { rule = "depth.constant", factor = 0 }'),
         path=("transfer", "rules", "blocks.*.layers.*", "factor")),
    # ------------------------------------------------------------- --set overrides
    Case("set-without-equals", QS, overrides=("mlsgd.cycles",), path=None,
         contains=("--set", "key.path=value")),
    Case("set-empty-key", QS, overrides=("=3",), contains=("--set", "empty key")),
    Case("set-deep-value", QS, overrides=("a=" + "[" * 5000 + "]" * 5000,),
         contains=("--set",)),
    Case("set-deep-key", QS, overrides=(".".join(["a"] * 40) + "=1",),
         contains=("--set", "nested deeper")),
    Case("set-unicode-quoted-key", QS, overrides=(f'"{RTL}"=1',), path=(RTL,),
         contains=("unknown key",)),
    Case("set-array-for-int", QS, overrides=("mlsgd.cycles=[1]",), path="mlsgd.cycles"),
    Case("set-huge-channels", QS, overrides=("model.channels=[100000]",),
         path="levels.fine.model"),
    Case("set-huge-layers-in-a-level", QS, overrides=("levels.fine.model.layers=1000000000",),
         path="levels.fine.model.layers"),
    Case("set-extends-itself", QS, overrides=('levels.fine.extends="fine"',),
         path="levels.fine.extends", contains=("inheritance cycle",)),
    # ------------------------------------------------------------- core bugs (xfail)
    Case("empty-cycle-path", qs('correction = "none"', 'correction = "none"\npath = [[]]'),
         path="mlsgd.path"),
    Case("set-empty-cycle-path", QS, overrides=("mlsgd.path=[[]]",), path="mlsgd.path"),
    Case("file-extends-nul-byte", 'extends = "a\\u0000b"\n' + QS, path="extends"),
    Case("file-extends-dev-zero", 'extends = "/dev/zero"\n' + QS, path="extends"),
    Case("validate-dev-zero", main="/dev/zero", contains=("/dev/zero",)),
    Case("layers-1e9", qs("model = { layers = 4 }", "model = { layers = 1000000000 }"),
         path="levels.fine.model.layers"),
    Case("dotted-key-50000-parts", ".".join(["a"] * 50_000) + " = 1\n" + QS,
         contains=("dotted parts",), limit_s=2.0),
    Case("set-dotted-key-50000-parts", QS, overrides=(".".join(["a"] * 50_000) + "=1",),
         contains=("--set",), limit_s=2.0),
    Case("file-extends-symlink-loop", 'extends = "loop.toml"\n' + QS, path="extends",
         setup=_symlink_loop),
    Case("file-extends-fifo", 'extends = "fifo.toml"\n' + QS, path="extends", setup=_fifo,
         limit_s=2.0),
    Case("validate-fifo", main="fifo.toml", setup=_fifo, limit_s=2.0),
    Case("tensors-npz-header-claims-3-TB", qs('source = "synthetic"', 'source = "tensors"')
         .replace("options = { train = 4000, test = 1000, size = 16, channels = 1, seed = 0 }",
                  'options = { path = "big.npz" }'), rc=(0, 1, 2), setup=_npz_claiming_3_tb),
    Case("8-blocks-of-256-layers", 'name = "big"\n[data]\nsource = "synthetic"\n'
         "options = { train = 100, test = 100, size = 128 }\n[levels.fine.model]\n"
         'family = "ruthotto-resnet"\nchannels = [1, 1, 1, 1, 1, 1, 1, 1]\nlayers = 256\n',
         rc=(0, 1, 2), limit_s=3.0),  # refusing it, or compiling 2 048 layers, needs < 3 s
    Case("synthetic-train-1e12", qs("train = 4000", "train = 1000000000000"),
         path="data.options.train"),
    Case("synthetic-size-4096", qs("size = 16, channels = 1", "size = 4096, channels = 16")
         .replace("channels = [8, 16]", "channels = [1, 1, 1, 1, 1, 1, 1, 1]"),
         path="data.options.size"),
    Case("params-under-cap-validate", qs("channels = [8, 16]", "channels = [1000]"),
         rc=(0, 1, 2)),
    Case("dense-dag-32-levels", dag(32), rc=(0, 1, 2)),
    Case("betas-nan", qs("optimizer = { momentum = 0.9 }",
                         "optimizer = { betas = [nan, 2.0] }"), path="mlsgd.optimizer.betas"),
    Case("l2-inf", qs('correction = "none"', 'correction = "none"\nobjective = { l2 = inf }'),
         path="mlsgd.objective.l2"),
    Case("import-sys-exit", 'name = "x"\n[levels.fine.model]\nfamily = "import"\n'
         'factory = "sys:exit"\n', path="levels.fine.model"),
    Case("import-calls-os-mkdir", 'name = "x"\n[levels.fine.model]\nfamily = "import"\n'
         'factory = "os:mkdir"\nkwargs = { path = "created-by-hostile-file" }\n',
         path="levels.fine.model", check=_no_side_effect),
    Case("tensors-missing-file", qs('source = "synthetic"', 'source = "tensors"').replace(
        "options = { train = 4000, test = 1000, size = 16, channels = 1, seed = 0 }",
        'options = { path = "missing.pt" }'), path="data.options"),
    Case("set-injects-another-key", QS, overrides=('mlsgd.cycles=3\nname = "evil"',),
         contains=("--set",)),
    Case("long-key-message", qs("[levels.mid]", f"[levels.{LONG}]"), check=_short_message),
]


def _case_param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=False, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_named_adversarial_case(case: Case, tmp_path: Path) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    if case.main == "<dir>":
        main = folder / "adir.toml"
        main.mkdir()
    elif case.main == "<missing>":
        main = folder / "missing.toml"
    elif case.main is not None:
        main = Path(case.main) if case.main.startswith("/") else folder / case.main
    else:
        main = folder / "h.toml"
        main.write_bytes(case.text.encode() if isinstance(case.text, str) else case.text)
    for name, data in case.extra.items():
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    if case.setup is not None:
        case.setup(folder)
    argv = ["validate", str(main), *[f"--set={o}" for o in case.overrides]]
    cwd = Path.cwd()
    os.chdir(folder)  # where the import family would create its directory
    try:
        with bounded(watchdog_s=case.limit_s + 1, headroom=RSS_LIMIT + (256 << 20)) as usage:
            try:
                with contextlib.redirect_stdout(io.StringIO()) as out, \
                        contextlib.redirect_stderr(io.StringIO()) as err:
                    rc = cli.main(argv)
            except Hang:
                pytest.fail(f"hang: {case.id}")
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001
                pytest.fail(f"{type(exc).__name__} escaped cli.main: {exc!s:.300}")
    finally:
        os.chdir(cwd)
    stdout, stderr = out.getvalue(), err.getvalue()
    check_usage(usage, case.id)
    assert usage.seconds < case.limit_s, f"took {usage.seconds:.1f} s: {case.id}"
    assert "Traceback" not in stdout + stderr
    check_no_allocation_failure(stdout + stderr, case.id)
    assert rc in case.rc, f"exit {rc}, expected {case.rc}; stderr: {stderr[-500:]!r}"
    if rc == 2:
        lines = [ln for ln in stderr.splitlines() if ln.startswith(ERROR_PREFIX)]
        assert len(lines) == 1, stderr[-1000:]
        line = lines[0][len(ERROR_PREFIX):]
        if case.path is not None:
            shown = format_path(case.path) if isinstance(case.path, tuple) else case.path
            # the reported path is the expected one or lies below it (a sharper cap)
            prefixes = [f"{main}: {shown}"] + [f"{folder / f}: {shown}" for f in case.files]
            assert any(line.startswith(p) and line[len(p):][:1] in (":", ".", "[")
                       for p in prefixes), f"expected '{prefixes[-1]}: ...', got {line[:400]!r}"
        elif not any(o for o in case.overrides):
            assert line.startswith(f"{main}:"), f"the message does not name the file: {line!r}"
        for needle in case.contains:
            assert needle in stderr, f"{needle!r} not in {stderr[:600]!r}"
    if case.check is not None:
        case.check(folder, stderr)


def test_guard_catches_hangs_allocations_and_rss() -> None:
    """The guard itself works here (else the properties above would be toothless)."""
    with pytest.raises(Hang), bounded(watchdog_s=0.2):
        time.sleep(5)
    if _status().get("VmSize"):
        # A fresh mapping needs new address space (a bytearray might reuse a freed heap).
        with pytest.raises(OSError), bounded(headroom=256 << 20):
            mmap.mmap(-1, 1 << 30)
        with bounded() as usage:
            block = bytearray(300 << 20)
            block[::4096] = b"x" * len(block[::4096])
            del block
        assert usage.rss_growth >= 250 << 20, usage


def test_mapping_override_nested_deeply() -> None:
    """The API's mapping form with a value nested 5 000 deep is refused, not a RecursionError."""
    deep: Any = 1
    for _ in range(5_000):
        deep = [deep]
    try:
        mlsgd_dsl.load(hs.QUICKSTART, {"mlsgd.cycles": deep})
    except UserError as exc:
        assert "--set" in str(exc) or "nested" in str(exc)
    else:
        pytest.fail("a 5 000-deep override value was accepted")


def test_generated_enough_examples() -> None:
    """When the property tests ran, they exercised >= 200 files and >= 100 overrides."""
    ran = {k for k in STATS if k.startswith("test ")}
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(STATS.items()))
    print(f"\nhostile inputs: {summary}")
    if {"test mutated", "test adversarial", "test random", "test cli"} <= ran:
        assert STATS["files"] >= 200 * min(SCALE, 1), summary
    if {"test overrides", "test overrides cli"} <= ran:
        assert STATS["overrides"] >= 100 * min(SCALE, 1), summary
    if not ran:
        pytest.skip("the property tests did not run in this session")
