"""``mlsgd-dsl validate``: is a compiled hierarchy coherent before any training step?

Structural facts were enforced by the compiler (it refuses what cannot be compiled); here they
are reported as rows next to the numerical checks, which run in float64 on random inputs:
shapes, ``R∘P = I`` (where a rule promises it), the adjoint identity
``h_fine·⟨P x, y⟩ = h_coarse·⟨x, P* y⟩`` with ``P*`` checked against autograd, agreement of all
paths between two levels, and the function-preservation gap.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import Tensor

from .api import CheckRow, GroupOperator
from .compiler import Compiled
from .errors import UserError
from .operators import BoundGroup, EdgeTransfer
from .registry import Entry

TOL = 1e-9  # float64 round-off allowance, relative
MAX_CHECKED_PARAMETERS = 5_000_000  # float64 model copies above this are not worth the memory
MAX_PATHS = 16  # paths compared between two levels (a dense DAG has exponentially many)


@dataclass
class Report:
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != "fail" for r in self.rows)

    def add(self, name: str, status: str, detail: str = "") -> None:
        self.rows.append(CheckRow(name, status, detail))

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.rows) for s in ("pass", "warn", "fail")}

    def table(self) -> str:
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  ------"]
        for r in self.rows:
            lines.append(f"{r.name:<{width}}  {r.status:<6}  {r.detail}")
        c = self.counts()
        lines.append(f"\n{c['pass']} passed, {c['warn']} warnings, {c['fail']} failed")
        return "\n".join(lines)


def _random(shapes: Mapping[str, torch.Size], gen: torch.Generator) -> dict[str, Tensor]:
    return {n: torch.randn(tuple(s), generator=gen, dtype=torch.float64) for n, s in shapes.items()}


def _dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


def _norm(a: Mapping[str, Tensor]) -> float:
    return _dot(a, a) ** 0.5


def _label(c: Compiled, group: BoundGroup) -> str:
    entry = c.registry.items["transfer rules"].get(group.rule)
    return entry.label() if entry else f"rule {group.rule}"


def _copies(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.clone() for n, t in tensors.items()}


def _changed(given: Mapping[str, Tensor], original: Mapping[str, Tensor]) -> list[str]:
    return [n for n in original if not torch.equal(given[n], original[n])]


def _linearity(maps: list[tuple[str, Callable[[dict[str, Tensor]], dict[str, Tensor]],
                                dict[str, Tensor], dict[str, Tensor]]],
               gen: torch.Generator) -> tuple[float, str]:
    """Worst relative error of f(a·u + b·v) = a·f(u) + b·f(v), and which map has it.

    ``maps`` holds (name, f, u, f(u)) with f(u) already computed by the other rows, so each map
    costs two more calls.
    """
    a, b = 0.7, -1.3
    worst, where = 0.0, ""
    for map_name, f, u, fu in maps:
        v = _random({n: t.shape for n, t in u.items()}, gen)
        fv = f(_copies(v))
        mixed = f({n: a * u[n] + b * v[n] for n in u})
        diff = {n: mixed[n] - (a * fu[n] + b * fv[n]) for n in mixed}
        scale = max(_norm(mixed), abs(a) * _norm(fu) + abs(b) * _norm(fv), 1e-300)
        err = _norm(diff) / scale
        if err >= worst:
            worst, where = err, map_name
    return worst, where


def _group_rows(c: Compiled, edge: EdgeTransfer, group: BoundGroup, gen: torch.Generator,
                report: Report) -> None:
    """Rows of one bound rule: shapes, R∘P = I, linearity, adjoint.

    A map that writes into its input gets an ``inputs`` row and nothing else is checked; a
    non-linear map gets a failing ``linearity`` row and no ``adjoint`` row (a transpose only
    exists for a linear P, so "wrong P*" would blame the wrong thing).
    """
    op: GroupOperator = group.operator
    spec = op.spec
    name = f"{edge.coarse}->{edge.fine} {group.pattern} [{group.rule}]"
    floats_c = {n: s for n, s in spec.coarse.items() if n in edge.coarse_params}
    floats_f = {n: s for n, s in spec.fine.items() if n in edge.fine_params}
    size = sum(math.prod(s) for s in (*floats_c.values(), *floats_f.values()))
    if size > MAX_CHECKED_PARAMETERS:
        report.add(name, "warn", f"numerical checks skipped: {size:,} values (more than "
                   f"{MAX_CHECKED_PARAMETERS:,} in float64)")
        return
    x, y = _random(floats_c, gen), _random(floats_f, gen)
    # Each map gets copies, so one that writes into its input is caught (``inputs`` row) before
    # it corrupts the other rows or trips autograd in the reference transpose.
    xc, yc, yt = _copies(x), _copies(y), _copies(y)
    try:
        px = op.prolongate(xc)
        ry = op.restrict(yc)
    except Exception as exc:
        report.add(f"{name}: operators", "fail",
                   f"{_label(c, group)}: raised {type(exc).__name__}: {exc}")
        return
    bad = [f"P gives {n}: {tuple(px[n].shape) if n in px else 'missing'}, expected "
           f"{tuple(s)}" for n, s in floats_f.items() if n not in px or px[n].shape != s]
    bad += [f"R gives {n}: {tuple(ry[n].shape) if n in ry else 'missing'}, expected {tuple(s)}"
            for n, s in floats_c.items() if n not in ry or ry[n].shape != s]
    if bad:
        report.add(f"{name}: shapes", "fail", f"{_label(c, group)}: returns wrong shapes: "
                   + "; ".join(bad[:3]))
        return
    try:
        pty = op.transpose(yt)
    except Exception as exc:
        pty, transpose_error = None, exc
    for map_name, given, original in (("P", xc, x), ("R", yc, y), ("Pᵀ", yt, y)):
        changed = _changed(given, original)
        if changed:
            report.add(f"{name}: inputs", "fail", f"{_label(c, group)}: {map_name} modifies "
                       f"its input in place ({', '.join(changed[:3])} changed); P, R and Pᵀ "
                       "must return new tensors")
            return
    try:
        if pty is None:
            raise transpose_error
        pty_auto = GroupOperator.transpose(op, y)
    except Exception as exc:
        report.add(f"{name}: adjoint", "fail",
                   f"{_label(c, group)}: transpose raised {type(exc).__name__}: {exc}")
        return
    bad = [f"Pᵀ gives {n}: {tuple(pty[n].shape) if n in pty else 'missing'}, expected "
           f"{tuple(s)}" for n, s in floats_c.items() if n not in pty or pty[n].shape != s]
    if bad:
        report.add(f"{name}: shapes", "fail", f"{_label(c, group)}: returns wrong shapes: "
                   + "; ".join(bad[:3]))
        return
    report.add(f"{name}: shapes", "pass", f"{len(floats_c)} coarse / {len(floats_f)} fine "
               "tensors")
    rpx = op.restrict(px)
    err = _norm({n: rpx[n] - x[n] for n in x}) / max(_norm(x), 1e-300)
    if op.left_inverse:
        report.add(f"{name}: R∘P = I", "pass" if err < TOL else "fail",
                   f"relative error {err:.1e}")
    else:
        report.add(f"{name}: R∘P = I", "pass", f"not promised by the rule ({err:.2f})")
    try:
        # its own generator: the other rows' random inputs stay what they were before this row
        worst, where = _linearity([("P", op.prolongate, x, px), ("R", op.restrict, y, ry),
                                   ("Pᵀ", op.transpose, y, pty)],
                                  torch.Generator().manual_seed(gen.initial_seed() + 1))
    except Exception as exc:
        report.add(f"{name}: linearity", "fail",
                   f"{_label(c, group)}: raised {type(exc).__name__}: {exc}")
        return
    if worst >= TOL:
        report.add(f"{name}: linearity", "fail", f"{_label(c, group)}: {where} is not linear "
                   f"(relative error {worst:.1e})")
        return
    report.add(f"{name}: linearity", "pass",
               f"P, R, Pᵀ linear (worst relative error {worst:.1e})")
    # h_fine <P x, y> = h_coarse <x, P* y>, with P* = (h_fine/h_coarse) Pᵀ from the rule's
    # own transpose; autograd's vector-Jacobian product of P is the reference Pᵀ.
    scale = edge.h_fine / edge.h_coarse
    lhs = edge.h_fine * _dot(px, y)
    rhs = edge.h_coarse * _dot(x, {n: scale * t for n, t in pty.items()})
    ref = _norm({n: pty_auto[n] for n in pty_auto})
    err_t = _norm({n: pty[n] - pty_auto[n] for n in pty_auto}) / max(ref, 1e-300)
    err_ip = abs(lhs - rhs) / max(abs(lhs), _norm(px) * _norm(y) * edge.h_fine, 1e-300)
    ok = err_t < TOL and err_ip < TOL
    detail = f"P* vs autograd {err_t:.1e}, inner products {err_ip:.1e}"
    report.add(f"{name}: adjoint", "pass" if ok else "fail",
               detail if ok else f"{_label(c, group)}: wrong P*: {detail}")


def _path_rows(c: Compiled, gen: torch.Generator, report: Report) -> None:
    # Every level's way up to the finest: the prolongations a cycle can use.
    for a, b in ((a, c.finest) for a in c.levels if a != c.finest):
        paths = list(itertools.islice(nx.all_simple_paths(c.graph, a, b), MAX_PATHS))
        if len(paths) < 2:
            continue
        x = _random({n: c.nodes[a].shapes[n] for n in c.nodes[a].parameters}, gen)
        results = [c.transfer(a, b, via=p).prolongate(x) for p in paths]
        worst = max(_norm({n: r[n] - results[0][n] for n in r}) / max(_norm(results[0]), 1e-300)
                    for r in results[1:])
        label = f"paths {a}->{b}"
        detail = f"{len(paths)} paths, max relative difference of P {worst:.1e}"
        report.add(label, "pass" if worst < TOL else "warn",
                   detail if worst < TOL else detail + " (the paths do not commute)")


def _inputs(c: Compiled, gen: torch.Generator, batch: int = 4) -> dict[str, Tensor]:
    """A random batch at the data source's shape, coarsened for each level."""
    src = c.registry.get("data sources", c.hierarchy.data.source)
    ch, hh, ww, _ = src.record.shape(c._options[("data",)])
    base = torch.randn(batch, ch, hh, ww, generator=gen, dtype=torch.float64)
    out = {}
    for name, node in c.nodes.items():
        x = base
        for entry, opts in node.coarsen:
            x = entry.record.apply(x, opts)
        out[name] = x
    return out


