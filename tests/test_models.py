"""Built-in architecture families: ruthotto-resnet (thesis 4.1.1) and import."""

from __future__ import annotations

import sys
import textwrap
import types

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mlsgd_dsl.api import ModelContext
from mlsgd_dsl.errors import ConfigError
from mlsgd_dsl.models import imported, ruthotto
from mlsgd_dsl.models.ruthotto import (
    ResidualLayer,
    RuthottoOptions,
    convolve,
    convolve_transpose,
    tv_norm,
)

CIFAR = ModelContext(in_channels=3, image_size=(32, 32), num_classes=10, h=1.0)
CIFAR_COARSE = ModelContext(in_channels=3, image_size=(16, 16), num_classes=10, h=1.0)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small(**extra) -> nn.Module:
    opts = {"channels": [4, 6], "layers": 2, **extra}
    return ruthotto.build(RuthottoOptions(**opts), ModelContext(2, (8, 8), 3, 1.0))


# --------------------------------------------------------------------------- thesis counts


@pytest.mark.parametrize(("layers", "expected"), [(8, 433162), (4, 238730), (2, 141514)])
def test_depth_hierarchy_counts_table_4_1(layers: int, expected: int) -> None:
    model = ruthotto.build(RuthottoOptions(channels=[16, 32, 64], layers=layers), CIFAR)
    assert count(model) == expected


def test_resolution_hierarchy_counts_table_4_4() -> None:
    fine = ruthotto.build(RuthottoOptions(channels=[32, 64, 112], layers=3), CIFAR)
    coarse = ruthotto.build(
        RuthottoOptions(channels=[32, 64, 112], layers=3, kernel_size=2), CIFAR_COARSE)
    assert count(fine) == 560570
    assert count(coarse) == 241850
    assert fine.transfer_hints == {"fc.weight": {"input_shape": (112, 8, 8)}}
    assert coarse.transfer_hints == {"fc.weight": {"input_shape": (112, 4, 4)}}


def test_parameter_names_contract() -> None:
    model = small(layers=[2, 1])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["opening.conv.weight"] == (4, 2, 3, 3)
    assert shapes["opening.conv.bias"] == (4,)
    assert shapes["opening.bn.weight"] == (4,)
    assert shapes["blocks.0.layers.1.conv.weight"] == (4, 4, 3, 3)
    assert shapes["blocks.0.layers.1.norm.weight"] == (4,)
    assert shapes["blocks.1.layers.0.norm.bias"] == (6,)
    assert "blocks.1.layers.1.conv.weight" not in shapes
    assert shapes["connect.0.conv.weight"] == (6, 4, 1, 1)
    assert shapes["connect.0.conv.bias"] == (6,)
    assert shapes["connect.0.bn.bias"] == (6,)
    assert shapes["fc.weight"] == (3, 6 * 4 * 4)
    assert "connect.0.bn.running_mean" in model.state_dict()
    assert not any(".conv.bias" in n for n in shapes if n.startswith("blocks"))


def test_init() -> None:
    torch.manual_seed(0)
    model = ruthotto.build(RuthottoOptions(channels=[64], layers=4), CIFAR)
    kernels = torch.cat([layer.conv.weight.flatten() for layer in model.blocks[0].layers])
    expected_std = (2 / (9 * 64 + 9 * 64)) ** 0.5
    assert kernels.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.all(model.opening.conv.bias == 0) and torch.all(model.fc.bias == 0)
    norm = model.blocks[0].layers[0].norm
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


# --------------------------------------------------------------------------- shapes, h


