"""Hypothesis strategies for hostile hierarchy files and ``--set`` overrides.

Used by ``tests/test_hostile.py``. Everything here is data: a strategy draws an
:class:`Example` (the files to write, which one to load, optional overrides) and never runs
anything. Values come from pools of known-nasty inputs (boundary and absurd numbers, NaN/inf,
glob patterns that match everything or nothing, RTL / combining / zero-width / emoji text,
control characters, very long strings, deep nesting) mixed with hypothesis' own generators, so
that shrinking lands on a small, readable counterexample.

Two things are never generated, because running them would do harm rather than test the
core: ``import``-family factories other than harmless ones (a file naming ``os:system`` would
run it — see the named xfail case in ``test_hostile.py``) and paths to device files such as
``/dev/zero`` (covered by named cases with a memory guard).
"""

from __future__ import annotations

import copy
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from mlsgd_dsl import tomlio

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
HIERARCHIES = ROOT / "hierarchies"
#: Every shipped hierarchy file by its path relative to ``hierarchies/`` (they ``extends``
#: each other, so an example gets all of them as siblings of the mutated one).
SHIPPED_TEXT = {p.relative_to(HIERARCHIES).as_posix(): p.read_text(encoding="utf-8")
                for p in sorted(HIERARCHIES.rglob("*.toml"))}
SHIPPED_DOCS = {name: tomllib.loads(text) for name, text in SHIPPED_TEXT.items()}
SHIPPED_FILES = {name: text.encode("utf-8") for name, text in SHIPPED_TEXT.items()}
QUICKSTART = ROOT / "hierarchies" / "quickstart.toml"
QUICKSTART_DOC = tomllib.loads(QUICKSTART.read_text(encoding="utf-8"))
MAIN = "h.toml"
SAFE_FACTORY = "hostile_no_such_module_xyz:build"


@dataclass
class Example:
    """Files to write into an empty folder; ``main`` is handed to ``load`` / the CLI."""

    files: dict[str, bytes]
    main: str = MAIN
    overrides: Any = None
    label: str = ""
    notes: list[str] = field(default_factory=list)

    def size(self) -> int:
        return sum(len(b) for b in self.files.values()) + len(repr(self.overrides or ""))

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        main = self.files.get(self.main, b"")
        shown = main if len(main) <= 2_000 else main[:2_000] + b"...[%d bytes]" % len(main)
        return (f"Example(label={self.label!r:.300}, main={self.main!r}, "
                f"overrides={self.overrides!r:.500}, text={shown!r})")


