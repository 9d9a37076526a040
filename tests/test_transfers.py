"""Built-in transfer rules against the operators written out in the thesis (4.2.2, 4.3.2)."""

from __future__ import annotations

import pluggy
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import parametrize

from mlsgd_dsl import hookspecs
from mlsgd_dsl.api import GroupOperator, GroupSpec, NoOptions, TransferBindError
from mlsgd_dsl.builtins import transfers as builtin_transfers
from mlsgd_dsl.transfers.depth import (
    DepthOptions,
    LinearDepthOptions,
    bind_constant,
    bind_linear,
)
from mlsgd_dsl.transfers.identity import bind_identity
from mlsgd_dsl.transfers.kernel_basis import KernelBasisParametrization, bind_kernel_basis
from mlsgd_dsl.transfers.resolution import ResolutionOptions, bind_resolution

F64 = torch.float64


def make_spec(coarse: dict, fine: dict, **hints) -> GroupSpec:
    return GroupSpec(
        pattern="*",
        coarse={n: torch.Size(s) for n, s in coarse.items()},
        fine={n: torch.Size(s) for n, s in fine.items()},
        coarse_level="coarse", fine_level="fine", h_coarse=2.0, h_fine=1.0, **hints)


def random_dict(shapes, seed: int, dtype=F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(tuple(s), generator=g, dtype=dtype) for n, s in shapes.items()}


def inner(a: dict, b: dict) -> torch.Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


# --------------------------------------------------------------------------- depth

LAYER_SHAPE = (2, 3)


def depth_spec(n_coarse: int, n_fine: int, shape=LAYER_SHAPE) -> GroupSpec:
    name = "blocks.0.layers.{}.conv.weight"
    return make_spec({name.format(i): shape for i in range(n_coarse)},
                     {name.format(i): shape for i in range(n_fine)})


def stacked(tensors: dict, count: int) -> torch.Tensor:
    """All layers of the block as one vector, layer by layer (the thesis' 'one vector')."""
    return torch.cat([tensors[f"blocks.0.layers.{i}.conv.weight"].flatten()
                      for i in range(count)])


def block_matrix(rows: list[list[float]]) -> torch.Tensor:
    """Entries × identity of the layer size, as in the thesis' block matrices."""
    return torch.kron(torch.tensor(rows, dtype=F64), torch.eye(6, dtype=F64))


# thesis 4.2.2, level 1 (4 layers) → level 2 (8 layers)
P_CONSTANT = [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0],
              [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
R_CONSTANT = [[0.5, 0.5, 0, 0, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0, 0, 0, 0],
              [0, 0, 0, 0, 0.5, 0.5, 0, 0], [0, 0, 0, 0, 0, 0, 0.5, 0.5]]
# w2_1 = w1_1, w2_2 = ½(w1_1 + w1_2), …, w2_7 = w1_4, w2_8 = w1_4
P_LINEAR = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0.5, 0.5, 0],
            [0, 0, 1, 0], [0, 0, 0.5, 0.5], [0, 0, 0, 1], [0, 0, 0, 1]]


def test_depth_constant_matches_thesis_matrices():
    op = bind_constant(depth_spec(4, 8), DepthOptions())
    x = random_dict(op.spec.coarse, 0)
    y = random_dict(op.spec.fine, 1)
    assert torch.equal(stacked(op.prolongate(x), 8), block_matrix(P_CONSTANT) @ stacked(x, 4))
    assert torch.allclose(stacked(op.restrict(y), 4), block_matrix(R_CONSTANT) @ stacked(y, 8))
    # R = ½Pᵀ, as the thesis says
    assert torch.equal(block_matrix(R_CONSTANT), 0.5 * block_matrix(P_CONSTANT).T)
    assert op.left_inverse


def test_depth_linear_matches_thesis_matrices():
    op = bind_linear(depth_spec(4, 8), LinearDepthOptions())
    x = random_dict(op.spec.coarse, 0)
    y = random_dict(op.spec.fine, 1)
    P = block_matrix(P_LINEAR)
    assert torch.allclose(stacked(op.prolongate(x), 8), P @ stacked(x, 4))
    assert torch.allclose(stacked(op.restrict(y), 4), 0.5 * P.T @ stacked(y, 8))
    assert not op.left_inverse
    assert not torch.allclose(stacked(op.restrict(op.prolongate(x)), 4), stacked(x, 4))


def test_depth_linear_injection_is_left_inverse():
    op = bind_linear(depth_spec(4, 8), LinearDepthOptions(restriction="injection"))
    y = random_dict(op.spec.fine, 1)
    injection = [[1 if j == 2 * i else 0 for j in range(8)] for i in range(4)]
    assert torch.equal(stacked(op.restrict(y), 4), block_matrix(injection) @ stacked(y, 8))
    assert op.left_inverse


