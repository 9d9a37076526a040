"""``width.exactness``: a validation check this plugin adds to ``mlsgd-dsl validate``.

The built-in function-preservation row compares freshly initialised networks, whose BatchNorm
statistics are still the identity (mean 0, variance 1), and passes any gap below 1. For every
edge transferred by ``width.net2wider`` alone, this check is stricter: random weights *and*
BatchNorm statistics, float64, eval and train mode, and it warns when the gap is above round-off
— i.e. when the architecture is one the rule cannot widen exactly (``ruthotto-resnet``).
"""

from __future__ import annotations

from typing import Any

import torch
from mlsgd_dsl.api import Check, CheckRow

from .transfer import RULE_NAME

TOLERANCE = 1e-9


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype))
            else:
                t.copy_(0.5 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def _gap(compiled: Any, coarse: str, fine: str, gen: torch.Generator) -> float:
    edge = compiled.edge(coarse, fine)
    cm, fm = compiled.model(coarse).double(), compiled.model(fine).double()
    _randomize(cm, gen)
    fm.load_state_dict(edge.prolongate(cm.state_dict()))
    x = torch.randn(4, *compiled.nodes[coarse].input_shape, generator=gen, dtype=torch.float64)
    worst = 0.0
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(cm, mode)(), getattr(fm, mode)()
            yc, yf = cm(x), fm(x)
            worst = max(worst, float((yf - yc).norm() / max(float(yc.norm()), 1e-300)))
    return worst


def run(compiled: Any) -> list[CheckRow]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for coarse, fine in compiled.graph.edges:
        edge = compiled.edge(coarse, fine)
        if not edge.full or any(g.rule != RULE_NAME for g in edge.full):
            continue  # only edges this rule transfers alone
        name = f"{coarse}->{fine}: width exactness"
        if compiled.nodes[coarse].input_shape != compiled.nodes[fine].input_shape:
            rows.append(CheckRow(name, "warn", f"{RULE_NAME} keeps the image size, but the "
                                 "levels' inputs differ"))
            continue
        family = compiled.nodes[fine].family.record.name
        try:
            gap = _gap(compiled, coarse, fine, gen)
        except Exception as exc:  # noqa: BLE001 - reported as a row
            rows.append(CheckRow(name, "fail", f"plugin width: {type(exc).__name__}: {exc}"))
            continue
        if gap < TOLERANCE:
            rows.append(CheckRow(name, "pass", f"gap {gap:.1e} with random weights and "
                                 "BatchNorm statistics (eval and train mode)"))
        else:
            rows.append(CheckRow(name, "warn", f"gap {gap:.1e}: {RULE_NAME} does not widen "
                                 f"family {family!r} exactly (supported: width-cnn and "
                                 "Conv2d/Linear/BatchNorm networks with per-channel "
                                 "activations)"))
    return rows


CHECK = Check(name="width.exactness", run=run,
              description="Function preservation of width.net2wider edges with random "
                          "weights and BatchNorm statistics; warns above round-off.")
