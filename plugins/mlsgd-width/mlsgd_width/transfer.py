"""``width.net2wider``: function-preserving widening between levels of different channel counts.

Net2WiderNet (Chen, Goodfellow & Shlens, 2016) widens a layer from ``c`` to ``c' ≥ c``
channels by *duplicating* channels and *splitting* the weights that read them, so the wider
network computes exactly the same function. As a transfer rule between a coarse level (``c``
channels in some feature space) and a fine one (``c'``):

Channel map. Fine channel ``j`` copies coarse channel ``s(j)``:

* ``mapping = "repeat"`` (default): ``s(j) = j mod c`` (``torch.Tensor.repeat``: 0,1,…,c-1,0,1,…);
* ``mapping = "interleave"``: ``s(j) = ⌊j·c/c'⌋`` (0,0,1,1,… for ``c' = 2c``).

``m_i = #{j : s(j) = i} ≥ 1`` is the number of copies of coarse channel ``i``. The map depends only
on ``(c, c')``, so every tensor that touches a feature space of width ``c → c'`` uses the same
duplication and the transfer is consistent across layers without any bookkeeping.

Each axis of a tensor has one of three roles:

* **out** (the tensor *produces* that feature space: the output axis of a conv / linear
  weight, biases, BatchNorm weight, bias, running mean and variance). ``P`` copies:
  ``(P w)[j] = w[s(j)]``.
* **in** (the tensor *reads* that feature space: the input axis of a conv / linear weight).
  ``P`` splits: ``(P w)[j] = α_j · w[s(j)]`` with ``Σ_{j: s(j)=i} α_j = 1`` — so the fine layer
  sums ``Σ_j α_j w[s(j)] x[s(j)] = w[i] x[i]`` over the copies and computes what the coarse one
  did. ``split = "uniform"`` (default) is ``α_j = 1/m_{s(j)}``; ``split = "random"`` draws
  ``α_j ∝ u_j, u_j ~ U(0.5, 1.5)`` from ``seed`` (still linear and exact; see below why).
* **fixed**: any other axis (kernel height/width, classes of the head): same size on both levels.

A tensor with both an out and an in axis (a conv weight) gets both maps; they act on different
axes and commute, so ``P = P_out ⊗ P_in`` (likewise ``R`` and ``Pᵀ``).

Restriction (a left inverse, derived per axis; ``S`` is the 0/1 matrix with ``S[j, s(j)] = 1``,
so ``Sᵀ`` sums over copies and ``SᵀS = diag(m)``):

* out: ``P = S`` ⇒ ``R = (SᵀS)⁻¹Sᵀ`` — the *average* of the copies. ``R P w = w``.
* in: ``P = diag(α) S`` ⇒ ``R = Sᵀ`` — the *sum* of the copies. ``R P w = Σ_j α_j w = w``.

For the uniform split both are the Moore–Penrose pseudo-inverse ``R = (PᵀP)⁻¹Pᵀ``: ``R w`` is the
coarse tensor whose prolongation is closest to ``w`` in the Euclidean norm.

Adjoint (closed form, no autograd): ``Pᵀ = Sᵀ`` on out axes (sum the copies) and
``Pᵀ = Sᵀ diag(α)`` on in axes (sum the copies weighted by their split); the framework forms
``P* = (h_fine/h_coarse)·Pᵀ``. Everything is ``index_select`` / ``index_add`` along one axis —
never a dense matrix.

Why ``split = "random"``: with the uniform split, two copies of a channel have identical
incoming and identical outgoing weights, hence identical gradients — SGD on the fine level can
never make them differ, and a hierarchy initialised by prolongation (``mlsgd.init = "nested"``)
trains a fine network that stays equal to the coarse one. Unequal split fractions give the
copies different outgoing weights, so their gradients differ from the first step on, while
``P`` stays linear, exact and function-preserving. (Net2WiderNet adds noise instead, which
would make ``P`` non-linear.)

Which axes are channel axes. By default the torch layout: a tensor of one dimension (bias,
BatchNorm parameters and statistics) has its axis 0 as out; a tensor of two or more dimensions
(``nn.Conv*d`` / ``nn.Linear`` weight) has axis 0 out and axis 1 in; 0-d and integer tensors
(``num_batches_tracked``) are copied. A model overrides this per tensor with its
``transfer_hints`` attribute::

    model.transfer_hints = {"fc.weight": {"width": {"out": None, "in": 1}},
                            "fc.bias":   {"width": {"out": None}}}

(``None``: the axis is fixed, its size must not change). A flattened ``(C·H·W)`` in-axis (a
linear layer on flattened feature maps) is handled when the model publishes the
``input_shape`` hint ``(C, H, W)`` the built-in ``resolution`` rule reads; ``H, W`` must agree
between the levels.

Supported architectures (function preservation exact): ``width-cnn`` (this plugin), and any
network of ``nn.Conv2d`` (``groups=1``) / ``nn.Linear`` / ``nn.BatchNorm*`` layers with
element-wise activations, per-channel pooling and residual additions — the widened network
computes the same function in eval mode *and* in train mode (a copy's batch statistics are the
original's). Not supported: ``ruthotto-resnet`` (its symmetric layer uses one kernel as ``K``
and ``Kᵀ``, and TV normalisation mixes channels — the operators are still valid linear maps,
``validate`` passes their algebraic checks, but the function-preservation gap is large),
grouped / depthwise convolutions, transposed convolutions (axes swapped; give hints),
LayerNorm / GroupNorm across channels, attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from mlsgd_dsl.api import GroupOperator, GroupSpec, TransferBindError, TransferRule
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

RULE_NAME = "width.net2wider"


class Net2WiderOptions(BaseModel):
    """Options of ``width.net2wider`` (all optional)."""

    model_config = ConfigDict(extra="forbid")

    mapping: Literal["repeat", "interleave"] = Field(
        "repeat", description="Which coarse channel fine channel j copies: repeat (j mod c) or "
                              "interleave (floor(j c / c')).")
    split: Literal["uniform", "random"] = Field(
        "uniform", description="How a duplicated channel's outgoing weights are split among its "
                               "copies: uniform (1/m each; R = pseudo-inverse of P) or random "
                               "(seeded unequal fractions summing to 1; breaks the symmetry "
                               "of the copies).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of split = 'random'.")


# --------------------------------------------------------------------------- channel maps


@dataclass(frozen=True)
class ChannelMap:
    """The duplication of one feature space of width ``coarse → fine``."""

    coarse: int
    fine: int
    source: Tensor     # (fine,) long: coarse channel each fine channel copies
    copies: Tensor     # (coarse,) float64: m_i
    fractions: Tensor  # (fine,) float64: α_j, summing to 1 over the copies of each channel


@lru_cache(maxsize=256)
def channel_map(coarse: int, fine: int, mapping: str = "repeat", split: str = "uniform",
                seed: int = 0) -> ChannelMap:
    if fine < coarse:
        raise ValueError(f"cannot widen {coarse} channels to {fine}")
    j = torch.arange(fine)
    source = j % coarse if mapping == "repeat" else (j * coarse) // fine
    copies = torch.zeros(coarse, dtype=torch.float64).index_add_(
        0, source, torch.ones(fine, dtype=torch.float64))
    if split == "uniform" or fine == coarse:
        weights = torch.ones(fine, dtype=torch.float64)
    else:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + coarse * 1009 + fine)
        weights = 0.5 + torch.rand(fine, generator=gen, dtype=torch.float64)
    totals = torch.zeros(coarse, dtype=torch.float64).index_add_(0, source, weights)
    return ChannelMap(coarse, fine, source, copies, weights / totals[source])


# --------------------------------------------------------------------------- per-tensor plans


@dataclass(frozen=True)
class AxisMap:
    axis: int
    role: str          # "out" | "in"
    inner: int         # >1 when the axis is a flattened (C, inner) axis, channel-major
    channels: ChannelMap


@dataclass(frozen=True)
class TensorPlan:
    name: str
    coarse_shape: tuple[int, ...]
    fine_shape: tuple[int, ...]
    axes: tuple[AxisMap, ...]


def _width_hint(spec: GroupSpec, name: str) -> Mapping[str, Any] | None:
    hints = [h[name]["width"] for h in (spec.fine_hints, spec.coarse_hints)
             if name in h and "width" in h[name]]
    if len(hints) == 2 and dict(hints[0]) != dict(hints[1]):
        raise TransferBindError(f"{RULE_NAME}: '{name}' has width hint {dict(hints[1])} on "
                                f"level '{spec.coarse_level}' but {dict(hints[0])} on "
                                f"'{spec.fine_level}'")
    return hints[0] if hints else None


def _input_shape(spec: GroupSpec, name: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    c = spec.coarse_hints.get(name, {}).get("input_shape")
    f = spec.fine_hints.get(name, {}).get("input_shape")
    if c is None or f is None:
        return None
    return tuple(int(v) for v in c), tuple(int(v) for v in f)


def plan_tensor(spec: GroupSpec, name: str, options: Net2WiderOptions) -> TensorPlan:
    cs, fs = tuple(spec.coarse[name]), tuple(spec.fine[name])
    where = f"{RULE_NAME}: '{name}'"
    if len(cs) != len(fs):
        raise TransferBindError(f"{where} has shape {cs} on level '{spec.coarse_level}' but "
                                f"{fs} on '{spec.fine_level}'; widening keeps the number of "
                                "dimensions")
    hint = _width_hint(spec, name)
    if hint is not None:
        unknown = set(hint) - {"out", "in"}
        if unknown:
            raise TransferBindError(f"{where}: width hint has unknown key(s) {sorted(unknown)}"
                                    " (expected 'out' and/or 'in')")
        out_axis, in_axis = hint.get("out"), hint.get("in")
    else:  # torch layout: (out, in, *kernel) weights, (C,) vectors and statistics
        out_axis = 0 if len(cs) >= 1 else None
        in_axis = 1 if len(cs) >= 2 else None
    roles = {a: r for a, r in ((out_axis, "out"), (in_axis, "in")) if a is not None}
    for axis in roles:
        if not (isinstance(axis, int) and 0 <= axis < len(cs)):
            raise TransferBindError(f"{where}: width hint names axis {axis!r}, but the tensor "
                                    f"has {len(cs)} dimension(s)")
    axes = []
    for axis, (c, f) in enumerate(zip(cs, fs)):
        role = roles.get(axis)
        if role is None:
            if c != f:
                raise TransferBindError(
                    f"{where} has shape {cs} on level '{spec.coarse_level}' but {fs} on "
                    f"'{spec.fine_level}': axis {axis} is not a channel axis and must not "
                    "change")
            continue
        inner = 1
        shapes = _input_shape(spec, name) if role == "in" else None
        if shapes is not None:
            (cc, *c_rest), (fc, *f_rest) = shapes
            if c_rest != f_rest:
                raise TransferBindError(
                    f"{where}: its input is {shapes[0]} on level '{spec.coarse_level}' but "
                    f"{shapes[1]} on '{spec.fine_level}'; width transfers keep the image size "
                    "(use the 'resolution' rule between resolutions)")
            inner = int(torch.tensor(c_rest).prod()) if c_rest else 1
            if cc * inner != c or fc * inner != f:
                raise TransferBindError(f"{where}: input_shape hints {shapes} do not match "
                                        f"axis {axis} ({c} / {f})")
            c, f = cc, fc
        if f < c:
            raise TransferBindError(
                f"{where} has {c} channels on axis {axis} on level '{spec.coarse_level}' but "
                f"only {f} on the finer level '{spec.fine_level}'; {RULE_NAME} widens (the "
                "finer level needs at least as many channels)")
        if f == c:
            continue  # same width: identity on this axis
        axes.append(AxisMap(axis, role, inner, channel_map(c, f, options.mapping, options.split,
                                                           options.seed)))
    return TensorPlan(name, cs, fs, tuple(axes))


# --------------------------------------------------------------------------- the operator


def _split_axis(x: Tensor, axis: int, inner: int) -> tuple[Tensor, int]:
    """View axis ``axis`` of size C·inner as two axes (C, inner); returns the C axis."""
    if inner == 1:
        return x, axis
    shape = list(x.shape)
    return x.reshape(shape[:axis] + [shape[axis] // inner, inner] + shape[axis + 1:]), axis


def _merge_axis(x: Tensor, axis: int, inner: int) -> Tensor:
    if inner == 1:
        return x
    shape = list(x.shape)
    return x.reshape(shape[:axis] + [shape[axis] * shape[axis + 1]] + shape[axis + 2:])


def _along(v: Tensor, axis: int, like: Tensor) -> Tensor:
    """``v`` (1-d) shaped to broadcast along ``axis`` of ``like``."""
    shape = [1] * like.dim()
    shape[axis] = -1
    return v.to(dtype=like.dtype, device=like.device).reshape(shape)


def _gather(x: Tensor, m: AxisMap, scale: bool) -> Tensor:
    x, axis = _split_axis(x, m.axis, m.inner)
    out = x.index_select(axis, m.channels.source.to(x.device))
    if scale:
        out = out * _along(m.channels.fractions, axis, out)
    return _merge_axis(out, axis, m.inner)


def _scatter(y: Tensor, m: AxisMap, weights: Tensor | None, divide: Tensor | None) -> Tensor:
    y, axis = _split_axis(y, m.axis, m.inner)
    if weights is not None:
        y = y * _along(weights, axis, y)
    shape = list(y.shape)
    shape[axis] = m.channels.coarse
    out = y.new_zeros(shape).index_add(axis, m.channels.source.to(y.device), y)
    if divide is not None:
        out = out / _along(divide, axis, out)
    return _merge_axis(out, axis, m.inner)


class Net2WiderOperator(GroupOperator):
    """P duplicates / splits, R averages / sums, Pᵀ sums (weighted by the split on in axes)."""

    left_inverse = True

    def __init__(self, spec: GroupSpec, plans: list[TensorPlan]) -> None:
        super().__init__(spec)
        self.plans = plans

    @staticmethod
    def _exact(t: Tensor) -> bool:
        return not (t.is_floating_point() or t.is_complex())

    def prolongate(self, coarse: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for plan in self.plans:
            x = coarse[plan.name]
            if self._exact(x):  # integer buffers (num_batches_tracked): counters, copied
                out[plan.name] = x.clone()
                continue
            for m in plan.axes:  # P = S on out axes, diag(α) S on in axes
                x = _gather(x, m, scale=m.role == "in")
            out[plan.name] = x if plan.axes else x.clone()
        return out

    def _to_coarse(self, fine: Mapping[str, Tensor], transpose: bool) -> dict[str, Tensor]:
        out = {}
        for plan in self.plans:
            y = fine[plan.name]
            if self._exact(y):
                out[plan.name] = y.clone()
                continue
            for m in plan.axes:
                ch = m.channels
                if transpose:   # Pᵀ = Sᵀ (out) / Sᵀ diag(α) (in)
                    y = _scatter(y, m, ch.fractions if m.role == "in" else None, None)
                else:           # R = mean of the copies (out) / sum of the copies (in)
                    y = _scatter(y, m, None, ch.copies if m.role == "out" else None)
            out[plan.name] = y if plan.axes else y.clone()
        return out

    def restrict(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._to_coarse(fine, transpose=False)

    def transpose(self, fine: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._to_coarse(fine, transpose=True)


def bind_net2wider(spec: GroupSpec, options: Net2WiderOptions) -> Net2WiderOperator:
    coarse, fine = list(spec.coarse), list(spec.fine)
    only_coarse = [n for n in coarse if n not in spec.fine]
    only_fine = [n for n in fine if n not in spec.coarse]
    if only_coarse or only_fine:
        name, level, other = ((only_coarse[0], spec.coarse_level, spec.fine_level)
                              if only_coarse else (only_fine[0], spec.fine_level,
                                                   spec.coarse_level))
        raise TransferBindError(
            f"{RULE_NAME}: '{name}' exists on level '{level}' but not on '{other}' (pattern "
            f"'{spec.pattern}'); width levels must have the same layers, only wider")
    if not coarse:
        raise TransferBindError(f"{RULE_NAME}: pattern '{spec.pattern}' matched no tensor")
    return Net2WiderOperator(spec, [plan_tensor(spec, n, options) for n in coarse])


RULE = TransferRule(
    name=RULE_NAME,
    options=Net2WiderOptions,
    bind=bind_net2wider,
    description="Width (channel count) between levels, Net2WiderNet style: P duplicates "
                "channels (fine j copies coarse j mod c) and splits the weights that read "
                "them, so the wider network computes the same function; R averages the "
                "copies' incoming weights and sums the split outgoing ones (R∘P = I); closed-"
                "form Pᵀ. Bind it to the whole model (default = 'width.net2wider'). Channel "
                "axes: torch layout (axis 0 out, axis 1 in) unless the model's transfer_hints "
                "say otherwise. Supports width-cnn and plain Conv2d/Linear/BatchNorm networks; "
                "not ruthotto-resnet. Options: mapping, split, seed.",
)
