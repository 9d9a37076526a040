"""The level objectives F_l and H_l of the thesis, in Euclidean coordinates.

``F_l(w) = CE(w) + l2·Σ‖W‖² + s·smoothness(w)`` (thesis 4.1.2): cross entropy (mean over the
batch), the ℓ2 term on the non-bias weights (the parameters with ``ndim > 1``) and, when the
model has a ``smoothness()`` method, the smoothness penalty on consecutive residual kernels.

PyTorch computes Euclidean gradients ``∇F``. With the level inner product
``⟨·,·⟩_l = h_l⟨·,·⟩`` the level gradient is ``∇_l F = ∇F / h_l``, and the Euclidean gradient of

    H_l(w) = F_l(w) + ⟨P*_{l+1}∇_{l+1}H_{l+1}(w_{l+1}) − ∇_l F_l(R w_{l+1}), w⟩_l
             + λ/2 ‖w − R w_{l+1}‖²_l                                    (thesis (3.2))

is ``∇F_l(w) + Pᵀ∇H_{l+1}(w_{l+1}) − ∇F_l(R w_{l+1}) + λ h_l (w − R w_{l+1})`` — the first term
from autograd, the rest a constant vector plus ``λ h_l w`` added after ``backward`` (see
:mod:`mlsgd_dsl.runner.corrections`). All gradient lists here are aligned with
``Objective.names`` (the names of ``model.named_parameters()``), the same names the transfer
operators take when given "parameters only".

The ℓ2 gradient ``2·l2·W`` is added with one ``torch._foreach_add_`` after ``backward`` rather
than through autograd: same gradient, less graph. The loss value logged per epoch is the cross
entropy (the data term); :meth:`Objective.regularizer` gives the rest when it is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class Objective:
    """F_l for one level's model: loss for autograd, regulariser gradients, full gradients."""

    def __init__(self, model: nn.Module, *, l2: float, smoothness: float) -> None:
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names: list[str] = [n for n, _ in named]
        self.params: list[Tensor] = [p for _, p in named]
        self.l2 = float(l2)
        self.smoothness = float(smoothness) if callable(getattr(model, "smoothness", None)) \
            else 0.0
        self.l2_index = [i for i, p in enumerate(self.params) if p.ndim > 1]
        self.l2_params = [self.params[i] for i in self.l2_index]

    # ------------------------------------------------------------------ per step

    def loss(self, out: Tensor, y: Tensor, model: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """(value for ``backward``, cross entropy) of one batch; ℓ2 is added to the gradient."""
        ce = F.cross_entropy(out, y)
        if self.smoothness:
            return ce + self.smoothness * (model or self.model).smoothness(), ce
        return ce, ce

    @torch.no_grad()  # a gradient update, not part of any graph
    def add_l2_gradient(self, grads: Sequence[Tensor], params: Sequence[Tensor] | None = None,
                        *, scale: float = 1.0) -> None:
        """``grads += scale · 2·l2·W`` on the non-bias weights (in place)."""
        if not self.l2 or not self.l2_index:
            return
        src = self.l2_params if params is None else [params[i] for i in self.l2_index]
        torch._foreach_add_([grads[i] for i in self.l2_index], src, alpha=2.0 * self.l2 * scale)

    def regularizer(self) -> float:
        """``l2·Σ‖W‖² + s·smoothness`` at the current weights."""
        with torch.no_grad():
            value = 0.0
            if self.l2 and self.l2_params:
                value += self.l2 * float(sum(p.pow(2).sum() for p in self.l2_params))
            if self.smoothness:
                value += self.smoothness * float(self.model.smoothness())
        return value

    # ------------------------------------------------------------------ full passes

    def gradient(self, x: Tensor, y: Tensor, *, batch_size: int, indices: Tensor | None = None,
                 batchnorm: str = "batch", model: nn.Module | None = None,
                 shard: tuple[int, int] = (0, 1),
                 reduce: Callable[[list[Tensor]], None] | None = None) -> list[Tensor]:
        """Euclidean ``∇F_l`` at the current weights of ``model`` on ``x[indices]`` (all of it).

        Distributed (``shard = (rank, world)``): this process computes the chunks ``rank,
        rank + world, …`` only — the same chunks, hence the same BatchNorm statistics, as one
        process — and ``reduce`` sums the partial gradients over the ranks before the
        regularisers are added.

        The cross entropy is averaged over the whole (sub)set, computed in chunks of
        ``batch_size`` (in data order: deterministic) with no augmentation.

        ``batchnorm="batch"`` (default): BatchNorm normalises with the statistics of each chunk,
        as in the training steps, and its running statistics are restored afterwards (a
        gradient pass never changes them). This is the gradient of the function SGD actually
        descends: measured on the quickstart's coarsest level, it is within 2 % of the
        train-mode gradient with the training batch size, while the eval-mode gradient
        (``"running"``: running statistics, held constant) differs from it by ~70 % of its norm
        (it lacks the terms through the batch statistics), which breaks first-order coherence
        of a correction mixed with train-mode steps. Models without BatchNorm: no difference.
        """
        model = model or self.model
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        was_training = model.training
        eval_mode = batchnorm == "running"
        saved = [] if eval_mode else [
            (b, b.detach().clone()) for m in model.modules()
            if isinstance(m, _BatchNorm) for b in m.buffers()]
        model.train(not eval_mode)
        n = len(indices) if indices is not None else len(x)
        if n == 1 and not eval_mode and saved:
            model.eval()  # batch statistics of one image do not exist
        # chunk bounds; a last chunk of one image joins the previous one (BatchNorm again)
        bounds = list(range(0, n, batch_size)) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]
        grads = [torch.zeros_like(p) for p in params]
        rank, world = shard
        try:
            for chunk, (start, stop) in enumerate(zip(bounds, bounds[1:])):
                if chunk % world != rank:
                    continue
                if indices is not None:
                    idx = indices[start:stop]
                    xb, yb = x[idx], y[idx]
                else:
                    xb, yb = x[start:stop], y[start:stop]
                ce = F.cross_entropy(model(xb), yb, reduction="sum") / n
                parts = torch.autograd.grad(ce, params, allow_unused=True)
                for g, part in zip(grads, parts):
                    if part is not None:
                        g.add_(part)
            if reduce is not None:
                reduce(grads)
            if self.smoothness:
                value = model.smoothness()
                if value.requires_grad:  # a one-layer block has a constant 0
                    parts = torch.autograd.grad(self.smoothness * value, params,
                                                allow_unused=True)
                    for g, part in zip(grads, parts):
                        if part is not None:
                            g.add_(part)
        finally:
            model.train(was_training)
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
        self.add_l2_gradient(grads, params)
        return grads

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, *, batch_size: int,
                 model: nn.Module | None = None) -> tuple[float, float]:
        """(mean cross entropy, accuracy) in eval mode; one host sync at the end."""
        model = model or self.model
        was_training = model.training
        model.eval()
        loss = torch.zeros((), dtype=torch.float64, device=x.device)
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        try:
            for start in range(0, len(x), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                out = model(xb)
                loss += F.cross_entropy(out, yb, reduction="sum").double()
                correct += (out.argmax(1) == yb).sum()
        finally:
            model.train(was_training)
        n = max(len(x), 1)
        return float(loss) / n, float(correct) / n


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Euclidean ⟨a, b⟩ of two aligned tensor lists (float64 accumulation)."""
    if not a:
        return 0.0
    return float(sum((x.detach().double() * y.detach().double()).sum() for x, y in zip(a, b)))


def norm(a: Sequence[Tensor]) -> float:
    """Euclidean norm of a tensor list."""
    if not a:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(x.detach().double()) for x in a])))