def _edge_signatures(c: Compiled) -> dict[tuple[str, str], tuple]:
    """What the numerical rows of an edge depend on: both levels (architecture, options, input,
    h, coarsenings) and the transfer table that binds it. Edges with equal signatures (a dense
    graph of identical levels) get equal rows, so each signature is checked once."""
    def level(name: str) -> tuple:
        node = c.nodes[name]
        return (node.family.record.name, repr(node.options), node.input_shape,
                node.num_classes, node.h, tuple((e.record.name, repr(o)) for e, o in node.coarsen))
    specs = {(co, fi): spec.model_dump_json() for co, fi, spec in c.hierarchy.edge_list()}
    return {(co, fi): (level(co), level(fi), specs.get((co, fi))) for co, fi in c.graph.edges}


def _repeat_rows(report: Report, first: str, edge: str, suffixes: tuple[str, ...]) -> None:
    """The rows of edge ``first`` again under ``edge`` (identical levels and rules)."""
    for row in list(report.rows):
        if row.name.startswith(first) and row.name[len(first):].startswith(suffixes):
            report.add(edge + row.name[len(first):], row.status,
                       f"{row.detail} (as {first}: identical levels and rules)")


def _function_rows(c: Compiled, gen: torch.Generator, report: Report,
                   signatures: dict[tuple[str, str], tuple] | None = None) -> None:
    too_big = [n for n, node in c.nodes.items() if node.n_parameters > MAX_CHECKED_PARAMETERS]
    if too_big:
        report.add("function preservation", "warn", f"skipped: levels {too_big} have more than "
                   f"{MAX_CHECKED_PARAMETERS:,} parameters (a float64 copy would be large)")
        return
    try:
        inputs = _inputs(c, gen)
    except (RuntimeError, MemoryError) as exc:
        report.add("function preservation", "warn", f"skipped: no room for a float64 batch "
                   f"({type(exc).__name__})")
        return
    first: dict[tuple, str] = {}
    for coarse, fine in c.graph.edges:
        edge = c.edge(coarse, fine)
        name = f"{coarse}->{fine}: function preservation"
        sig = (signatures or {}).get((coarse, fine))
        if sig is not None and sig in first:
            _repeat_rows(report, first[sig], f"{coarse}->{fine}", (": function preservation",))
            continue
        if sig is not None:
            first[sig] = f"{coarse}->{fine}"
        try:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            cm = c.model(coarse).double().eval()
            fm = c.model(fine).double().eval()
            sd = {n: t.detach() for n, t in cm.state_dict().items()}
            fm.load_state_dict(edge.prolongate(sd))
            with torch.no_grad():
                yc, yf = cm(inputs[coarse]), fm(inputs[fine])
        except UserError:
            raise
        except Exception as exc:
            report.add(name, "fail", f"{type(exc).__name__}: {exc}")
            continue
        gap = float((yf - yc).norm() / max(float(yc.norm()), 1e-300))
        # Informative, not a pass/fail criterion: depth and resolution transfers are only
        # approximately function preserving (discretisation error at a random initialisation).
        report.add(name, "pass" if math.isfinite(gap) else "fail",
                   f"relative output gap {gap:.2e} (prolongated coarse vs coarse network)")


