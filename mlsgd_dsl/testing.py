"""Test helpers for plugin authors: every numerical coherence check on one rule, in isolation.

A transfer rule's test is three lines::

    from mlsgd_dsl.testing import assert_rule_coherent

    def test_my_rule():
        assert_rule_coherent("my.rule", coarse={"w": (4, 3)}, fine={"w": (8, 3)})

:func:`check_rule` binds the rule to the given tensor names and shapes exactly as the compiler
would (a :class:`~mlsgd_dsl.api.GroupSpec` between a level ``"coarse"`` and a level ``"fine"``)
and runs, in float64 on seeded random inputs, the same rows ``mlsgd-dsl validate`` prints for a
rule — shapes of ``P`` and ``R``, ``R∘P = I`` (when the operator promises it with
``left_inverse = True``), the closed-form ``Pᵀ`` against autograd's vector-Jacobian product of
``P`` and the adjoint identity ``h_fine⟨P x, y⟩ = h_coarse⟨x, P* y⟩`` — plus linearity of
``P``, ``R`` and ``Pᵀ`` and that none of them writes into its input.
:func:`assert_rule_coherent` raises :class:`AssertionError` listing the
failing rows. :func:`check_hierarchy` loads, compiles and validates a whole file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from .api import (
    CheckRow,
    CorrectionStrategy,
    DataContext,
    DataSource,
    GroupOperator,
    GroupSpec,
    TransferBindError,
    TransferRule,
)
from .contract import operator_problem, raw_data_problem, strategy_problem
from .operators import BoundGroup, EdgeTransfer
from .registry import Entry, Registry, default_registry
from .schema import validate_strict
from .validation import Report, _group_rows, validate

__all__ = ["assert_hierarchy_valid", "assert_rule_coherent", "bind_rule", "check_data_source",
           "check_hierarchy", "check_strategy",
           "check_rule", "CheckRow", "Report"]

Shape = Sequence[int] | torch.Size
Hints = Mapping[str, Mapping[str, Any]]

COARSE, FINE = "coarse", "fine"


def _resolve(rule: TransferRule | str, registry: Registry | None) -> tuple[TransferRule, Any]:
    """The rule record and, for a registered name, its registry entry (for labels)."""
    if isinstance(rule, TransferRule):
        return rule, None
    reg = registry or default_registry()
    entry = reg.get("transfer rules", rule)
    return entry.record, entry


def _options(rule: Any, options: BaseModel | Mapping[str, Any] | None) -> BaseModel:
    if isinstance(options, BaseModel):
        return options
    try:
        return validate_strict(rule.options, dict(options or {}))
    except ValidationError as exc:
        kind = "rule" if isinstance(rule, TransferRule) else "plugin"
        raise ValueError(f"options of {kind} {rule.name!r}: {exc}") from None


def _spec(coarse: Mapping[str, Shape], fine: Mapping[str, Shape], *, h_coarse: float,
          h_fine: float, hints: Hints | None, coarse_hints: Hints | None,
          fine_hints: Hints | None, pattern: str) -> GroupSpec:
    shared = dict(hints or {})
    return GroupSpec(
        pattern=pattern,
        coarse={n: torch.Size(s) for n, s in coarse.items()},
        fine={n: torch.Size(s) for n, s in fine.items()},
        coarse_level=COARSE, fine_level=FINE, h_coarse=float(h_coarse), h_fine=float(h_fine),
        coarse_hints={n: v for n, v in {**shared, **dict(coarse_hints or {})}.items()
                      if n in coarse},
        fine_hints={n: v for n, v in {**shared, **dict(fine_hints or {})}.items() if n in fine})


def bind_rule(rule: TransferRule | str, coarse: Mapping[str, Shape], fine: Mapping[str, Shape],
              *, options: BaseModel | Mapping[str, Any] | None = None, h_coarse: float = 1.0,
              h_fine: float = 1.0, hints: Hints | None = None,
              coarse_hints: Hints | None = None, fine_hints: Hints | None = None,
              pattern: str = "*", registry: Registry | None = None) -> GroupOperator:
    """Bind ``rule`` as the compiler would and return its operator (errors propagate).

    ``rule`` is a :class:`~mlsgd_dsl.api.TransferRule` or the name of an installed one;
    ``options`` a mapping validated by the rule's options model (as in a hierarchy file).
    ``hints`` are per-tensor facts given to both levels (a model's ``transfer_hints``);
    ``coarse_hints`` / ``fine_hints`` override them per level.
    """
    record, _ = _resolve(rule, registry)
    spec = _spec(coarse, fine, h_coarse=h_coarse, h_fine=h_fine, hints=hints,
                 coarse_hints=coarse_hints, fine_hints=fine_hints, pattern=pattern)
    return record.bind(spec, _options(record, options))


def check_rule(rule: TransferRule | str, coarse: Mapping[str, Shape],
               fine: Mapping[str, Shape], *,
               options: BaseModel | Mapping[str, Any] | None = None, h_coarse: float = 1.0,
               h_fine: float = 1.0, hints: Hints | None = None,
               coarse_hints: Hints | None = None, fine_hints: Hints | None = None,
               seed: int = 0, pattern: str = "*",
               registry: Registry | None = None) -> list[CheckRow]:
    """Bind ``rule`` in isolation and run every numerical coherence check; returns the rows.

    ``coarse`` / ``fine`` map tensor names to shapes (what the rule's pattern would match on
    the two levels). A bind error is a ``fail`` row (``bind``), not an exception, so a test can
    also assert that a rule *refuses* shapes it does not support. Rows, in order: ``bind``,
    ``shapes``, ``R∘P = I``, ``linearity`` (of P, R and Pᵀ), ``adjoint`` (Pᵀ vs autograd and
    the inner-product identity with ``P* = (h_fine/h_coarse)·Pᵀ``; left out when a map is not
    linear). A map that writes into its input gets an ``inputs`` row instead of the rows after
    ``shapes``. Every row's status is ``pass`` / ``fail``.
    """
    record, entry = _resolve(rule, registry)
    label = entry.label() if entry is not None else f"rule {record.name}"
    prefix = f"{COARSE}->{FINE} {pattern} [{record.name}]"
    rows = []
    options = _options(record, options)  # a mistake in the test itself: raises ValueError
    try:
        op = bind_rule(record, coarse, fine, options=options, h_coarse=h_coarse, h_fine=h_fine,
                       hints=hints, coarse_hints=coarse_hints, fine_hints=fine_hints,
                       pattern=pattern)
    except TransferBindError as exc:
        return [CheckRow(f"{prefix}: bind", "fail", f"{label}: {exc}")]
    except Exception as exc:  # what the compiler reports as a PluginFailure
        return [CheckRow(f"{prefix}: bind", "fail",
                         f"{label}: raised {type(exc).__name__} while binding: {exc}")]
    problem = operator_problem(op)  # the compiler's own check of what bind returns
    if problem:
        return [CheckRow(f"{prefix}: bind", "fail", f"{label}: {problem}")]
    rows.append(CheckRow(f"{prefix}: bind", "pass",
                         f"{len(op.spec.coarse)} coarse / {len(op.spec.fine)} fine tensors"))

    # The rows `validate` prints, from validation._group_rows, on a one-rule, one-edge shim.
    edge = EdgeTransfer(coarse=COARSE, fine=FINE, h_coarse=float(h_coarse),
                        h_fine=float(h_fine),
                        full=[], params=[BoundGroup(pattern, record.name, op)],
                        coarse_names=tuple(op.spec.coarse), fine_names=tuple(op.spec.fine),
                        coarse_params=tuple(op.spec.coarse), fine_params=tuple(op.spec.fine))
    items: dict[str, Entry] = {record.name: entry} if entry is not None else {}
    compiled = SimpleNamespace(registry=SimpleNamespace(items={"transfer rules": items}))
    report = Report()
    gen = torch.Generator().manual_seed(seed)
    _group_rows(compiled, edge, edge.params[0], gen, report)  # type: ignore[arg-type]
    rows.extend(report.rows)
    return rows


def _record(kind: str, record: Any, registry: Registry | None) -> tuple[Any, str]:
    if not isinstance(record, str):
        return record, f"{kind[:-1]} {record.name}"
    entry = (registry or default_registry()).get(kind, record)
    return entry.record, entry.label()


def check_strategy(strategy: CorrectionStrategy | str,
                   options: BaseModel | Mapping[str, Any] | None = None, *,
                   registry: Registry | None = None) -> list[CheckRow]:
    """Create the strategy as ``validate`` does and check what ``create`` returns.

    One row, ``NAME: create``: ``fail`` when ``create`` raises or returns something that is not
    a correction strategy (the same check, and message, as ``mlsgd-dsl validate``).
    """
    record, label = _record("corrections", strategy, registry)
    opts = _options(record, options)
    name = f"{record.name}: create"
    try:
        problem = strategy_problem(record.create(opts))
    except Exception as exc:
        problem = f"raised {type(exc).__name__} in create: {exc}"
    if problem:
        return [CheckRow(name, "fail", f"{label}: {problem}")]
    return [CheckRow(name, "pass", "a correction strategy")]


def check_data_source(source: DataSource | str,
                      options: BaseModel | Mapping[str, Any] | None = None, *, seed: int = 0,
                      registry: Registry | None = None) -> list[CheckRow]:
    """Call ``shape`` and ``load`` as a run does and check that they agree (one row each)."""
    record, label = _record("data sources", source, registry)
    opts = _options(record, options)
    try:
        shape = tuple(int(v) for v in record.shape(opts))
    except Exception as exc:
        return [CheckRow(f"{record.name}: shape", "fail",
                         f"{label}: raised {type(exc).__name__}: {exc}")]
    rows = [CheckRow(f"{record.name}: shape", "pass", f"(C, H, W, classes) = {shape}")]
    try:
        problem = raw_data_problem(record.load(opts, DataContext(seed=seed)), shape)
    except Exception as exc:
        problem = f"raised {type(exc).__name__} in load: {exc}"
    rows.append(CheckRow(f"{record.name}: load", "fail" if problem else "pass",
                         f"{label}: {problem}" if problem else "RawData of that shape"))
    return rows


def _failures(rows: Sequence[CheckRow]) -> list[CheckRow]:
    return [r for r in rows if r.status == "fail"]


def _raise(rows: Sequence[CheckRow], what: str) -> None:
    bad = _failures(rows)
    if bad:
        lines = "\n".join(f"  {r.name}: {r.status}: {r.detail}" for r in bad)
        raise AssertionError(f"{what}: {len(bad)} check(s) failed:\n{lines}")


def assert_rule_coherent(rule: TransferRule | str, coarse: Mapping[str, Shape],
                         fine: Mapping[str, Shape], **kwargs: Any) -> list[CheckRow]:
    """:func:`check_rule`, raising :class:`AssertionError` with the failing rows; returns rows."""
    rows = check_rule(rule, coarse, fine, **kwargs)
    name = rule.name if isinstance(rule, TransferRule) else rule
    _raise(rows, f"rule {name!r}")
    return rows


def check_hierarchy(path: str | Path, overrides: Any = None, *,
                    registry: Registry | None = None, seed: int = 0) -> Report:
    """Load, compile and validate a hierarchy file; returns the report ``validate`` prints.

    Errors in the file (or a broken plugin it uses) raise :class:`~mlsgd_dsl.errors.UserError`
    as ``mlsgd-dsl validate`` would report them.
    """
    from .compiler import compile as compile_hierarchy
    from .loader import load

    return validate(compile_hierarchy(load(path, overrides, registry=registry)), seed=seed)


def assert_hierarchy_valid(path: str | Path, overrides: Any = None, **kwargs: Any) -> Report:
    """:func:`check_hierarchy`, raising :class:`AssertionError` with the failing rows."""
    report = check_hierarchy(path, overrides, **kwargs)
    _raise(report.rows, str(path))
    return report
