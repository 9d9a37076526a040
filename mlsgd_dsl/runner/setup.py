"""Building a run from a compiled hierarchy: device, checks, the levels with their first
weights and data. Nothing here changes process-wide state; the trainer calls it inside its
:class:`~mlsgd_dsl.runner.process.RunProcess`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from . import distributed
from .level import Augment, Level


def select_device(requested: str | None, configured: str) -> torch.device:
    choice = requested or configured or "auto"
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available",
                          path=("mlsgd", "device"))
    return torch.device(choice)


def resolved_config(c: Any) -> dict[str, Any]:
    resolved = getattr(c, "resolved", None)
    if callable(resolved):
        return resolved()
    return c.hierarchy.model_dump(mode="json")


def config_hash(c: Any) -> str:
    fn = getattr(c, "config_hash", None)
    if callable(fn):
        return str(fn())
    text = json.dumps(resolved_config(c), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def validate_or_raise(c: Any) -> None:
    """Run ``mlsgd-dsl validate``'s checks; a failure is one :class:`ConfigError`."""
    from ..validation import validate as run_checks

    report = run_checks(c)
    if not report.ok:
        failed = [r for r in report.rows if r.status == "fail"]
        text = "; ".join(f"{r.name}: {r.detail}" for r in failed[:5])
        raise ConfigError(f"the hierarchy fails validation ({len(failed)} check(s)): "
                          f"{text}", file=getattr(c, "file", None))


def trained_levels(c: Any, sgd: bool) -> list[str]:
    """The levels some cycle visits (sgd: the finest alone), coarsest first per path."""
    if sgd:
        return [c.finest]
    used: list[str] = []
    for k in range(max(1, len(getattr(c, "paths", [None])))):
        for name in c.path(k):
            if name not in used:
                used.append(name)
    return used


def initial_models(c: Any, used: Sequence[str], *, independent: bool) -> dict[str, nn.Module]:
    """Fresh models: nested (default) — every level that has a coarser neighbour starts from
    the prolongated (full state dict, buffers too) initial weights of that neighbour, so along
    a chain all start from ``P…P w_0`` of the coarsest; ``independent`` — each level's own
    initialisation (also the SGD baseline: a plain network)."""
    if independent:
        return {name: c.model(name) for name in used}
    models: dict[str, nn.Module] = {}
    graph = c.graph
    for name in c.levels:  # coarsest first: predecessors are done before their successors
        models[name] = c.model(name)
        preds = [p for p in c.levels if graph.has_edge(p, name)]
        if preds:
            with torch.no_grad():
                sd = c.transfer(preds[0], name).prolongate(models[preds[0]].state_dict())
            models[name].load_state_dict(sd)
    return {n: models[n] for n in used}


def build_levels(c: Any, used: Sequence[str], device: torch.device, *, sgd: bool
                 ) -> dict[str, Level]:
    """The trained levels on ``device``: model (DDP-wrapped under torchrun), data, settings."""
    spec, h = c.hierarchy.mlsgd, c.hierarchy
    data = c.data(device)
    models = initial_models(c, used, independent=spec.init == "independent" or sgd)
    aug, obj = h.data.augment, spec.objective
    levels: dict[str, Level] = {}
    for name in used:
        model = distributed.prepare_model(models[name].to(device), device)
        splits = data[name]
        fill = splits.black() if hasattr(splits, "black") else 0.0
        levels[name] = Level(
            name, model, splits, h=c.h(name),
            lr=c.for_level(spec.lr, name),
            batch_size=c.for_level(spec.batch_size, name),
            epochs=c.for_level(spec.epochs, name),
            pass_epochs=(None if spec.cascade_epochs is None
                         else c.for_level(spec.cascade_epochs, name)),
            optimizer=c.for_level(spec.optimizer, name),
            l2=obj.l2, smoothness=obj.smoothness, device=device,
            augment=Augment(flip=aug.flip, crop=aug.crop, fill=fill))
        levels[name].train_model = distributed.wrap(model, device)
        levels[name].accelerate(compile=c.for_level(spec.compile, name),
                                channels_last=c.for_level(spec.channels_last, name))
    if any(lv.compiled for lv in levels.values()):
        # the levels share their network class's forward: dynamo counts each level's graph
        # (and the planner's copy of it) against that code object's recompile limit, beyond
        # which it silently runs eagerly
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 8 + 2 * len(levels))
    world = distributed.world_size()
    small = [n for n, lv in levels.items() if min(lv.batch_size, len(lv.data.train_x)) < world]
    if small:  # a rank without images in a batch has no loss to differentiate
        raise ConfigError(f"the batches of level(s) {', '.join(small)} are smaller than "
                          f"the {world} processes that share them",
                          path=("mlsgd", "batch_size"))
    return levels
