"""BatchNorm statistics re-estimation: after a prolongation and before every evaluation.

Right after a coarse step is prolongated, the running statistics of the level's BatchNorm
layers belong to the weights before the step; evaluated with them, the finest network of the
Fashion-MNIST depth hierarchy scored at chance (validation 0.14), re-estimated on 2 000 training
images 0.57 (2-core CPU; ``mlsgd.bn_recalibration = 0`` against the default shows it).
:func:`recalibrate` resets them and re-estimates them on a number of training images: forward
passes in train mode without gradients, with ``momentum=None`` (PyTorch's cumulative average,
so every batch weighs the same). No augmentation is applied to these images.

The same goes for a short fine visit at a high step: the running averages (momentum 0.1 over
the last few dozen batches) then lag weights that moved fast. On Fashion-MNIST (depth
hierarchy, half-epoch fine visits, momentum 0.9, cosine step from 0.05) a run reported a final
validation accuracy of 0.135 with the running statistics; the same weights scored 0.717 with
statistics re-estimated on 2 000 training images (5 000 gave the same). So the runner
re-estimates them before every evaluation of weights that changed since the last estimate
(``mlsgd.eval.recalibrate``); ``python -m mlsgd_dsl.runner.bn RUN_DIR`` re-measures the gap on
a run folder's checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorms(model))


@torch.no_grad()
def recalibrate(model: nn.Module, x: Tensor, *, images: int, batch_size: int,
                generator: torch.Generator | None = None,
                shard: tuple[int, int] = (0, 1),
                reduce: Callable[[list[Tensor]], None] | None = None) -> bool:
    """Re-estimate the running statistics on ``images`` random images of ``x``.

    Distributed (``shard = (rank, world)``, ``reduce`` summing tensors over the ranks in
    place): every rank draws the same images (same ``generator`` state) and passes every
    ``world``-th batch of them; the per-rank averages, weighted by their batch counts, are
    then combined, so every rank ends with the statistics one process computes (up to the
    order of the additions) at 1/``world`` of the cost.

    Returns False (and changes nothing) when the model has no BatchNorm or ``images`` is 0.
    """
    layers = batchnorms(model)
    if not layers or images <= 0 or len(x) == 0:
        return False
    n = min(int(images), len(x))
    device = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randperm(len(x), generator=generator, device=device)[:n].to(x.device)
    step = max(2, int(batch_size))
    batches = [idx[i:i + step] for i in range(0, n, step)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()  # a single image gives no variance
    rank, world = shard
    momenta = [m.momentum for m in layers]
    was_training = model.training
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches below
        model.train()
        for chunk in batches[rank::world]:
            model(x[chunk])
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    if reduce is not None and world > 1:
        _combine(layers, reduce)
    return True


def _combine(layers: list[_BatchNorm], reduce: Callable[[list[Tensor]], None]) -> None:
    """Batch-count-weighted average of the ranks' cumulative averages (sums over ranks)."""
    stats = [t for m in layers for t in (m.running_mean, m.running_var) if t is not None]
    counts = [m.num_batches_tracked for m in layers]
    weights = [c.to(stats[0].dtype).reshape(()) for m, c in zip(layers, counts)
               for t in (m.running_mean, m.running_var) if t is not None]
    for t, w in zip(stats, weights):
        t.mul_(w)
    total = torch.stack([c.to(stats[0].dtype).reshape(()) for c in counts])
    reduce([*stats, total])
    it = iter(total.tolist())
    for m in layers:
        batches = max(next(it), 1.0)
        for t in (m.running_mean, m.running_var):
            if t is not None:
                t.div_(batches)
        m.num_batches_tracked.fill_(int(batches))
