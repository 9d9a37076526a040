"""Built-in gradient-correction strategies, registered through pluggy like any plugin.

``[mlsgd] correction = "none" | "deterministic" | "stochastic"`` or a table::

    [mlsgd.correction]
    strategy = "stochastic"
    fraction = 0.03125
    variance_reduction = true
"""

from __future__ import annotations

from ..api import CorrectionStrategy
from ..hookspecs import hookimpl
from ..runner.corrections import (
    DeterministicOptions,
    NoneOptions,
    StochasticOptions,
    create_deterministic,
    create_none,
    create_stochastic,
)

MLSGD_DSL_API = ">=1.0"


@hookimpl
def mlsgd_corrections() -> list[CorrectionStrategy]:
    return [
        CorrectionStrategy(
            name="none", options=NoneOptions, create=create_none,
            description="No correction: each level minimises its own F_l (thesis 4.2/4.3 "
                        "baseline MLSGD)."),
        CorrectionStrategy(
            name="deterministic", options=DeterministicOptions, create=create_deterministic,
            description="First-order coherent correction with full gradients of every level "
                        "(thesis 3.2.2, 3.3.2); variance_reduction = true: SVRG-type steps "
                        "(3.3.3)."),
        CorrectionStrategy(
            name="stochastic", options=StochasticOptions, create=create_stochastic,
            description="Correction with gradients estimated on a sampled fraction of the data "
                        "(thesis 3.3.4, default 3.125 %); variance_reduction = true: (3.21) "
                        "(3.3.5)."),
    ]