# --------------------------------------------------------------------------- TOML text
# Fragments for hand-made and deliberately broken lines (inline values, partial lines); whole
# documents go through mlsgd_dsl.tomlio.

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def toml_string(text: str) -> str:
    """A TOML basic string; control characters (TOML forbids them raw) become \\uXXXX."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dumps(doc: dict[str, Any], tables: bool = True) -> str:
    """Serialise ``doc``: with ``tables`` by the project's one TOML writer (``[x]`` headers),
    else every top-level key on one line with inline tables (a form no writer produces, which
    the loader must read all the same)."""
    if tables:
        return tomlio.dumps(doc)
    return "".join(f"{toml_key(key)} = {toml_value(value)}\n" for key, value in doc.items())


def defang(value: Any) -> Any:
    """Make sure no generated file makes the ``import`` family import or call anything real."""
    if isinstance(value, dict):
        out = {k: defang(v) for k, v in value.items()}
        if "factory" in out:
            out["factory"] = SAFE_FACTORY
        if "search_path" in out:
            out["search_path"] = []
        return out
    if isinstance(value, list):
        return [defang(v) for v in value]
    return value


def example_from_doc(doc: dict[str, Any], label: str, tables: bool = True,
                     extra_files: dict[str, bytes] | None = None) -> Example:
    text = dumps(defang(doc), tables=tables)
    files = {MAIN: text.encode("utf-8")}
    files.update(extra_files or {})
    return Example(files=files, label=label)


# --------------------------------------------------------------------------- value pools

SPECIAL_INTS = [0, -1, 1, 2, 3, 7, 8, 64, 255, 4097, 65535, 65536, 65537, 2**31 - 1, 2**31,
                2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, 10**9, 10**12, 10**15, 10**18,
                10**30, 10**100, -(10**20)]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 2.2250738585072014e-308,
                  1e-300, 1e-9, 0.5, 0.999999, 1.0000001, 1e9, 1e300, 1.7976931348623157e308,
                  -1.0, -1e308]
HOSTILE_TEXT = [
    "", " ", "\t", "*", "**", "?", ".", "..", "../x", "/", "\\", "fine", "mid", "coarse", "none",
    "identity", "ruthotto-resnet", "synthetic", "CON", "nul", "__init__", "a" * 65,
    "\u202eevil\u202c", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627",
    "e\u0301\u0301\u0301\u0301", "Z\u0334\u0321\u031b\u034ea\u0336l\u0335g\u0338o\u0334",
    "\U0001f600", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\u200b", "\ufeff",
    "\x01\x1f\x7f", "a\nb", "\u0085", "\u2028", "\uffff", "\U0010ffff", "nul\x00byte",
    "${HOME}", "$(echo hostile)", "__import__('os').getcwd()", "{{7*7}}", "%s%n%x",
    "levels.fine", "fc.*", "'; DROP TABLE levels; --",
]
PATTERNS = [
    "*", "**", "?", "*.*", "[", "]", "[!]", "[!*]", "[]]", "[a-", "[z-a]", "blocks.*",
    "blocks.*.layers.*", "*.weight", "*.bias", "fc.*", "opening.*", "connect.*", "*running*",
    "*num_batches_tracked", "zzz", "", " ", ".", "\\", "blocks.[0-9].layers.*", "*" * 256,
    "*a" * 128, "fc.weight", "blocks.0.layers.0.conv.weight", "\u00e9*", "*\u202e*",
    "\U0001f600", "blocks.*.layers.*.conv.*", "blocks.*.layers.*.norm.*",
]
RULE_NAMES = ["identity", "depth.constant", "depth.linear", "kernel_basis", "resolution",
              "none", "avgpool", "", "Identity", "depth.*", "\U0001f600"]
FAMILY_NAMES = ["ruthotto-resnet", "resnet", "", "Ruthotto-ResNet", "\u202eresnet"]
SOURCE_NAMES = ["synthetic", "cifar10", "mnist", "fashion-mnist", "", "imagenet", "\U0001f600"]
TOP_KEYS = ["name", "description", "extends", "data", "model", "levels", "edges", "transfer",
            "mlsgd", "report"]
KNOWN_KEYS = sorted(set(TOP_KEYS + [
    "source", "options", "validation", "subset", "test_subset", "normalize", "augment", "seed",
    "flip", "crop", "train", "test", "size", "channels", "classes", "noise", "family",
    "layers", "kernel_size", "opening_kernel", "h", "norm_eps", "kernel_basis", "in_channels",
    "image_size", "coarsen", "method", "factor", "coarse", "fine", "mid", "default", "rules",
    "rule", "index", "restriction", "method", "cycle", "cycles", "path", "epochs", "sgd_epochs",
    "time_budget", "lr", "batch_size", "schedule", "optimizer", "optimizer_state", "objective",
    "correction", "strategy", "uncorrected_cycles", "step_regularization", "angle", "mu",
    "early_stop", "eta", "epsilon", "init", "bn_recalibration", "divergence", "eval",
    "full_batch_size", "device", "threads", "thresholds", "checkpoint", "plot", "momentum",
    "betas", "eps", "weight_decay", "kind", "every", "warmup", "min_lr", "l2", "smoothness",
]))

special_ints = st.sampled_from(SPECIAL_INTS)
special_floats = st.sampled_from(SPECIAL_FLOATS)
# st.text never yields surrogates, so every string it draws can be written as UTF-8 / TOML.
short_text = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=12))
long_text = st.builds(lambda unit, n: (unit * n)[:n * max(1, len(unit))],
                      st.sampled_from(["a", "\U0001f600", "e\u0301", "\u202e", "\u05e9", "*"]),
                      st.integers(1_000, 120_000))
hostile_text = st.one_of(short_text, short_text, long_text)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), short_text)

scalars = st.one_of(
    st.booleans(), special_ints, st.integers(), special_floats,
    st.floats(allow_nan=True, allow_infinity=True), short_text,
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(keys, children, max_size=4)),
    max_leaves=16,
)


def nest(value: Any, depth: int, kind: str) -> Any:
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


# --------------------------------------------------------------------------- doc walking


def node_paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path in ``doc`` (tables and arrays, all depths), parents before children."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield (*prefix, key)
            yield from node_paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield (*prefix, i)
            yield from node_paths(value, (*prefix, i))


def container_paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    if isinstance(doc, dict | list):
        yield prefix
        items = doc.items() if isinstance(doc, dict) else enumerate(doc)
        for key, value in items:
            yield from container_paths(value, (*prefix, key))


def get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def set_path(doc: dict, path: tuple, value: Any, templates: dict | None = None) -> None:
    """Set ``doc[path] = value``, creating tables / arrays on the way (from ``templates``)."""
    templates = templates or {}
    value = copy.deepcopy(value)  # pool values (sampled_from / just) are shared objects
    node: Any = doc
    for i, part in enumerate(path[:-1]):
        want_list = isinstance(path[i + 1], int)
        if isinstance(node, list):
            while len(node) <= part:
                node.append({})
            child = node[part]
        else:
            child = node.get(part)
        if not isinstance(child, list if want_list else dict):
            child = copy.deepcopy(templates.get(path[:i + 1], [] if want_list else {}))
            node[part] = child
        node = child
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(copy.deepcopy(templates.get((*path[:-1], "[]"), {})))
    node[last] = value


def level_names(doc: dict) -> list[str]:
    levels = doc.get("levels")
    return list(levels) if isinstance(levels, dict) else []


# --------------------------------------------------------------------------- mutations

MUTATIONS = ["delete", "replace", "retype", "duplicate", "rename", "deepen", "add"]


def _shipped_example(name: str, data: bytes, label: str) -> Example:
    return Example(files={**SHIPPED_FILES, name: data}, main=name, label=label)


@st.composite
def mutated_doc(draw: st.DrawFn, names: tuple[str, ...] = ()) -> Example:
    """A shipped file with 1-4 random edits at random depths (parsed, edited, rewritten)."""
    name = draw(st.sampled_from(list(names) or sorted(SHIPPED_DOCS)))
    doc = copy.deepcopy(SHIPPED_DOCS[name])
    done = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(MUTATIONS))
        paths = list(node_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = get(doc, path[:-1])
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = copy.deepcopy(draw(values))
        elif op == "retype":
            old = parent[key]
            parent[key] = draw(st.sampled_from([
                [old], {"value": old}, str(old), old is True, [[old]], {}, [], 0, "1e400",
            ]))
        elif op == "duplicate":
            target = draw(st.sampled_from(list(container_paths(doc))))
            node = get(doc, target)
            if isinstance(node, dict):
                node[draw(st.one_of(st.just(str(key)), keys))] = copy.deepcopy(parent[key])
            else:
                node.append(copy.deepcopy(parent[key]))
        elif op == "rename" and isinstance(parent, dict):
            new_key = draw(keys)
            items = [(new_key if k == key else k, v) for k, v in parent.items()]
            parent.clear()
            parent.update(items)
        elif op == "deepen":
            parent[key] = nest(parent[key], draw(st.integers(2, 40)),
                               draw(st.sampled_from(["list", "dict"])))
        elif op == "add":
            target = draw(st.sampled_from(list(container_paths(doc))))
            node = get(doc, target)
            if isinstance(node, dict):
                node[draw(keys)] = copy.deepcopy(draw(values))
            else:
                node.append(copy.deepcopy(draw(values)))
        done.append(f"{op} {path!r}")
    text = dumps(defang(doc), tables=draw(st.booleans()))
    return _shipped_example(name, text.encode("utf-8"), f"mutated {name}: " + "; ".join(done))


BAD_LINES = [
    "[[levels]]", "[levels.fine", "= 1", "a = ", '"""', "'''", "[]", "[[]]", "a.b = 1\na = 2",
    "\x7f = 1", "[levels.fine]", "[mlsgd]", "name = 'x'", "levels = 3", "[edges]",
    "key = [1, 2", "key = {a = 1", "0x = 1", "a = 1979-05-27T07:32:00Z", "a = 1__0",
    "x = \"\\uD800\"", "x = \"\\u0000\"", "\ufeff", "#" * 1000, "a = \"\"\"\n\"\"\"",
]


