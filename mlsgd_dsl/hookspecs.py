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
enters (:mod:`mlsgd_dsl.contract`). Event hooks are called by the runner while it trains (rank
0 only under torchrun), through pluggy's hook caller: ``tryfirst`` / ``trylast`` and wrappers
work. Their ``run`` is a :class:`~mlsgd_dsl.runner.events.RunView` — a frozen snapshot of the
run (level, cycle, epoch, latest metrics row, paths, configuration) with the finest network for
read access; mappings they receive are read-only. A hook that raises ends the run with one
line naming the plugin (exit code 2; after a completed cycle the run resumes with
``--resume``). A module may state the API version it needs with a PEP 440 specifier,
``MLSGD_DSL_API = ">=1.0"`` (1.1 added the typed event view).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

from .api import Architecture, Check, Coarsening, CorrectionStrategy, DataSource, TransferRule

if TYPE_CHECKING:  # the runner imports torch: not needed to declare the hooks
    from .runner.events import RunView

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
def mlsgd_run_start(run: RunView) -> None:
    """Called once before the first training step (after the run folder is opened or the
    checkpoint restored).

    :param run: the run as it starts: ``run.out_dir``, ``run.config``, ``run.cycles`` planned,
        ``run.cycles_done`` (> 0 when resumed), ``run.model`` the finest network.
    """


@hookspec
def mlsgd_epoch_end(run: RunView, record: Mapping[str, Any]) -> None:
    """Called after every row written to the metrics: each (possibly partial) epoch of any
    level, and event rows (``prolongated``, ``cycle``, ``early_stop:…``, a strategy's
    events).

    :param run: the run at that moment; ``run.level`` is the row's level.
    :param record: the row just written, read-only, with the columns of ``metrics.csv``
        (``cycle``, ``level``, ``visit_epoch``, ``epoch``, ``global_epoch``, ``lr``,
        ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``wall_time``,
        ``train_time``, ``event``); values not measured in that row are None.
    """


@hookspec
def mlsgd_cycle_end(run: RunView, cycle: int) -> None:
    """Called after every completed cycle, after its checkpoint has been written.

    :param run: the run after the cycle (``run.cycles_done == cycle + 1``).
    :param cycle: the cycle that completed (0-based).
    """


@hookspec
def mlsgd_run_end(run: RunView, summary: Mapping[str, Any]) -> None:
    """Called once after training (also on an early, clean stop: time budget, divergence).

    :param run: the run at its end (``run.stop_reason`` says why it stopped early, or None).
    :param summary: the run summary, read-only: what ``summary.json`` holds (final train,
        validation and test accuracy and loss, times, cycles, thresholds reached, …).
    """
