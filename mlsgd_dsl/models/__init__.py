"""Built-in architecture families."""

from __future__ import annotations

import math

from ..api import ModelContext


def residual_step(h: float | None, context: ModelContext) -> float:
    """The step of a family's residual branches: its option ``h``, else the level's ``h``."""
    step = h if h is not None else context.h
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"the residual step h must be positive, got {step}")
    return step
