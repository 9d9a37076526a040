"""The plugin API of mlsgd-dsl: one pluggy hook specification per extension point.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` whose names are
the hooks below. Third-party plugins are found through the entry-point group ``mlsgd_dsl``::

    [project.entry-points.mlsgd_dsl]
    width = "mlsgd_width.plugin"

Registration hooks are called once, when the registry is built (before a hierarchy file is
compiled), through pluggy's hook callers: each implementation from ``get_hookimpls()`` in
pluggy's call order, so ``specname``, ``tryfirst`` and ``trylast`` hold (a registration hook
cannot be a wrapper). Each returns a list of records from :mod:`mlsgd_dsl.api`; a name that two
plugins return is available from neither until the user blocks one (``-p no:PLUGIN``). What a
record's callables return (``bind``, ``create``, ``build``, ``load``) is checked where it
enters (:mod:`mlsgd_dsl.contract`). Event hooks are called by the runner while it trains; they
must not modify what they receive. A module may state the API version it needs with a PEP 440
specifier, ``MLSGD_DSL_API = ">=1.0"``.
"""

from __future__ import annotations

from typing import Any

import pluggy

from .api import Architecture, Check, Coarsening, CorrectionStrategy, DataSource, TransferRule

PROJECT = "mlsgd_dsl"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- registration


@hookspec
def mlsgd_transfer_rules() -> list[TransferRule]:
    """Return the transfer rules this plugin provides.

    Called once when the registry is built. A rule is referred to in a hierarchy file as
    ``rules = { "pattern" = "NAME" }`` or ``{ rule = "NAME", ...options }``; its ``bind`` is
    called by the compiler once per edge and pattern with a :class:`~mlsgd_dsl.api.GroupSpec`
    and the validated options, and returns a :class:`~mlsgd_dsl.api.GroupOperator`.
    """


@hookspec
def mlsgd_architectures() -> list[Architecture]:
    """Return the architecture families this plugin provides.

    Called once when the registry is built. ``[model] family = "NAME"`` selects one; the other
    keys of the level's model table are validated by its ``options`` model and passed to
    ``build(options, context)`` each time the runner or ``validate`` needs a fresh module.
    """


@hookspec
def mlsgd_data_sources() -> list[DataSource]:
    """Return the data sources this plugin provides.

    Called once when the registry is built. ``[data] source = "NAME"`` selects one and
    ``[data.options]`` is validated by its ``options`` model. ``load`` is called once per run.
    """


@hookspec
def mlsgd_coarsenings() -> list[Coarsening]:
    """Return the data coarsenings this plugin provides.

    Called once when the registry is built. A level's ``data.coarsen`` list names them;
    ``apply`` is called once per run on the whole training/validation/test tensors.
    """


@hookspec
def mlsgd_corrections() -> list[CorrectionStrategy]:
    """Return the gradient-correction strategies this plugin provides.

    Called once when the registry is built. ``[mlsgd] correction = "NAME"`` (or a table with
    ``strategy = "NAME"`` and options) selects one; ``create(options)`` is called once per run.
    """


@hookspec
def mlsgd_checks() -> list[Check]:
    """Return extra validation checks.

    Called once when the registry is built; each check's ``run(compiled)`` is called by
    ``mlsgd-dsl validate`` (and before every run) after the built-in checks, and returns a list
    of :class:`~mlsgd_dsl.api.CheckRow`.
    """


# --------------------------------------------------------------------------- events


@hookspec
def mlsgd_run_start(run: Any) -> None:
    """Called once before the first training step, with the runner (config, out dir, levels)."""


@hookspec
def mlsgd_epoch_end(run: Any, record: dict) -> None:
    """Called after every epoch of any level with the metrics row just written."""


@hookspec
def mlsgd_cycle_end(run: Any, cycle: int) -> None:
    """Called after every completed cycle, after its checkpoint has been written."""


@hookspec
def mlsgd_run_end(run: Any, summary: dict) -> None:
    """Called once after training with the run summary (also on an early, clean stop)."""
