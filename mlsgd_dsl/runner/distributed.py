"""torch.distributed for the runner: one process group, data shards, all-reduce helpers.

``torchrun --nproc-per-node N -m mlsgd_dsl run FILE`` starts N copies of the run with the
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous address).
:func:`setup` joins the process group they describe when ``WORLD_SIZE > 1`` — NCCL when the
run's device is a GPU, gloo on CPUs — and nothing else changes for a single process.

What the runner does with it (see ``docs/scaling.md``):

* every level's model is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`
  (:func:`wrap`) for the training steps: each rank takes its slice (:func:`shard_slice`) of
  every *global* batch of ``batch_size`` images and DDP averages the gradients during
  ``backward``; the rank's loss is weighted by ``slice / (batch / world)`` so the average is the
  gradient of the global batch's mean loss even when ``batch_size`` is not a multiple of the
  world size. Every rank draws the same permutations and augmentations (same seeded
  generator), so the union of the slices is exactly the single-process batch;
* full-gradient passes (corrections, angle condition, early termination) split their chunks
  round-robin over the ranks and all-reduce the sum (:func:`all_reduce_`);
* evaluation splits the data into contiguous shards and all-reduces sums;
* BatchNorm normalises with the statistics of the global batch, as in one process: on GPUs
  the models are converted to :class:`~torch.nn.SyncBatchNorm`; PyTorch's SyncBatchNorm
  refuses CPU tensors, so on CPUs they get :class:`GlobalBatchNorm` (two all-reduces per
  layer and step, with gradients). Running statistics are then the same on every rank.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import RunError


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def requested_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when unset or malformed)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes the run folder and shows the progress bar."""
    return rank() == 0


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0") or 0)
    except ValueError:
        return 0


def device_for_rank(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` means this process' GPU ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and requested_world_size() > 1:
        index = local_rank()
        if index >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK {index} has no GPU: this machine has "
                           f"{torch.cuda.device_count()}; start at most that many processes "
                           "per node (torchrun --nproc-per-node)")
        device = torch.device("cuda", index)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def setup(device: torch.device) -> bool:
    """Join torchrun's process group when ``WORLD_SIZE > 1``; True when this call created it
    (the caller then destroys it with :func:`teardown`)."""
    if requested_world_size() <= 1:
        return False
    dist = _dist()
    if not dist.is_available():
        raise RunError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        if device.type == "cuda":
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    except (ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(f"cannot join the process group ({backend}): {first}; start the run "
                       "with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and "
                       "MASTER_PORT") from None
    return True


def teardown(created: bool) -> None:
    if created and initialized():
        _dist().destroy_process_group()


# --------------------------------------------------------------------------- shards


def shard_slice(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of ``n`` items: sizes differ by at most one."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return slice(r * n // w, (r + 1) * n // w)


# --------------------------------------------------------------------------- collectives


def _comm_device(tensor: Tensor | None = None) -> torch.device:
    if tensor is not None:
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device()) \
        if _dist().get_backend() == "nccl" else torch.device("cpu")


def all_reduce_(tensors: Sequence[Tensor], *, mean: bool = False) -> None:
    """Sum (or average) a list of tensors over the ranks, in place, in one collective."""
    if not active() or not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    tensors = list(tensors)
    flat = _flatten_dense_tensors([t.detach() for t in tensors])
    _dist().all_reduce(flat)
    if mean:
        flat /= world_size()
    with torch.no_grad():
        for t, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.copy_(value)


def all_reduce_floats(values: Sequence[float | Tensor], like: Tensor | None = None
                      ) -> list[float]:
    """Sum numbers (or 0-d tensors) over the ranks in float64; one collective, one sync."""
    parts = [v.detach().to(torch.float64).reshape(()) if isinstance(v, Tensor)
             else torch.tensor(float(v), dtype=torch.float64) for v in values]
    if not active():
        return [float(p) for p in parts]
    device = _comm_device(like)
    buf = torch.stack([p.to(device) for p in parts])
    _dist().all_reduce(buf)
    return [float(x) for x in buf.cpu()]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on one (a decision all ranks must share)."""
    if not active():
        return flag
    buf = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    _dist().all_reduce(buf, op=_dist().ReduceOp.MAX)
    return bool(buf.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (weights-only unpickling: tensors, numbers, strings,
    containers)."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0, weights_only=True)
    return box[0]


# --------------------------------------------------------------------------- models


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module the training steps call: DDP when distributed, else ``model`` itself.

    Buffers are synchronised once, at construction; afterwards BatchNorm's running statistics
    agree on all ranks by construction (global batch statistics, see :func:`prepare_model`).
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **_no_buffer_broadcast())


def _no_buffer_broadcast() -> dict[str, bool]:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params \
        else {"broadcast_buffers": False}


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm with the global batch's statistics: SyncBatchNorm on GPUs,
    :class:`GlobalBatchNorm` on CPUs (PyTorch's SyncBatchNorm refuses CPU tensors).

    The conversion keeps the parameter and buffer tensors (same objects, same names)."""
    if not active() or not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlobalBatchNorm.convert(model)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with a gradient: the backward pass sums the incoming gradients too."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        _dist().all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _SumOverRanks.apply(grad)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm normalising with the statistics of the whole global batch (every rank's
    slice), with gradients through them — what SyncBatchNorm does on GPUs, for gloo/CPU.

    Training mode under a process group: one all-reduce for the mean, one for the variance
    (two passes, as numerically careful as one process' BatchNorm), each summed again in the
    backward pass. Eval mode, a single process, and :func:`local_batchnorm` blocks: plain
    BatchNorm."""

    synchronise = True

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and self.synchronise and active()):
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        local = input.sum(dims)
        count = torch.tensor([input.numel() / max(channels, 1)], dtype=local.dtype,
                             device=local.device)
        totals = _SumOverRanks.apply(torch.cat([local, count]))
        n = float(totals[-1].detach())
        mean = totals[:channels] / n
        centred = input - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n  # biased, as BatchNorm
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                    else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm layer (not SyncBatchNorm) by one sharing its tensors."""
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, (cls, nn.SyncBatchNorm)):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child))
        return out


@contextlib.contextmanager
def local_batchnorm(model: nn.Module | None) -> Iterator[None]:
    """BatchNorm layers use this rank's statistics inside the block.

    For passes whose chunks are not the same on every rank (full gradients split round-robin,
    BatchNorm re-estimation on the same images everywhere): a synchronised forward there would
    mix unrelated chunks, or wait for a rank that has no chunk."""
    modules = list(model.modules()) if model is not None else []
    synced = [m for m in modules if isinstance(m, nn.SyncBatchNorm)]
    own = [m for m in modules if isinstance(m, GlobalBatchNorm)]
    for m in synced:
        m.forward = types.MethodType(_BatchNorm.forward, m)
    for m in own:
        m.synchronise = False
    try:
        yield
    finally:
        for m in synced:
            del m.forward
        for m in own:
            del m.synchronise  # back to the class default