@st.composite
def mutated_text(draw: st.DrawFn, names: tuple[str, ...] = ()) -> Example:
    """Line-level edits of a shipped file: duplicate keys, dropped / swapped / garbage lines,
    hostile values spliced into ``key = value`` lines, truncation, invalid bytes."""
    name = draw(st.sampled_from(list(names) or sorted(SHIPPED_TEXT)))
    lines = SHIPPED_TEXT[name].splitlines()
    done = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["dup", "drop", "swap", "insert", "value", "key"]))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        if op == "dup" and lines:
            lines.insert(i, lines[i])
        elif op == "drop" and lines:
            del lines[i]
        elif op == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "insert":
            lines.insert(i, draw(st.one_of(
                st.sampled_from(BAD_LINES),
                st.builds(lambda k, v: f"{toml_key(k)} = {toml_value(v)}", keys, values),
                st.text(max_size=30).map(lambda s: s.replace("\r", "")),
            )))
        elif op in ("value", "key") and lines:
            line = lines[i]
            if "=" in line and not line.lstrip().startswith("#"):
                k, v = line.split("=", 1)
                if op == "value":
                    line = f"{k}= " + draw(st.one_of(
                        st.builds(toml_value, values), st.sampled_from(BAD_LINES)))
                else:
                    line = f"{toml_key(draw(keys))} ={v}"
                lines[i] = line
        done.append(f"{op}@{i}")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    tail = draw(st.sampled_from(["none", "none", "truncate", "bytes", "crlf", "bom"]))
    if tail == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif tail == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(
            [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xfe\xff", b"\x80\x80"])) + data[at:]
    elif tail == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif tail == "bom":
        data = b"\xef\xbb\xbf" + data
    done.append(tail)
    return _shipped_example(name, data, f"text {name}: " + ", ".join(done))


# --------------------------------------------------------------------------- adversarial

#: Numeric (or list-of-number) settings of the quickstart and where a table must be created.
NUMERIC_PATHS: list[tuple] = [
    ("mlsgd", "cycles"), ("mlsgd", "batch_size"), ("mlsgd", "batch_size", "fine"),
    ("mlsgd", "lr"), ("mlsgd", "epochs"), ("mlsgd", "epochs", "fine"), ("mlsgd", "threads"),
    ("data", "options", "train"), ("data", "options", "test"), ("data", "options", "size"),
    ("data", "options", "channels"), ("data", "options", "classes"),
    ("data", "options", "noise"), ("data", "options", "seed"), ("data", "validation"),
    ("data", "subset"), ("data", "test_subset"), ("data", "seed"), ("data", "augment", "crop"),
    ("model", "channels"), ("model", "channels", 0), ("model", "kernel_size"),
    ("model", "opening_kernel"), ("model", "norm_eps"), ("model", "h"),
    ("model", "in_channels"), ("model", "image_size"),
    ("levels", "fine", "model", "layers"), ("levels", "mid", "model", "layers"),
    ("levels", "coarse", "model", "layers"), ("levels", "fine", "h"), ("levels", "coarse", "h"),
    ("levels", "coarse", "data", "coarsen", 0, "factor"),
    ("mlsgd", "eval", "batch_size"), ("mlsgd", "full_batch_size"),
    ("mlsgd", "bn_recalibration"), ("mlsgd", "seed"), ("mlsgd", "uncorrected_cycles"),
    ("mlsgd", "sgd_epochs"), ("mlsgd", "time_budget"), ("mlsgd", "step_regularization"),
    ("mlsgd", "schedule", "every"), ("mlsgd", "schedule", "warmup"),
    ("mlsgd", "schedule", "factor"), ("mlsgd", "angle", "mu"), ("mlsgd", "angle", "every"),
    ("mlsgd", "angle", "fraction"), ("mlsgd", "optimizer", "momentum"),
    ("mlsgd", "optimizer", "betas"), ("mlsgd", "optimizer", "eps"),
    ("mlsgd", "objective", "l2"), ("mlsgd", "divergence", "factor"),
    ("mlsgd", "early_stop", "eta"), ("mlsgd", "correction", "fraction"),
    ("report", "thresholds"), ("report", "thresholds", 0),
    ("transfer", "rules", "blocks.*.layers.*", "factor"),
]
TEMPLATES: dict[tuple, Any] = {
    ("levels", "coarse", "data", "coarsen"): [{"method": "avgpool"}],
    ("levels", "coarse", "data", "coarsen", "[]"): {"method": "avgpool"},
    ("transfer", "rules", "blocks.*.layers.*"): {"rule": "depth.constant"},
    ("mlsgd", "angle"): {"mu": 0.0},
    ("mlsgd", "correction"): {"strategy": "stochastic"},
    ("mlsgd", "batch_size"): {"fine": 100, "mid": 100, "coarse": 100},
    ("mlsgd", "epochs"): {"fine": 1, "mid": 1, "coarse": 1},
}
size_values = st.one_of(
    special_ints, special_floats, st.integers(-5, 5_000), st.booleans(),
    st.sampled_from(["10", "1e3", "", "inf", "NaN", "0x10"]),
    st.lists(st.one_of(special_ints, st.integers(-2, 64)), min_size=0, max_size=9),
    st.sampled_from([[100_000], [1] * 8, [10**9], [2**31], [46_341], [0], [-1], [1.5]]),
    st.just({"nested": 1}),
)


@st.composite
def huge_requests(draw: st.DrawFn) -> Example:
    """Absurd, negative, NaN/inf or wrongly typed sizes: networks, data, epochs, batches."""
    doc = copy.deepcopy(QUICKSTART_DOC)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(NUMERIC_PATHS))
        value = draw(size_values)
        set_path(doc, path, value, TEMPLATES)
        done.append(f"{'.'.join(map(str, path))}={value!r}"[:80])
    return example_from_doc(doc, "huge: " + "; ".join(done))


def _rename_levels(doc: dict, mapping: dict[str, str]) -> None:
    levels = doc["levels"]
    doc["levels"] = {mapping.get(k, k): v for k, v in levels.items()}
    for v in doc["levels"].values():
        if isinstance(v, dict) and isinstance(v.get("extends"), str):
            v["extends"] = mapping.get(v["extends"], v["extends"])
    mlsgd = doc.get("mlsgd", {})
    for key in ("epochs", "lr", "batch_size", "optimizer"):
        if isinstance(mlsgd.get(key), dict):
            mlsgd[key] = {mapping.get(k, k): v for k, v in mlsgd[key].items()}
    for edge in doc.get("edges", []) or []:
        for side in ("coarse", "fine"):
            if edge.get(side) in mapping:
                edge[side] = mapping[edge[side]]


@st.composite
def unicode_names(draw: st.DrawFn) -> Example:
    """Hostile text as level names (consistently renamed), keys and string values."""
    doc = copy.deepcopy(QUICKSTART_DOC)
    names = level_names(doc)
    renamed = draw(st.lists(st.sampled_from(names), min_size=0, max_size=3, unique=True))
    mapping = {old: draw(hostile_text) for old in renamed}
    if len(set(mapping.values())) == len(mapping):
        _rename_levels(doc, mapping)
    spots = draw(st.lists(st.sampled_from([
        ("name",), ("description",), ("data", "source"), ("model", "family"),
        ("levels", "fine", "description"), ("transfer", "default"), ("mlsgd", "correction"),
        ("mlsgd", "cycle"), ("mlsgd", "device"), ("report", "checkpoint"),
        ("mlsgd", "optimizer", "name"), ("mlsgd", "path"), ("levels", "fine", "extends"),
    ]), max_size=3))
    for spot in spots:
        if spot[0] == "levels" and spot[1] not in doc["levels"]:
            continue
        set_path(doc, spot, draw(hostile_text))
    for _ in range(draw(st.integers(0, 2))):  # hostile keys in random tables
        target = draw(st.sampled_from(list(container_paths(doc))))
        node = get(doc, target)
        if isinstance(node, dict):
            node[draw(hostile_text)] = draw(values)
    return example_from_doc(doc, f"unicode: levels {mapping!r:.120} spots {spots}")


@st.composite
def extends_cycles(draw: st.DrawFn) -> Example:
    """Level inheritance: self-reference, cycles of length 2-3, dangling and mistyped targets;
    file inheritance: self, 2-3 file cycles, missing / odd paths."""
    doc = copy.deepcopy(QUICKSTART_DOC)
    names = level_names(doc)
    kind = draw(st.sampled_from(["self", "cycle", "dangling", "mistyped", "file-self",
                                 "file-cycle", "file-odd", "chain+cycle"]))
    extra: dict[str, bytes] = {}
    if kind == "self":
        who = draw(st.sampled_from(names))
        doc["levels"][who]["extends"] = who
    elif kind in ("cycle", "chain+cycle"):
        k = draw(st.integers(2, 3))
        ring = draw(st.permutations(names))[:k]
        for a, b in zip(ring, ring[1:] + ring[:1]):
            doc["levels"][a]["extends"] = b
        if kind == "chain+cycle":
            doc["levels"]["extra"] = {"extends": ring[0], "h": 8.0}
    elif kind == "dangling":
        who = draw(st.sampled_from(names))
        doc["levels"][who]["extends"] = draw(hostile_text)
    elif kind == "mistyped":
        who = draw(st.sampled_from(names))
        doc["levels"][who]["extends"] = draw(st.one_of(
            special_ints, special_floats, st.just([names[0]]), st.just({"level": names[0]}),
            st.booleans()))
    elif kind == "file-self":
        doc = {"extends": MAIN, **doc}
    elif kind == "file-cycle":
        k = draw(st.integers(2, 3))
        chain = [MAIN] + [f"f{i}.toml" for i in range(1, k)]
        for a, b in zip(chain[1:], chain[2:] + [MAIN]):
            extra[a] = dumps({"extends": b, "description": a}).encode()
        doc = {"extends": chain[1], **doc}
    elif kind == "file-odd":
        doc = {"extends": draw(st.one_of(
            st.sampled_from(["", ".", "..", "/", "missing.toml", "sub/", "./h.toml",
                             "../" * 40 + "nope.toml", "x" * 5000, "f1.toml"]),
            short_text.filter(lambda s: "\x00" not in s),
            special_ints, st.just(["h.toml"]))), **doc}
        if draw(st.booleans()):
            extra["f1.toml"] = draw(st.sampled_from([b"", b"\xff\xfe", b"name = ",
                                                     b"extends = 3", b"[levels]"]))
    return example_from_doc(doc, f"extends {kind}", extra_files=extra)


@st.composite
def edge_graphs(draw: st.DrawFn) -> Example:
    """``[[edges]]``: a DAG (file order = finest first) with 0-3 perturbations: cycles of
    length 1-3, duplicates, unknown names, two finest levels, disconnected parts, mistyped
    tables, per-edge transfer tables, ``mlsgd.path`` through it."""
    doc = copy.deepcopy(QUICKSTART_DOC)
    if draw(st.booleans()):
        for i in range(draw(st.integers(1, 3))):
            doc["levels"][f"extra{i}"] = {"h": 8.0 * (i + 1), "model": {"layers": 1}}
        doc["mlsgd"]["epochs"] = 1
    names = level_names(doc)  # finest first
    edges: list[Any] = [{"coarse": c, "fine": f} for f, c in zip(names, names[1:])]
    for _ in range(draw(st.integers(0, 2))):  # extra forward edges keep it a DAG
        i, j = sorted(draw(st.lists(st.integers(0, len(names) - 1), min_size=2, max_size=2,
                                    unique=True)))
        edges.append({"coarse": names[j], "fine": names[i]})
    done = []
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["cycle", "self", "duplicate", "unknown", "drop", "reverse",
                                   "transfer", "missing-side", "extra-key"]))
        done.append(op)
        if op == "cycle":
            k = draw(st.integers(2, 3))
            ring = draw(st.permutations(names))[:k]
            edges += [{"coarse": a, "fine": b} for a, b in zip(ring, ring[1:] + ring[:1])]
        elif op == "self":
            who = draw(st.sampled_from(names))
            edges.append({"coarse": who, "fine": who})
        elif op == "duplicate" and edges:
            edges.append(copy.deepcopy(draw(st.sampled_from(edges))))
        elif op == "unknown" and edges:
            edge = draw(st.sampled_from(edges))
            edge[draw(st.sampled_from(["coarse", "fine"]))] = draw(hostile_text)
        elif op == "drop" and edges:
            edges.remove(draw(st.sampled_from(edges)))
        elif op == "reverse" and edges:
            edge = draw(st.sampled_from(edges))
            if "coarse" in edge and "fine" in edge:
                edge["coarse"], edge["fine"] = edge["fine"], edge["coarse"]
        elif op == "transfer" and edges:
            draw(st.sampled_from(edges))["transfer"] = draw(st.one_of(
                st.just({"default": "identity"}), st.just({}),
                st.builds(lambda p, r: {"rules": {p: r}}, st.sampled_from(PATTERNS),
                          st.sampled_from(RULE_NAMES)),
                values))
        elif op == "missing-side" and edges:
            edge = draw(st.sampled_from(edges))
            edge.pop(draw(st.sampled_from(["coarse", "fine"])), None)
        elif op == "extra-key" and edges:
            draw(st.sampled_from(edges))[draw(keys)] = draw(values)
    draw(st.randoms(use_true_random=False)).shuffle(edges)
    doc["edges"] = draw(st.sampled_from([edges] * 10 + [
        {"coarse": names[0]}, [1, 2], [[names[0], names[1]]]]))
    if draw(st.integers(0, 3)) == 0:
        doc["mlsgd"]["path"] = draw(st.one_of(
            st.permutations(names).map(lambda p: list(reversed(p))),
            st.lists(st.sampled_from(names), max_size=4),
            st.lists(st.lists(st.sampled_from(names), max_size=3), max_size=3)))
    return example_from_doc(doc, f"edges {done}: {doc['edges']!r:.200}")


