"""Built-in architecture families, registered through pluggy like any third-party plugin."""

from __future__ import annotations

from ..api import Architecture
from ..hookspecs import hookimpl
from ..models import imported, resnet, ruthotto, vit

MLSGD_DSL_API = ">=1.0"


@hookimpl
def mlsgd_architectures() -> list[Architecture]:
    return [ruthotto.ARCHITECTURE, vit.ARCHITECTURE, resnet.ARCHITECTURE,
            imported.ARCHITECTURE]
