"""What each plugin callable must return, checked where the value enters the core.

One function per entry point of the plugin API. Each returns ``None`` when the value is of the
promised kind, else the reason in a few words; the caller prefixes the plugin and the key path
of the file (:class:`~mlsgd_dsl.errors.PluginFailure`, exit code 2). The compiler, ``validate``
and :mod:`mlsgd_dsl.testing` use the same functions, so a plugin's own tests and a user's
``validate`` refuse the same values.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .api import GroupOperator, RawData

#: Methods the runner calls on the object a correction strategy's ``create`` returns.
STRATEGY_METHODS = ("needs_fine_gradient", "level_gradient", "prepare", "describe")


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def operator_problem(value: Any) -> str | None:
    """A rule's ``bind`` must return a :class:`~mlsgd_dsl.api.GroupOperator`."""
    if not isinstance(value, GroupOperator):
        return f"bind returned {_kind(value)}, not a GroupOperator"
    if not hasattr(value, "spec"):
        return "bind returned a GroupOperator whose __init__ did not set spec (call " \
               "super().__init__(spec))"
    return None


def module_problem(value: Any) -> str | None:
    """A family's ``build`` must return a :class:`torch.nn.Module`."""
    if not isinstance(value, nn.Module):
        return f"build returned {_kind(value)}, not a torch.nn.Module"
    return None


def strategy_problem(value: Any) -> str | None:
    """A strategy's ``create`` must return an object with the correction methods."""
    if value is None:
        return "create returned None, not a correction strategy"
    missing = [m for m in STRATEGY_METHODS if not callable(getattr(value, m, None))]
    if missing:
        return (f"create returned {_kind(value)}, which lacks {', '.join(missing)} (a "
                "correction strategy subclasses mlsgd_dsl.runner.corrections.Correction)")
    return None


def raw_data_problem(value: Any, shape: tuple[int, int, int, int] | None = None) -> str | None:
    """A data source's ``load`` must return :class:`~mlsgd_dsl.api.RawData` of its ``shape``."""
    if not isinstance(value, RawData):
        return f"load returned {_kind(value)}, not mlsgd_dsl.api.RawData"
    for split in ("train", "test"):
        x, y = getattr(value, f"{split}_x"), getattr(value, f"{split}_y")
        if not isinstance(x, Tensor) or x.dim() != 4:
            return f"load returned {split}_x of {_describe(x)}, expected an (N, C, H, W) tensor"
        if not isinstance(y, Tensor) or y.dim() != 1 or len(y) != len(x):
            return (f"load returned {split}_y of {_describe(y)}, expected {len(x)} labels "
                    "(one per image)")
        if shape is not None and tuple(x.shape[1:]) != tuple(shape[:3]):
            return (f"load returned {split} images of shape {tuple(x.shape[1:])}, but shape() "
                    f"promised {tuple(shape[:3])}")
    if shape is not None and int(value.num_classes) != int(shape[3]):
        return (f"load returned num_classes = {value.num_classes}, but shape() promised "
                f"{shape[3]}")
    return None


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    return f"type {_kind(value)}"