REAL_RULES = ["identity", "depth.constant", "depth.linear", "kernel_basis", "resolution"]
rule_values = st.one_of(
    st.sampled_from(REAL_RULES), st.sampled_from(REAL_RULES), st.sampled_from(REAL_RULES),
    st.sampled_from(RULE_NAMES), hostile_text,
    st.fixed_dictionaries({"rule": st.sampled_from(REAL_RULES + RULE_NAMES)}, optional={
        "factor": st.one_of(special_ints, special_floats), "index": st.one_of(
            st.sampled_from(["layers", "blocks", "*", "", "(a+)+$", ".*"]), short_text),
        "restriction": st.sampled_from(["transpose", "injection", "x"]),
        "scale": st.one_of(st.sampled_from(["auto", 1, 0, -1]), special_floats),
        "mode": st.sampled_from(["nearest", "bilinear", "cubic"]),
        "extra": values,
    }),
    values,
)


@st.composite
def patterns(draw: st.DrawFn) -> Example:
    """``[transfer]`` rules whose globs match everything, nothing, or overlap."""
    doc = copy.deepcopy(QUICKSTART_DOC)
    rules = draw(st.dictionaries(
        st.one_of(st.sampled_from(PATTERNS), st.sampled_from(PATTERNS), short_text),
        rule_values, min_size=0, max_size=4))
    if draw(st.booleans()):
        rules = {**doc["transfer"]["rules"], **rules}
    doc["transfer"]["rules"] = rules
    if draw(st.booleans()):
        choice = draw(st.one_of(st.sampled_from(RULE_NAMES), rule_values))
        doc["transfer"]["default"] = choice
    elif draw(st.booleans()):
        del doc["transfer"]["default"]
    return example_from_doc(doc, f"patterns {rules!r:.200}")


