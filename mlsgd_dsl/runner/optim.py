"""The optimisers of a level (``mlsgd.optimizer``) and their first moment, which
``optimizer_state = "transfer"`` carries between levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..schema import OptimizerSpec


def make_optimizer(params: Sequence[Tensor], spec: OptimizerSpec, lr: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """SGD (± momentum, Nesterov), Adam or AdamW from ``mlsgd.optimizer`` for one level."""
    foreach = True  # grouped kernels on CPU too (the default picks them on CUDA only)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum,
                               nesterov=spec.nesterov and spec.momentum > 0,
                               weight_decay=spec.weight_decay, foreach=foreach)
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(spec.betas), eps=spec.eps,
               weight_decay=spec.weight_decay, foreach=foreach)


def first_moment_key(optimizer: torch.optim.Optimizer) -> str:
    return "momentum_buffer" if isinstance(optimizer, torch.optim.SGD) else "exp_avg"


def get_first_moment(optimizer: torch.optim.Optimizer,
                     params: Sequence[Tensor]) -> list[Tensor] | None:
    """The first moment (SGD momentum buffer / Adam exp_avg) per parameter, or None."""
    key = first_moment_key(optimizer)
    out = []
    for p in params:
        value = optimizer.state.get(p, {}).get(key)
        if value is None:
            return None
        out.append(value)
    return out


def set_first_moment(optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                     values: Sequence[Tensor]) -> bool:
    """Overwrite the first moment. SGD: creates the buffer; Adam: only where a state exists
    (a fresh Adam state has no second moment to go with it). Returns whether it was set."""
    key = first_moment_key(optimizer)
    if isinstance(optimizer, torch.optim.SGD):
        if not optimizer.defaults.get("momentum"):
            return False
        for p, v in zip(params, values):
            optimizer.state[p][key] = v.detach().clone()
        return True
    if any(key not in optimizer.state.get(p, {}) for p in params):
        return False
    for p, v in zip(params, values):
        optimizer.state[p][key].copy_(v)
    return True
