"""The entry-point module of mlsgd-width: hook implementations mlsgd-dsl calls once."""

from __future__ import annotations

from mlsgd_dsl.api import Architecture, Check, TransferRule
from mlsgd_dsl.hookspecs import hookimpl

from . import checks, model, transfer

#: The plugin API this plugin is written against (checked by mlsgd-dsl when it loads).
MLSGD_DSL_API = ">=1.0"


@hookimpl
def mlsgd_transfer_rules() -> list[TransferRule]:
    return [transfer.RULE]


@hookimpl
def mlsgd_architectures() -> list[Architecture]:
    return [model.ARCHITECTURE]


@hookimpl
def mlsgd_checks() -> list[Check]:
    return [checks.CHECK]
