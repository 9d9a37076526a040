"""Built-in gradient-correction strategies, registered through pluggy like any plugin.

``[mlsgd] correction = "none" | "deterministic" | "stochastic"`` or a table::

    [mlsgd.correction]
    strategy = "stochastic"
    fraction = 0.03125
    variance_reduction = true

``delayed`` starts uncorrected and switches an inner strategy on later (thesis 4.4)::

    [mlsgd.correction]
    strategy = "delayed"
    inner = "stochastic"
    after_cycle = 6
    gradient_norm_below = 0.05
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
from ..runner.delayed import DelayedOptions, create_delayed

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
        CorrectionStrategy(
            name="delayed", options=DelayedOptions, create=create_delayed,
            description="Starts uncorrected and switches the deterministic or stochastic "
                        "correction on after a cycle, when ||P* grad F_L|| falls below a "
                        "threshold or when the angle of the prolongated coarse step to "
                        "-grad F_L falls below a bound (thesis 4.4); records the switch in "
                        "the metrics."),
    ]