BATCHNORM_OFF = ("the finest network has BatchNorm layers and mlsgd.eval.recalibrate = 0: "
                 "evaluations, checkpoints and the summary use the running statistics, which "
                 "after a short visit at a high step can describe a far worse network than "
                 "the weights (set it to e.g. 2000)")


def _batchnorm_row(c: Compiled, report: Report) -> None:
    """Warn when the finest network's BatchNorm statistics would be reported as training left
    them: they lag weights that moved fast."""
    if not any(name.endswith("running_mean") for name in c.nodes[c.finest].shapes):
        return
    images = c.hierarchy.mlsgd.eval.recalibrate
    if images == 0:
        report.add("batchnorm statistics", "warn", BATCHNORM_OFF)
    else:
        report.add("batchnorm statistics", "pass",
                   f"re-estimated on {images:,} training images before every evaluation")


def _schedule_row(c: Compiled, report: Report) -> None:
    """``cascade_epochs`` only acts in cascade / fmg runs (kept legal for sweeps over the
    cycle kind); say so when it is set for V/W/F."""
    spec = c.hierarchy.mlsgd
    if spec.cascade_epochs is not None and spec.cycle not in ("cascade", "fmg"):
        report.add("cycle kind", "warn", f"mlsgd.cascade_epochs is set but cycle = "
                   f"{spec.cycle!r} has no coarse-to-fine pass: it is unused (it applies to "
                   "'cascade' and 'fmg')")


