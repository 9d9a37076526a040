"""Marking the callables a hierarchy file may name as ``factory`` (``family = "import"``).

A hierarchy file is data; naming ``"numpy:savetxt"`` or ``"torch:save"`` with chosen ``kwargs``
would turn it into a program that writes files. So the ``import`` family calls only callables
that their author marked as model factories, and checks the mark before calling anything:

* ``@mlsgd_dsl.model_factory`` on a function, a class (an ``nn.Module`` subclass is its own
  factory) or a ``classmethod`` (above or below ``@classmethod``);
* or an entry point in the group ``mlsgd_dsl.model_factories`` whose value is exactly the
  factory string (``name = "package.module:callable"``), for a package that ships factories
  it cannot or does not want to decorate.

The mark is set on the object itself (``__dict__``), so a subclass of a marked class is not
marked unless decorated too. This module imports nothing heavy: ``nets.py`` files import it
at the top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

MARK = "__mlsgd_model_factory__"
ENTRY_POINT_GROUP = "mlsgd_dsl.model_factories"

F = TypeVar("F", bound=Callable[..., Any])


def model_factory(fn: F) -> F:
    """Mark ``fn`` as a model factory that hierarchy files may name (returns ``fn`` itself)."""
    target = fn.__func__ if isinstance(fn, classmethod | staticmethod) else fn
    try:
        setattr(target, MARK, True)
    except (AttributeError, TypeError):  # a builtin or slotted object cannot carry the mark
        raise TypeError(f"@model_factory cannot mark {fn!r}; wrap it in a function of your "
                        "own and decorate that") from None
    return fn


def is_marked(obj: Any) -> bool:
    """Whether ``obj`` (a function, class or bound method) carries the mark itself."""
    target = getattr(obj, "__func__", obj)  # a bound classmethod → its function
    try:
        return vars(target).get(MARK) is True
    except TypeError:  # no __dict__: builtins, C functions
        return False


def listed_in_entry_points(factory: str) -> bool:
    """Whether an installed distribution lists ``factory`` in :data:`ENTRY_POINT_GROUP`."""
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # broken metadata of an unrelated distribution: nothing is listed
        return False
    return any(ep.value.replace(" ", "") == factory for ep in eps)
