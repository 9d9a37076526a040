"""Tiny models and hierarchies for the runner and correction tests (imported by the tests and
by the ``import`` architecture family through ``factory = "_runner_nets:ResMLP"``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlsgd_dsl import model_factory

TESTS = Path(__file__).resolve().parent


@model_factory
class ResMLP(nn.Module):
    """``x ↦ out(z_n)``, ``z_{i+1} = z_i + h·tanh(W_i z_i + b_i)``, ``z_0 = inp(flatten x)``.

    Parameter names ``layers.{i}.weight``/``bias`` suit the ``depth.constant`` rule; the rest
    moves with ``identity``. ``batchnorm`` adds a BatchNorm1d after the input layer.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, h: float,
                 width: int = 6, layers: int = 2, batchnorm: bool = False) -> None:
        super().__init__()
        self.h = float(h)
        self.inp = nn.Linear(in_channels * image_size * image_size, width)
        self.bn = nn.BatchNorm1d(width) if batchnorm else None
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = self.inp(x.flatten(1))
        if self.bn is not None:
            z = self.bn(z)
        for layer in self.layers:
            z = z + self.h * torch.tanh(layer(z))
        return self.out(z)

    def smoothness(self) -> Tensor:
        terms = [torch.linalg.vector_norm(b.weight - a.weight)
                 for a, b in zip(self.layers, self.layers[1:])]
        return torch.stack(terms).sum() if terms else self.out.weight.new_zeros(())


LEVELS3 = (("fine", 1.0, 4), ("mid", 2.0, 2), ("coarse", 4.0, 1))


def hierarchy_text(levels: tuple = LEVELS3, *, batchnorm: bool = False, train: int = 96,
                   width: int = 6, augment: bool = False) -> str:
    lines = [
        'name = "tiny"',
        "[data]",
        'source = "synthetic"',
        f"options = {{ train = {train + 32}, test = 32, size = 8, channels = 1, classes = 4 }}",
        "validation = 32",
        f"augment = {{ flip = {str(augment).lower()}, crop = {0.125 if augment else 0.0} }}",
        "[model]",
        'family = "import"',
        'factory = "_runner_nets:ResMLP"',
        f"search_path = [{str(TESTS)!r}]".replace("'", '"'),
        f"kwargs = {{ width = {width}, batchnorm = {str(batchnorm).lower()} }}",
    ]
    for name, h, layers in levels:
        lines += [f"[levels.{name}]", f"h = {h}", f"model = {{ kwargs = {{ layers = {layers} }} }}"]
    lines += ["[transfer]", 'default = "identity"', 'rules = { "layers.*" = "depth.constant" }',
              "[mlsgd]", "batch_size = 32", "lr = 0.1", "bn_recalibration = 64",
              "full_batch_size = 40", "threads = 1", "[mlsgd.objective]", "l2 = 0.01",
              "smoothness = 0.01", "[report]", "plot = false"]
    return "\n".join(lines) + "\n"


def compiled(overrides: dict[str, Any] | None = None, **kw: Any) -> Any:
    import mlsgd_dsl

    h = mlsgd_dsl.loads(hierarchy_text(**kw), file="tiny.toml", overrides=overrides or {})
    return mlsgd_dsl.compile(h)


def trainer(out_dir: Path, overrides: dict[str, Any] | None = None, *, double: bool = False,
            **kw: Any) -> Any:
    from mlsgd_dsl.runner.run import Trainer

    t = Trainer(compiled(overrides, **kw), out_dir=out_dir, quiet=True, validate=False)
    if double:
        to_double(t)
    return t


def to_double(t: Any) -> None:
    """Every level's model and data in float64 (parameters keep their identity)."""
    for lv in t.levels.values():
        lv.model.double()
        d = lv.data
        lv.data = dataclasses.replace(d, train_x=d.train_x.double(), val_x=d.val_x.double(),
                                      test_x=d.test_x.double())
    for lv in t.levels.values():
        lv.augment = dataclasses.replace(lv.augment, fill=0.0)