@st.composite
def deep_nesting(draw: st.DrawFn) -> Example:
    """Tables and arrays nested just below, at and far above the loader's depth limit."""
    depth = draw(st.one_of(st.integers(25, 40), st.integers(100, 3_000),
                           st.sampled_from([10_000, 50_000])))
    kind = draw(st.sampled_from(["list", "dict", "header", "dotted", "mixed"]))
    where = draw(st.sampled_from([("junk",), ("model", "channels"), ("data", "options", "x"),
                                  ("levels", "fine", "model", "layers"), ("mlsgd", "path"),
                                  ("transfer", "rules", "*")]))
    base = dumps(defang(QUICKSTART_DOC))
    if kind in ("list", "dict", "mixed") and depth <= 200:
        doc = copy.deepcopy(QUICKSTART_DOC)
        inner = nest(1, depth, "list" if kind == "list" else "dict")
        if kind == "mixed":
            inner = nest(nest(1, depth // 2, "list"), depth - depth // 2, "dict")
        set_path(doc, where, inner)
        return example_from_doc(doc, f"deep {kind} {depth} at {where}")
    key = ".".join(toml_key(str(p)) for p in where)
    if kind == "header":
        text = base + "[" + ".".join(["a"] * depth) + "]\nx = 1\n"
    elif kind == "dotted":
        text = base + ".".join(["a"] * depth) + " = 1\n"
    elif kind == "dict":
        text = f"{key} = " + "{a = " * depth + "1" + "}" * depth + "\n" + base
    else:
        text = f"{key} = " + "[" * depth + "]" * depth + "\n" + base
    return Example(files={MAIN: text.encode()}, label=f"deep text {kind} {depth}")


@st.composite
def long_strings(draw: st.DrawFn) -> Example:
    """Very long names, keys, patterns and paths (still under the 1 MiB file cap)."""
    doc = copy.deepcopy(QUICKSTART_DOC)
    text = draw(long_text)
    where = draw(st.sampled_from(["name", "description", "level", "family", "source",
                                  "pattern", "extends", "key", "correction", "path"]))
    if where in ("name", "description"):
        doc[where] = text
    elif where == "level":
        _rename_levels(doc, {"mid": text})
    elif where == "family":
        doc["model"]["family"] = text
    elif where == "source":
        doc["data"]["source"] = text
    elif where == "pattern":
        doc["transfer"]["rules"][text] = "identity"
    elif where == "extends":
        doc["levels"]["fine"]["extends"] = text
    elif where == "key":
        doc["mlsgd"][text] = 1
    elif where == "correction":
        doc["mlsgd"]["correction"] = text
    else:
        doc["mlsgd"]["path"] = [text]
    return example_from_doc(doc, f"long {where} ({len(text)} chars)")


@st.composite
def raw_bytes(draw: st.DrawFn) -> Example:
    """Not a hierarchy at all: binary, empty, huge, BOMs, NULs, other encodings."""
    kind = draw(st.sampled_from(["binary", "empty", "huge", "utf16", "latin1", "nul", "text"]))
    if kind == "binary":
        data = draw(st.binary(max_size=300))
    elif kind == "empty":
        data = draw(st.sampled_from([b"", b"\n", b" ", b"#", b"\r\n"]))
    elif kind == "huge":
        data = b"# " + b"x" * ((1 << 20) + draw(st.integers(0, 10)))
    elif kind == "utf16":
        data = QUICKSTART.read_text(encoding="utf-8").encode("utf-16")
    elif kind == "latin1":
        data = 'name = "caf\u00e9"\n'.encode("latin-1")
    elif kind == "nul":
        data = b"\x00" * draw(st.integers(1, 64))
    else:
        data = draw(st.text(max_size=200)).encode("utf-8")
    return Example(files={MAIN: data}, label=f"bytes {kind}")


@st.composite
def random_documents(draw: st.DrawFn) -> Example:
    """Random TOML trees over the schema's vocabulary of keys (no shipped file as a base)."""
    doc = draw(st.dictionaries(st.one_of(st.sampled_from(TOP_KEYS), keys), values,
                               max_size=8))
    if draw(st.booleans()):
        doc["name"] = draw(st.one_of(st.just("x"), hostile_text))
    if draw(st.booleans()):
        doc["levels"] = draw(st.dictionaries(
            st.one_of(st.sampled_from(["fine", "coarse"]), short_text),
            st.one_of(st.fixed_dictionaries(
                {"model": st.fixed_dictionaries(
                    {"family": st.sampled_from(FAMILY_NAMES)},
                    optional={"channels": size_values, "layers": size_values})},
                optional={"h": st.one_of(special_floats, special_ints), "extends": short_text,
                          "data": values}), values),
            max_size=4))
    return example_from_doc(doc, "random document", tables=draw(st.booleans()))


adversarial_files = st.one_of(huge_requests(), unicode_names(), extends_cycles(),
                              edge_graphs(), patterns(), deep_nesting(), long_strings(),
                              raw_bytes())
shipped_mutations = st.one_of(mutated_doc(), mutated_text())
#: What the CLI test draws: validating a thesis-sized network takes seconds of float64 work
#: on a CPU, so through the CLI only the quickstart is mutated (the API tests take them all).
cli_hostile_files = st.one_of(
    adversarial_files, random_documents(),
    mutated_doc(("quickstart.toml",)), mutated_text(("quickstart.toml",)))


# --------------------------------------------------------------------------- --set overrides


def _dotted_paths(doc: Any, prefix: tuple = ()) -> Iterator[str]:
    for path in node_paths(doc, prefix):
        if all(isinstance(p, str) for p in path):
            yield ".".join(toml_key(p) for p in path)


REAL_KEYS = sorted(set(_dotted_paths(QUICKSTART_DOC)) | {
    "mlsgd.path", "mlsgd.threads", "mlsgd.correction.strategy", "levels.fine.extends",
    "levels.mid.data.coarsen", 'transfer.rules."fc.*"', 'transfer.rules."*"', "edges",
    "extends", "mlsgd.optimizer.betas", "mlsgd.angle.mu", "model.layers",
    "levels.new.model.family", "data.options.train", "report.thresholds",
})

bare_segment = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
segment = st.one_of(
    bare_segment, bare_segment, st.sampled_from(["fine", "mid", "mlsgd", "levels", "model"]),
    short_text.map(toml_string),                                        # "quoted"
    short_text.filter(lambda s: "'" not in s and "\n" not in s).map(lambda s: f"'{s}'"),
    st.just('""'), st.just(""),                                         # empty segment
    short_text,                                                         # raw, often invalid
)
override_keys = st.one_of(
    st.sampled_from(REAL_KEYS), st.sampled_from(REAL_KEYS),
    st.lists(segment, min_size=1, max_size=6).map(".".join),
    st.lists(bare_segment, min_size=30, max_size=40).map(".".join),
    st.integers(100, 2_000).map(lambda n: ".".join(["a"] * n)),
    st.sampled_from(["", " ", ".", "..", "a.", ".a", "a..b", "[a]", "[[a]]", "a b", "a.b c",
                     "\u202e", '"\u202e"', '"a.b".c', "mlsgd .cycles", "mlsgd. cycles",
                     "'mlsgd'.\"cycles\""]),
)
BAD_VALUES = ["{", "[1,", '"abc', "'", "1.2.3", "0x", "tru", "nan nan", "1 2", "[1, 2]]",
              "{a = 1,}", "{a = 1 b = 2}", "\"\"\"", "1979-05-27", "+", "-", "=", "==",
              "1e400", "-1e400", "0b102", "1_", "[,]", "{,}", "\\u0000", "#", "# comment"]
override_values = st.one_of(
    st.builds(toml_value, values), st.builds(toml_value, values),
    st.sampled_from(BAD_VALUES), short_text, long_text.map(lambda s: s[:50_000]),
    st.integers(30, 5_000).map(lambda n: "[" * n + "]" * n),
    st.integers(30, 1_000).map(lambda n: "{a = " * n + "1" + "}" * n),
    st.builds(lambda v, k: f"{v}\n{k} = 1", st.sampled_from(["3", "1", '"x"']),
              st.sampled_from(["name", "mlsgd.cycles", "[levels.evil]", "levels.fine.h"])),
)
override_items = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", override_keys, override_values),
    st.builds(lambda k, v: f"{k} = {v}", override_keys, override_values),
    st.builds(lambda k, v: f"{k}=={v}", override_keys, override_values),
    override_keys,                                                       # no "=" at all
    override_values.map(lambda v: f"={v}"),                              # empty key
)


#: Overrides a user would plausibly type (most are valid), so that hostile ones are also
#: combined with accepted ones and some examples get through to compile / validate.
plausible_items = st.sampled_from([
    "mlsgd.cycles=2", "mlsgd.lr=0.1", "mlsgd.batch_size=50", "levels.fine.model.layers=4",
    "levels.mid.h=2.5", 'mlsgd.cycle="W"', "model.channels=[4, 8]", "data.options.size=32",
    'transfer.rules."blocks.*.layers.*"="depth.linear"', "mlsgd.epochs=0.5",
    "mlsgd.epochs.coarse=2", "report.thresholds=[0.5]", 'mlsgd.optimizer={name="adam"}',
    "data.options.train=500", 'levels.coarse.data.coarsen=[{method="avgpool"}]',
    "mlsgd.path=[\"coarse\", \"mid\", \"fine\"]", "mlsgd.cycles = 3 ", " mlsgd.cycles=3",
    "description=\u202e", 'name="x-\u0301"', "mlsgd.angle.mu=0.5",
])


class Unwritable:
    """A Python value no TOML writer knows."""

    def __repr__(self) -> str:
        return "<Unwritable>"


python_values = st.recursive(
    st.one_of(scalars, st.none(), st.binary(max_size=4), st.just(Unwritable()),
              st.complex_numbers(max_magnitude=10), st.sampled_from([(1, 2), frozenset()])),
    lambda ch: st.one_of(st.lists(ch, max_size=3), st.dictionaries(
        st.one_of(short_text, st.integers(-3, 3)), ch, max_size=3)),
    max_leaves=8,
)

#: Lists of ``--set`` strings, or the Python API's mapping form ``{"key.path": value}``.
overrides = st.one_of(
    st.lists(override_items, min_size=1, max_size=3),
    st.lists(st.one_of(override_items, plausible_items), min_size=1, max_size=3),
    st.lists(plausible_items, min_size=1, max_size=2),
    st.dictionaries(override_keys, python_values, min_size=1, max_size=3),
)
cli_overrides = st.one_of(
    st.lists(override_items, min_size=1, max_size=3),
    st.lists(st.one_of(override_items, plausible_items), min_size=1, max_size=3),
    st.lists(plausible_items, min_size=1, max_size=2),
)