def _provider_rows(c: Compiled, report: Report) -> None:
    """Which distribution (and version) provides each named component the file uses."""
    rules: dict[str, Entry] = {}
    for key, value in c.plugin_options().items():
        if key[:1] == ("transfer",) or key[:1] == ("edges",):
            entry = value[0]
            rules[entry.record.name] = entry
    for name, entry in sorted(rules.items()):
        report.add(f"rule {name}", "pass", f"{entry.provider()} (plugin {entry.plugin})")
    used = [("family", n.family) for n in c.nodes.values()]
    used += [("coarsening", e) for n in c.nodes.values() for e, _ in n.coarsen]
    used.append(("data source", c.registry.get("data sources", c.hierarchy.data.source)))
    used.append(("correction", c.plugin_options()[("mlsgd", "correction")][0]))
    shown = dict.fromkeys(f"{what} {e.record.name}: {e.provider()}" for what, e in used)
    report.add("other plugins", "pass", "; ".join(shown))


def validate(c: Compiled, *, seed: int = 0) -> Report:
    """Run every check on a compiled hierarchy; ``report.ok`` is False when one fails.

    Raises :class:`~mlsgd_dsl.errors.PluginFailure` when the correction strategy's ``create``
    returns something that is not a strategy (the runner would fail on it later).
    """
    report = Report()
    h = c.hierarchy
    c.correction()  # checked where it enters: a wrong kind of object is a PluginFailure
    report.add("references", "pass",
               f"{len(c.nodes)} levels, {c.graph.number_of_edges()} edges; data "
               f"{h.data.source!r}; families "
               f"{sorted({n.family.record.name for n in c.nodes.values()})}")
    report.add("graph", "pass", f"acyclic, connected, finest level {c.finest!r}; "
               f"cycle path(s): {' | '.join('->'.join(p) for p in c.paths)}")
    _provider_rows(c, report)
    for coarse, fine in c.graph.edges:
        edge = c.edge(coarse, fine)
        rules = sorted({g.rule for g in edge.full})
        report.add(f"{coarse}->{fine}: coverage", "pass",
                   f"{len(edge.coarse_names)} coarse / {len(edge.fine_names)} fine tensors, "
                   f"each matched by exactly one rule ({', '.join(rules)})")
        fc, ff = c.nodes[coarse].flops, c.nodes[fine].flops
        pc, pf = c.nodes[coarse].n_parameters, c.nodes[fine].n_parameters
        cost = f"{pc:,} vs {pf:,} parameters"
        if fc and ff:
            cost += f"; {fc / ff:.2f}x the FLOPs per sample"
        cheaper = (fc < ff) if (fc and ff) else (pc < pf)
        same = (fc == ff) if (fc and ff) else (pc == pf)
        report.add(f"{coarse}->{fine}: cost", "pass" if cheaper else
                   ("warn" if same else "fail"), cost)
    gen = torch.Generator().manual_seed(seed)
    signatures = _edge_signatures(c)
    first: dict[tuple, str] = {}
    for coarse, fine in c.graph.edges:
        edge = c.edge(coarse, fine)
        sig = signatures[coarse, fine]
        if sig in first:
            _repeat_rows(report, first[sig], f"{coarse}->{fine}", (" ",))
            continue
        first[sig] = f"{coarse}->{fine}"
        for group in edge.params:
            try:
                _group_rows(c, edge, group, gen, report)
            except (RuntimeError, MemoryError) as exc:
                report.add(f"{coarse}->{fine} {group.pattern} [{group.rule}]", "warn",
                           f"skipped: {type(exc).__name__} (out of memory for float64 checks?)")
    _path_rows(c, gen, report)
    _function_rows(c, gen, report, signatures)
    _batchnorm_row(c, report)
    _schedule_row(c, report)
    for name, entry in sorted(c.registry.items["checks"].items()):
        try:
            rows = list(entry.record.run(c))
        except Exception as exc:
            report.add(name, "fail", f"{entry.label()}: check raised {type(exc).__name__}: "
                       f"{exc}")
            continue
        report.rows.extend(rows)
    return report