@pytest.mark.parametrize(("k", "size"), [(1, 8), (2, 8), (2, 7), (3, 9), (4, 6), (5, 8)])
def test_forward_shapes(k: int, size: int) -> None:
    ctx = ModelContext(2, (size, size), 5, 1.0)
    model = ruthotto.build(RuthottoOptions(channels=[3, 4, 5], layers=1, kernel_size=k), ctx)
    assert model(torch.randn(2, 2, size, size)).shape == (2, 5)
    assert model.transfer_hints["fc.weight"]["input_shape"] == (5, size // 4, size // 4)


def test_non_square_images() -> None:
    ctx = ModelContext(1, (12, 8), 4, 1.0)
    model = ruthotto.build(RuthottoOptions(channels=[2, 3], layers=1), ctx)
    assert model(torch.randn(3, 1, 12, 8)).shape == (3, 4)
    assert model.transfer_hints["fc.weight"]["input_shape"] == (3, 6, 4)


def test_image_too_small_for_stages() -> None:
    with pytest.raises(ValueError, match="too small"):
        ruthotto.build(RuthottoOptions(channels=[2, 2, 2, 2], layers=1),
                       ModelContext(1, (4, 4), 2, 1.0))


def test_h_from_context_or_option() -> None:
    ctx = ModelContext(2, (8, 8), 3, 4.0)
    assert ruthotto.build(RuthottoOptions(channels=[4], layers=1), ctx).blocks[0].layers[0].h == 4
    assert ruthotto.build(
        RuthottoOptions(channels=[4], layers=1, h=0.5), ctx).blocks[0].layers[0].h == 0.5


# --------------------------------------------------------------------------- operators


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(6, 6), (7, 5)])
def test_convolve_transpose_is_adjoint(k: int, size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=gen)
    y = torch.randn(2, 4, *size, dtype=torch.float64, generator=gen)
    kernel = torch.randn(4, 3, k, k, dtype=torch.float64, generator=gen)
    kx = convolve(x, kernel)
    kty = convolve_transpose(y, kernel)
    assert kx.shape == y.shape and kty.shape == x.shape
    assert torch.allclose((kx * y).sum(), (x * kty).sum(), rtol=1e-12, atol=1e-12)


def test_even_kernel_pads_bottom_right() -> None:
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 2, 2] = 1.0  # bottom-right pixel
    kernel = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    kernel[0, 0, 0, 0] = 1.0  # picks the top-left of each 2x2 window = the pixel itself
    assert torch.equal(convolve(x, kernel), x)
    kernel = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    kernel[0, 0, 1, 1] = 1.0  # picks the pixel below-right: shift up-left, zero at the border
    out = convolve(x, kernel)
    assert out[0, 0, 1, 1] == 1.0 and out.sum() == 1.0


def test_residual_layer_identity_when_kernel_zero() -> None:
    layer = ResidualLayer(4, 3, h=2.0, norm_eps=1e-3)
    with torch.no_grad():
        layer.conv.weight.zero_()
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(layer(x), x)


def test_residual_layer_linear_in_h() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    layers = [ResidualLayer(4, 3, h=h, norm_eps=1e-3).double() for h in (1.0, 2.5)]
    layers[1].load_state_dict(layers[0].state_dict())
    update = layers[0](x) - x
    assert torch.allclose(layers[1](x) - x, 2.5 * update)
    assert update.abs().max() > 0


def test_residual_layer_formula() -> None:
    torch.manual_seed(2)
    layer = ResidualLayer(3, 2, h=0.7, norm_eps=1e-3).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    kernel = layer.conv.weight
    expected = x - 0.7 * convolve_transpose(torch.relu(layer.norm(convolve(x, kernel))), kernel)
    assert torch.allclose(layer(x), expected)