def test_depth_factor_three_linear():
    op = bind_linear(depth_spec(2, 6, shape=(1,)), LinearDepthOptions(factor=3))
    x = {"blocks.0.layers.0.conv.weight": torch.tensor([3.0], dtype=F64),
         "blocks.0.layers.1.conv.weight": torch.tensor([6.0], dtype=F64)}
    fine = op.prolongate(x)
    assert [fine[f"blocks.0.layers.{i}.conv.weight"].item() for i in range(6)] == \
        [3.0, 4.0, 5.0, 6.0, 6.0, 6.0]


def test_depth_groups_by_block_and_sorts_layers_numerically():
    names = ["blocks.{b}.layers.{i}.conv.weight", "blocks.{b}.layers.{i}.norm.bias"]
    coarse = {n.format(b=b, i=i): (2,) for b in (0, 1) for i in range(6) for n in names}
    fine = {n.format(b=b, i=i): (2,) for b in (1, 0) for i in reversed(range(12))
            for n in names}
    op = bind_constant(make_spec(coarse, fine), DepthOptions())
    x = {n: torch.full((2,), float(hash(n) % 97)) for n in coarse}
    out = op.prolongate(x)
    assert set(out) == set(fine)
    for b in (0, 1):
        for i in range(12):
            for n in names:
                assert torch.equal(out[n.format(b=b, i=i)], x[n.format(b=b, i=i // 2)])


def test_depth_copies_integer_buffers():
    coarse = {f"blocks.0.layers.{i}.bn.num_batches_tracked": () for i in range(2)}
    fine = {f"blocks.0.layers.{i}.bn.num_batches_tracked": () for i in range(4)}
    for op in (bind_constant(make_spec(coarse, fine), DepthOptions()),
               bind_linear(make_spec(coarse, fine), LinearDepthOptions())):
        x = {n: torch.tensor(7 + i) for i, n in enumerate(coarse)}
        out = op.prolongate(x)
        assert [out[n].item() for n in fine] == [7, 7, 8, 8]
        assert all(t.dtype == torch.int64 for t in out.values())
        back = op.restrict(out)
        assert [back[n].item() for n in coarse] == [7, 8]


@pytest.mark.parametrize(("coarse", "fine", "message"), [
    ({"blocks.0.layers.0.w": (2,)}, {"blocks.0.layers.0.w": (2,)}, "factor 2 needs 2"),
    ({"blocks.0.layers.0.w": (2,)}, {"blocks.0.layers.0.w": (2,), "blocks.0.layers.1.w": (3,)},
     "must have the same shape"),
    ({"blocks.0.layers.0.w": (2,)}, {"blocks.0.layers.0.v": (2,), "blocks.0.layers.1.v": (2,)},
     "has layers on level 'coarse' but none on 'fine'"),
    ({"fc.weight": (2,)}, {"fc.weight": (2,)}, "no 'layers.<number>' component"),
])
def test_depth_bind_errors(coarse, fine, message):
    with pytest.raises(TransferBindError, match=message):
        bind_constant(make_spec(coarse, fine), DepthOptions())


def test_depth_options_forbid_unknown_keys():
    with pytest.raises(ValidationError):
        DepthOptions(layers="x")
    with pytest.raises(ValidationError):
        LinearDepthOptions(restriction="average")


# --------------------------------------------------------------------------- kernel basis

# The fine coordinates (e_01, e_10, e_11, e_12, e_21, B_00, B_01, B_10, B_11), written out:
# the thesis' c_{1,2}, c_{2,1}, c_{2,2}, c_{2,3}, c_{3,2} and its four ¼-kernels.
q = 0.25
BASIS_KERNELS = [
    [[0, 1, 0], [0, 0, 0], [0, 0, 0]],
    [[0, 0, 0], [1, 0, 0], [0, 0, 0]],
    [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
    [[0, 0, 0], [0, 0, 1], [0, 0, 0]],
    [[0, 0, 0], [0, 0, 0], [0, 1, 0]],
    [[q, q, 0], [q, q, 0], [0, 0, 0]],
    [[0, q, q], [0, q, q], [0, 0, 0]],
    [[0, 0, 0], [q, q, 0], [q, q, 0]],
    [[0, 0, 0], [0, q, q], [0, q, q]],
]
BASIS = torch.tensor(BASIS_KERNELS, dtype=F64).reshape(9, 9).T  # columns = basis vectors


def kernel_spec(fine_shape=(4, 3, 3, 3), fine_name="conv.weight") -> GroupSpec:
    return make_spec({"conv.weight": (4, 3, 2, 2)}, {fine_name: fine_shape})


def test_kernel_basis_against_explicit_change_of_basis():
    op = bind_kernel_basis(kernel_spec(), NoOptions())
    k = random_dict(op.spec.coarse, 0)["conv.weight"]
    K = random_dict(op.spec.fine, 1)["conv.weight"]
    fine = op.prolongate({"conv.weight": k})["conv.weight"]
    expected = (k.reshape(-1, 4) @ BASIS[:, 5:].T).reshape(4, 3, 3, 3)
    assert torch.allclose(fine, expected)
    coeffs = K.reshape(-1, 9) @ torch.linalg.inv(BASIS).T
    restricted = op.restrict({"conv.weight": K})["conv.weight"]
    assert torch.allclose(restricted, coeffs[:, 5:].reshape(4, 3, 2, 2))
    # R reads the corners: k[a, b] = 4·K[2a, 2b]
    assert torch.allclose(restricted, 4 * K[..., ::2, ::2])
    assert torch.allclose(op.restrict(op.prolongate({"conv.weight": k}))["conv.weight"], k)


def test_kernel_basis_single_entries_are_the_thesis_kernels():
    op = bind_kernel_basis(make_spec({"w": (1, 1, 2, 2)}, {"w": (1, 1, 3, 3)}), NoOptions())
    for c, (a, b) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        k = torch.zeros(1, 1, 2, 2, dtype=F64)
        k[0, 0, a, b] = 1
        fine = op.prolongate({"w": k})["w"][0, 0]
        assert torch.equal(fine, torch.tensor(BASIS_KERNELS[5 + c], dtype=F64))


def test_kernel_basis_coefficient_form():
    name = "conv.parametrizations.weight.original"
    op = bind_kernel_basis(kernel_spec((4, 3, 9), name), NoOptions())
    k = random_dict(op.spec.coarse, 0)["conv.weight"]
    coeffs = op.prolongate({"conv.weight": k})[name]
    assert torch.equal(coeffs[..., :5], torch.zeros(4, 3, 5, dtype=F64))
    assert torch.equal(coeffs[..., 5:], k.reshape(4, 3, 4))
    assert torch.equal(op.restrict({name: coeffs})["conv.weight"], k)
    # the same kernel as the plain form once the parametrization is applied
    plain = bind_kernel_basis(kernel_spec(), NoOptions()).prolongate({"conv.weight": k})
    assert torch.allclose(KernelBasisParametrization()(coeffs), plain["conv.weight"])


@pytest.mark.parametrize(("fine_shape", "message"), [
    ((4, 3, 5, 5), r"must be \(4, 3, 3, 3\) \(kernel\) or \(4, 3, 9\)"),
    ((4, 2, 3, 3), r"must be \(4, 3, 3, 3\)"),
])
def test_kernel_basis_bind_errors(fine_shape, message):
    with pytest.raises(TransferBindError, match=message):
        bind_kernel_basis(kernel_spec(fine_shape), NoOptions())


def test_kernel_basis_bind_errors_on_names_and_coarse_shape():
    with pytest.raises(TransferBindError, match="only 2×2 → 3×3"):
        bind_kernel_basis(make_spec({"w": (4, 3, 3, 3)}, {"w": (4, 3, 3, 3)}), NoOptions())
    with pytest.raises(TransferBindError, match="'w' exists on level 'coarse' but neither"):
        bind_kernel_basis(make_spec({"w": (4, 3, 2, 2)}, {"v": (4, 3, 3, 3)}), NoOptions())


def test_parametrization_round_trip_and_state_dict():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    kernel = conv.weight.detach().clone()
    parametrize.register_parametrization(conv, "weight", KernelBasisParametrization())
    assert torch.allclose(conv.weight, kernel, atol=1e-6)
    state = conv.state_dict()
    assert list(state) == ["parametrizations.weight.original"]
    assert state["parametrizations.weight.original"].shape == (4, 3, 9)
    p = KernelBasisParametrization()
    coeffs = torch.randn(4, 3, 9, dtype=F64)
    assert torch.allclose(p.right_inverse(p(coeffs)), coeffs)
    assert p(coeffs).dtype == F64
    # gradients reach the coefficients
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    assert conv.parametrizations.weight.original.grad.shape == (4, 3, 9)


# --------------------------------------------------------------------------- resolution


def fc_spec(coarse=(1, 2, 2), fine=(1, 4, 4), out=1, hints=True) -> GroupSpec:
    shapes = ({"fc.weight": (out, coarse[0] * coarse[1] * coarse[2])},
              {"fc.weight": (out, fine[0] * fine[1] * fine[2])})
    if not hints:
        return make_spec(*shapes)
    return make_spec(*shapes, coarse_hints={"fc.weight": {"input_shape": coarse}},
                     fine_hints={"fc.weight": {"input_shape": fine}})


def test_resolution_nearest_and_avgpool_by_hand():
    op = bind_resolution(fc_spec(), ResolutionOptions())
    coarse = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)  # the 2×2 image [[1, 2], [3, 4]]
    fine = op.prolongate({"fc.weight": coarse})["fc.weight"]
    assert fine.tolist() == [[1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]]
    image = torch.tensor([[1, 3, 0, 0], [5, 7, 0, 4], [2, 2, 8, 0], [2, 2, 0, 0]], dtype=F64)
    restricted = op.restrict({"fc.weight": image.reshape(1, 16)})["fc.weight"]
    assert restricted.tolist() == [[4.0, 1.0, 2.0, 2.0]]
    assert op.left_inverse


def test_resolution_auto_scale_preserves_the_function_and_is_left_inverse():
    spec = fc_spec(coarse=(3, 4, 4), fine=(3, 8, 8), out=5)
    op = bind_resolution(spec, ResolutionOptions(scale="auto"))
    weight = random_dict(spec.coarse, 0)["fc.weight"]
    features = torch.randn(3, 4, 4, dtype=F64)
    upsampled = features.repeat_interleave(2, 1).repeat_interleave(2, 2)
    fine_weight = op.prolongate({"fc.weight": weight})["fc.weight"]
    assert torch.allclose(fine_weight @ upsampled.flatten(), weight @ features.flatten())
    assert torch.allclose(op.restrict({"fc.weight": fine_weight})["fc.weight"], weight)
    # with the thesis' scale 1 the same network computes factor² = 4 times as much
    thesis = bind_resolution(spec, ResolutionOptions()).prolongate({"fc.weight": weight})
    assert torch.allclose(thesis["fc.weight"] @ upsampled.flatten(),
                          4 * weight @ features.flatten())


def test_resolution_bilinear():
    spec = fc_spec(coarse=(2, 3, 3), fine=(2, 6, 6), out=2)
    op = bind_resolution(spec, ResolutionOptions(mode="bilinear"))
    assert not op.left_inverse
    constant = torch.full((2, 18), 0.5, dtype=F64)
    assert torch.allclose(op.prolongate({"fc.weight": constant})["fc.weight"],
                          torch.full((2, 72), 0.5, dtype=F64))


def test_resolution_shapes_from_options():
    op = bind_resolution(fc_spec(hints=False),
                         ResolutionOptions(coarse_shape=(1, 2, 2), fine_shape=(1, 4, 4)))
    assert op.factor == 2


@pytest.mark.parametrize(("spec", "options", "message"), [
    (fc_spec(hints=False), {}, "needs the \\(C, H, W\\) of its input.*'coarse_shape'"),
    (fc_spec(coarse=(1, 2, 2), fine=(1, 5, 5)), {}, "not an integer multiple"),
    (fc_spec(coarse=(1, 2, 2), fine=(1, 4, 6)), {}, "equal in H and W"),
    (fc_spec(coarse=(1, 4, 4), fine=(4, 4, 4)), {}, "1 channels on level .coarse. but 4 on .fine."),
    (fc_spec(), {"coarse_shape": (1, 1, 4)}, "the model says its input is \\(1, 2, 2\\)"),
    (make_spec({"fc.bias": (10,)}, {"fc.bias": (10,)}), {}, "match biases"),
])
def test_resolution_bind_errors(spec, options, message):
    with pytest.raises(TransferBindError, match=message):
        bind_resolution(spec, ResolutionOptions(**options))


def test_resolution_bind_error_on_input_size():
    spec = make_spec({"fc.weight": (1, 5)}, {"fc.weight": (1, 16)},
                     coarse_hints={"fc.weight": {"input_shape": (1, 2, 2)}},
                     fine_hints={"fc.weight": {"input_shape": (1, 4, 4)}})
    with pytest.raises(TransferBindError, match="has 5 inputs, but its input shape"):
        bind_resolution(spec, ResolutionOptions())


def test_resolution_scale_must_be_positive():
    with pytest.raises(ValidationError):
        ResolutionOptions(scale=0)
    with pytest.raises(ValidationError):
        ResolutionOptions(scale="half")


# --------------------------------------------------------------------------- identity


def test_identity_copies_every_dtype():
    shapes = {"bn.weight": (3,), "bn.num_batches_tracked": ()}
    op = bind_identity(make_spec(shapes, shapes), NoOptions())
    x = {"bn.weight": torch.randn(3), "bn.num_batches_tracked": torch.tensor(12)}
    out = op.prolongate(x)
    assert torch.equal(out["bn.weight"], x["bn.weight"])
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.weight"] is not x["bn.weight"]
    assert op.left_inverse


def test_identity_bind_errors():
    with pytest.raises(TransferBindError, match="'a' has shape \\(3,\\) on level 'coarse'"):
        bind_identity(make_spec({"a": (3,)}, {"a": (4,)}), NoOptions())
    with pytest.raises(TransferBindError, match="'b' exists on level 'fine' but not on"):
        bind_identity(make_spec({"a": (3,)}, {"a": (3,), "b": (3,)}), NoOptions())


# --------------------------------------------------------------------------- all operators


def all_operators() -> list[tuple[str, GroupOperator]]:
    coefficient_name = "conv.parametrizations.weight.original"
    return [
        ("identity", bind_identity(make_spec({"a": (3, 2)}, {"a": (3, 2)}), NoOptions())),
        ("depth.constant", bind_constant(depth_spec(4, 8), DepthOptions())),
        ("depth.linear", bind_linear(depth_spec(4, 8), LinearDepthOptions())),
        ("depth.linear.injection",
         bind_linear(depth_spec(3, 6), LinearDepthOptions(restriction="injection"))),
        ("depth.linear.factor3", bind_linear(depth_spec(3, 9), LinearDepthOptions(factor=3))),
        ("kernel_basis", bind_kernel_basis(kernel_spec(), NoOptions())),
        ("kernel_basis.coefficients",
         bind_kernel_basis(kernel_spec((4, 3, 9), coefficient_name), NoOptions())),
        ("resolution", bind_resolution(fc_spec((2, 2, 2), (2, 4, 4), 3), ResolutionOptions())),
        ("resolution.auto", bind_resolution(fc_spec((2, 2, 2), (2, 6, 6), 3),
                                            ResolutionOptions(scale="auto"))),
        ("resolution.bilinear", bind_resolution(fc_spec((2, 2, 2), (2, 4, 4), 3),
                                                ResolutionOptions(mode="bilinear", scale=0.5))),
    ]


OPERATORS = all_operators()


@pytest.mark.parametrize(("label", "op"), OPERATORS, ids=[label for label, _ in OPERATORS])
def test_transpose_is_the_adjoint_of_prolongate(label, op):
    x = random_dict(op.spec.coarse, 2)
    y = random_dict(op.spec.fine, 3)
    transposed = op.transpose(y)
    reference = GroupOperator.transpose(op, y)  # autograd through prolongate
    for name in op.spec.coarse:
        assert torch.allclose(transposed[name], reference[name], atol=1e-12), name
    assert torch.allclose(inner(op.prolongate(x), y), inner(x, transposed), atol=1e-12)


@pytest.mark.parametrize(("label", "op"), OPERATORS, ids=[label for label, _ in OPERATORS])
def test_restrict_prolongate_is_identity_when_promised(label, op):
    x = random_dict(op.spec.coarse, 4)
    back = op.restrict(op.prolongate(x))
    exact = all(torch.allclose(back[n], x[n], atol=1e-12) for n in x)
    assert exact == op.left_inverse


@pytest.mark.parametrize(("label", "op"), OPERATORS, ids=[label for label, _ in OPERATORS])
def test_float32_and_requires_grad(label, op):
    x = {n: t.requires_grad_() for n, t in random_dict(op.spec.coarse, 5, torch.float32).items()}
    fine = op.prolongate(x)
    assert set(fine) == set(op.spec.fine)
    assert all(fine[n].dtype == torch.float32 and fine[n].shape == op.spec.fine[n] for n in fine)
    inner(fine, fine).backward()
    assert all(t.grad is not None for t in x.values())
    y = random_dict(op.spec.fine, 6, torch.float32)
    for coarse in (op.restrict(y), op.transpose(y)):
        assert all(coarse[n].dtype == torch.float32 and coarse[n].shape == op.spec.coarse[n]
                   for n in op.spec.coarse)


# --------------------------------------------------------------------------- plugin


def test_builtin_plugin_registers_every_rule():
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(builtin_transfers)
    rules = [r for batch in manager.hook.mlsgd_transfer_rules() for r in batch]
    assert sorted(r.name for r in rules) == [
        "depth.constant", "depth.linear", "identity", "kernel_basis", "position_embedding",
        "resnet.depth", "resolution"]
    assert all(r.description and r.options.model_config.get("extra") == "forbid"
               for r in rules)
