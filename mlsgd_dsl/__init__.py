"""mlsgd-dsl: declarative multilevel SGD hierarchies.

>>> import mlsgd_dsl
>>> h = mlsgd_dsl.load("hierarchies/quickstart.toml", overrides={"mlsgd.cycles": 2})
>>> c = mlsgd_dsl.compile(h)
>>> report = mlsgd_dsl.validate(c)

The heavy parts (torch, pydantic) are imported on first use of a name that needs them, so
``import mlsgd_dsl`` is quick, ``nets.py`` files can import :func:`model_factory` cheaply, and
the command line catches a Ctrl-C at any moment of its start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, UserError
from .factories import model_factory

__version__ = "0.1.0"

#: public name → module that defines it (imported on first access)
_LAZY = {
    "API_VERSION": ".api",
    "Compiled": ".compiler",
    "compile": ".compiler",
    "load": ".loader",
    "loads": ".loader",
    "Report": ".validation",
    "validate": ".validation",
    "load_model": ".handover",
}

if TYPE_CHECKING:  # pragma: no cover
    from .api import API_VERSION
    from .compiler import Compiled, compile
    from .handover import load_model
    from .loader import load, loads
    from .validation import Report, validate


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def run(compiled: Compiled, **kwargs: Any) -> dict[str, Any]:
    """Train a compiled hierarchy; see :func:`mlsgd_dsl.runner.run.run`."""
    from .runner.run import run as _run

    return _run(compiled, **kwargs)


__all__ = ["API_VERSION", "Compiled", "ConfigError", "Report", "UserError", "__version__",
           "compile", "load", "load_model", "loads", "model_factory", "run", "validate"]