def test_tv_norm_properties() -> None:
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64) * 10 + 3
    out = tv_norm(x, eps=0.0)
    assert torch.allclose(out.mean(dim=1), torch.zeros(3, 4, 4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose((out ** 2).sum(dim=1), torch.ones(3, 4, 4, dtype=torch.float64))
    assert torch.allclose(tv_norm(2 * x, 0.0), out)  # scale invariant
    assert torch.allclose(tv_norm(x + 7, 0.0), out)  # invariant to a shift across channels
    small_x = torch.full((1, 4, 2, 2), 5.0)
    assert torch.all(tv_norm(small_x, 1e-3) == 0)  # constant across channels -> 0, no NaN
    norm = ruthotto.TVNorm(5, eps=0.0).double()
    with torch.no_grad():
        norm.weight.fill_(2.0)
        norm.bias.fill_(-1.0)
    assert torch.allclose(norm(x), 2 * out - 1)


# --------------------------------------------------------------------------- regulariser


def test_smoothness() -> None:
    model = small(layers=[3, 1])
    layers = model.blocks[0].layers
    expected = sum(torch.linalg.vector_norm(b.conv.weight - a.conv.weight)
                   for a, b in zip(layers, layers[1:]))
    assert torch.allclose(model.smoothness(), expected)
    assert torch.allclose(ruthotto.smoothness_penalty(model, 2e-3), 2e-3 * expected)
    with torch.no_grad():
        for layer in layers:
            layer.conv.weight.copy_(layers[0].conv.weight)
    value = model.smoothness()
    assert value == 0
    value.backward()  # equal kernels (after constant prolongation): finite, zero gradient
    assert torch.all(layers[0].conv.weight.grad == 0)
    assert small(layers=1).smoothness() == 0


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("bad", [
    {"channels": [], "layers": 1},
    {"channels": [4, 0], "layers": 1},
    {"channels": [4] * 9, "layers": 1},
    {"channels": [4, 8], "layers": 0},
    {"channels": [4, 8], "layers": [1, 2, 3]},
    {"channels": [4, 8], "layers": [1, -1]},
    {"channels": [4], "layers": 1, "kernel_size": 8},
    {"channels": [4], "layers": 1, "h": 0},
    {"channels": [4], "layers": 1, "kernel_basis": True, "kernel_size": 2},
    {"channels": [4], "layers": 1, "depth": 3},
])
def test_options_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        RuthottoOptions(**bad)


def test_context_mismatch() -> None:
    with pytest.raises(ValueError, match="in_channels is 1 but the level's data has 3"):
        ruthotto.build(RuthottoOptions(channels=[4], layers=1, in_channels=1), CIFAR)
    with pytest.raises(ValueError, match="image_size is 28x28 but the level's data is 32x32"):
        ruthotto.build(RuthottoOptions(channels=[4], layers=1, image_size=28), CIFAR)
    ruthotto.build(RuthottoOptions(channels=[4], layers=1, in_channels=3, image_size=32), CIFAR)


# --------------------------------------------------------------------------- kernel basis


class _FakeBasis(nn.Module):
    """An invertible 9x9 change of basis standing in for the real one (wiring test only)."""

    matrix = torch.randn(9, 9, generator=torch.Generator().manual_seed(3)) + 3 * torch.eye(9)

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        return (coeffs @ self.matrix.to(coeffs)).unflatten(-1, (3, 3))

    def right_inverse(self, kernel: torch.Tensor) -> torch.Tensor:
        # c @ M = k  <=>  Mᵀ cᵀ = kᵀ
        flat = kernel.flatten(-2).unsqueeze(-1)
        return torch.linalg.solve(self.matrix.to(kernel).T, flat).squeeze(-1)


def _check_basis_equivalence() -> None:
    torch.manual_seed(4)
    plain = small().double().eval()
    based = small(kernel_basis=True).double().eval()
    names = {n for n, _ in based.named_parameters()}
    assert "blocks.0.layers.0.conv.parametrizations.weight.original" in names
    assert count(based) == count(plain)
    kernels = {n: t for n, t in plain.state_dict().items() if n.endswith("conv.weight")
               and n.startswith("blocks.")}
    rest = {n: t for n, t in plain.state_dict().items() if n not in kernels}
    assert based.load_state_dict(rest, strict=False).unexpected_keys == []
    with torch.no_grad():
        for name, kernel in kernels.items():
            based.get_submodule(name.removesuffix(".weight")).weight = kernel.clone()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    assert torch.allclose(based(x), plain(x), atol=1e-10)
    for name, kernel in kernels.items():
        module = based.get_submodule(name.removesuffix(".weight"))
        assert torch.allclose(module.weight, kernel, atol=1e-10)


def test_kernel_basis_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("mlsgd_dsl.transfers.kernel_basis")
    fake.KernelBasisParametrization = _FakeBasis
    monkeypatch.setitem(sys.modules, "mlsgd_dsl.transfers.kernel_basis", fake)
    _check_basis_equivalence()


def test_kernel_basis_real() -> None:
    pytest.importorskip("mlsgd_dsl.transfers.kernel_basis")
    _check_basis_equivalence()


def test_kernel_basis_reset_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("mlsgd_dsl.transfers.kernel_basis")
    fake.KernelBasisParametrization = _FakeBasis
    monkeypatch.setitem(sys.modules, "mlsgd_dsl.transfers.kernel_basis", fake)
    model = small(kernel_basis=True)
    model.reset_parameters()
    assert model.blocks[0].layers[0].conv.weight.shape == (4, 4, 3, 3)


# --------------------------------------------------------------------------- import family


FACTORY_MODULE = """
import torch
from torch import nn
from mlsgd_dsl import model_factory

@model_factory
def make(in_channels, num_classes, image_size, width=4):
    return Net(in_channels, num_classes, image_size, width)

class Net(nn.Module):
    def __init__(self, in_channels, num_classes, image_size, width):
        super().__init__()
        self.seen = dict(in_channels=in_channels, num_classes=num_classes,
                         image_size=image_size, width=width)
        self.fc = nn.Linear(in_channels * image_size * image_size, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))

    @classmethod
    @model_factory
    def create(cls, **kwargs):
        return cls(3, 2, 4, 1)

@model_factory
def with_h(h, num_classes=1):
    m = nn.Linear(1, num_classes)
    m.h = h
    return m

@model_factory
def boom():
    raise RuntimeError("no weights here")

@model_factory
def not_a_module():
    return 42

CONSTANT = 3
"""


@pytest.fixture
def factory_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "user_nets_for_tests.py").write_text(textwrap.dedent(FACTORY_MODULE))
    (tmp_path / "broken_nets_for_tests.py").write_text("import not_a_real_package_xyz\n")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in ("user_nets_for_tests", "broken_nets_for_tests"):
        sys.modules.pop(name, None)


def test_import_fills_context(factory_dir) -> None:
    ctx = ModelContext(3, (4, 4), 2, 0.5)
    model = imported.build(imported.ImportOptions(factory="user_nets_for_tests:make"), ctx)
    assert model.seen == {"in_channels": 3, "num_classes": 2, "image_size": 4, "width": 4}
    assert model(torch.randn(5, 3, 4, 4)).shape == (5, 2)
    opts = {"factory": "user_nets_for_tests:make", "kwargs": {"width": 7, "num_classes": 9}}
    model = imported.build(opts, ctx)
    assert model.seen["width"] == 7 and model.seen["num_classes"] == 9
    model = imported.build({"factory": "user_nets_for_tests:with_h"}, ctx)
    assert model.h == 0.5 and model.out_features == 2
    # **kwargs alone receives nothing from the context
    assert imported.build({"factory": "user_nets_for_tests:Net.create"}, ctx).seen["width"] == 1


def test_import_search_path(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    (sub / "far_nets_for_tests.py").write_text(
        "from torch import nn\nimport mlsgd_dsl\n@mlsgd_dsl.model_factory\ndef make():\n"
        "    return nn.Identity()\n")
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    try:
        opts = {"factory": "far_nets_for_tests:make", "search_path": ["elsewhere"]}
        assert isinstance(imported.build(opts, CIFAR), nn.Identity)
        assert sys.path == before  # the path change does not leak
    finally:
        sys.modules.pop("far_nets_for_tests", None)


@pytest.mark.parametrize(("factory", "message"), [
    ("nonexistent_pkg_xyz.nets:make",
     "model.factory: cannot import 'nonexistent_pkg_xyz.nets': "
     "No module named 'nonexistent_pkg_xyz'"),
    ("broken_nets_for_tests:make",
     "model.factory: cannot import 'broken_nets_for_tests': No module named "
     "'not_a_real_package_xyz'"),
    ("user_nets_for_tests:missing",
     "model.factory: 'user_nets_for_tests:missing': 'user_nets_for_tests' has no attribute "
     "'missing'"),
    ("user_nets_for_tests:CONSTANT",
     "model.factory: 'user_nets_for_tests:CONSTANT' is a int, not a callable"),
    ("user_nets_for_tests:boom",
     "model.factory: 'user_nets_for_tests:boom' raised RuntimeError: no weights here"),
    ("user_nets_for_tests:not_a_module",
     "model.factory: 'user_nets_for_tests:not_a_module' returned int, not a torch.nn.Module"),
])
def test_import_errors(factory_dir, factory: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        imported.build({"factory": factory}, CIFAR)
    assert str(info.value) == message
    assert info.value.path == ("model", "factory")


@pytest.mark.parametrize("bad", ["mypkg.nets", "mypkg:", ":make", "my pkg:make", "a:b:c"])
def test_import_factory_format(bad: str) -> None:
    with pytest.raises(ValidationError, match="package.module:callable"):
        imported.ImportOptions(factory=bad)


def test_builtin_plugin_registers_both() -> None:
    import pluggy

    from mlsgd_dsl import hookspecs
    from mlsgd_dsl.builtins import models as builtin_models

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin_models)
    names = [a.name for batch in pm.hook.mlsgd_architectures() for a in batch]
    assert names == ["ruthotto-resnet", "vit", "torchvision-resnet", "import"]
