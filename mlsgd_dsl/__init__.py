"""mlsgd-dsl: declarative multilevel SGD hierarchies.

>>> import mlsgd_dsl
>>> h = mlsgd_dsl.load("hierarchies/quickstart.toml", overrides={"mlsgd.cycles": 2})
>>> c = mlsgd_dsl.compile(h)
>>> report = mlsgd_dsl.validate(c)
"""

from .api import API_VERSION
from .compiler import Compiled, compile
from .errors import ConfigError, UserError
from .handover import load_model
from .loader import load, loads
from .validation import Report, validate

__version__ = "0.1.0"


def run(compiled: Compiled, **kwargs):  # noqa: ANN201 - documented in runner.run
    """Train a compiled hierarchy; see :func:`mlsgd_dsl.runner.run.run`."""
    from .runner.run import run as _run

    return _run(compiled, **kwargs)


__all__ = ["API_VERSION", "Compiled", "ConfigError", "Report", "UserError", "__version__",
           "compile", "load", "load_model", "loads", "run", "validate"]
