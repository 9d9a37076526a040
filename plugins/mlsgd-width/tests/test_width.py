"""mlsgd-width: the width.net2wider rule and the width-cnn family, tested with mlsgd_dsl.testing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from mlsgd_dsl.api import GroupOperator, ModelContext
from mlsgd_dsl.registry import build_registry
from mlsgd_dsl.testing import assert_rule_coherent, bind_rule, check_hierarchy, check_rule
from pydantic import ValidationError
from torch import nn

from mlsgd_width import model as width_model
from mlsgd_width import plugin
from mlsgd_width.transfer import RULE, channel_map

EXAMPLE = Path(__file__).resolve().parents[1] / "hierarchies" / "width-synthetic.toml"
CTX = ModelContext(in_channels=2, image_size=(8, 8), num_classes=5, h=1.0)
F64 = torch.float64


@pytest.fixture(scope="module")
def registry():
    # Explicit registration: the tests pass whether or not the plugin is pip-installed.
    return build_registry(autoload=False, extra_plugins=[("width", plugin)])


def build(channels, **options) -> nn.Module:
    return width_model.build({"channels": channels, **options}, CTX)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights *and* BatchNorm statistics, so eval-mode BN is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype))
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5)
    return model


def bind_models(coarse: nn.Module, fine: nn.Module, **options) -> GroupOperator:
    """The rule bound to whole state dicts (parameters and buffers), as `default = ...` does."""
    return bind_rule(RULE, {n: t.shape for n, t in coarse.state_dict().items()},
                     {n: t.shape for n, t in fine.state_dict().items()},
                     coarse_hints=coarse.transfer_hints, fine_hints=fine.transfer_hints,
                     options=options)


# --------------------------------------------------------------------------- the rule alone


@pytest.mark.parametrize("mapping", ["repeat", "interleave"])
@pytest.mark.parametrize("split", ["uniform", "random"])
@pytest.mark.parametrize(("c", "f"), [(4, 8), (3, 7), (5, 5)])
def test_rule_coherent(mapping: str, split: str, c: int, f: int) -> None:
    assert_rule_coherent("width.net2wider",
                         coarse={"conv.weight": (c, c, 3, 3), "bn.bias": (c,), "fc.weight": (6, c)},
                         fine={"conv.weight": (f, f, 3, 3), "bn.bias": (f,), "fc.weight": (6, f)},
                         options={"mapping": mapping, "split": split},
                         hints={"fc.weight": {"width": {"out": None, "in": 1}}},
                         h_coarse=2.0, h_fine=1.0, registry=build_registry(
                             autoload=False, extra_plugins=[("width", plugin)]))


def test_rule_coherent_flattened_head() -> None:
    # A linear layer on flattened (C, H, W) feature maps, described by the input_shape hint.
    assert_rule_coherent(RULE, coarse={"fc.weight": (10, 4 * 9)}, fine={"fc.weight": (10, 8 * 9)},
                         coarse_hints={"fc.weight": {"input_shape": (4, 3, 3),
                                                     "width": {"out": None, "in": 1}}},
                         fine_hints={"fc.weight": {"input_shape": (8, 3, 3),
                                                   "width": {"out": None, "in": 1}}})


@pytest.mark.parametrize(("coarse", "fine", "message"), [
    ({"w": (8, 3)}, {"w": (4, 3)}, "widens"),
    ({"w": (4, 3, 3, 3)}, {"w": (8, 3, 5, 5)}, "not a channel axis"),
    ({"w": (4, 3)}, {"v": (8, 3)}, "exists on level 'coarse' but not on 'fine'"),
    ({"w": (4,)}, {"w": (8, 1)}, "number of dimensions"),
])
def test_rule_refuses_what_it_cannot_widen(coarse, fine, message) -> None:
    (row,) = check_rule(RULE, coarse, fine)
    assert row.status == "fail" and row.name.endswith(": bind")
    assert message in row.detail


def test_fixed_axis_must_not_change() -> None:
    (row,) = check_rule(RULE, {"fc.weight": (5, 4)}, {"fc.weight": (6, 8)},
                        hints={"fc.weight": {"width": {"out": None, "in": 1}}})
    assert row.status == "fail" and "axis 0 is not a channel axis" in row.detail


def test_channel_maps() -> None:
    repeat = channel_map(3, 7)
    assert repeat.source.tolist() == [0, 1, 2, 0, 1, 2, 0]  # fine j copies coarse j mod c
    assert repeat.copies.tolist() == [3, 2, 2]
    assert torch.allclose(repeat.fractions, 1 / repeat.copies[repeat.source])
    interleave = channel_map(3, 6, "interleave")
    assert interleave.source.tolist() == [0, 0, 1, 1, 2, 2]
    random = channel_map(4, 10, "repeat", "random", 3)
    sums = torch.zeros(4, dtype=F64).index_add(0, random.source, random.fractions)
    assert torch.allclose(sums, torch.ones(4, dtype=F64))
    assert random.fractions.unique().numel() > 4  # unequal split


def test_closed_form_transpose_matches_autograd_on_a_whole_network() -> None:
    coarse, fine = build([3, 5], residual=True), build([6, 9], residual=True)
    op = bind_models(coarse, fine, split="random")
    g = torch.Generator().manual_seed(1)
    y = {n: torch.randn(t.shape, generator=g, dtype=F64) for n, t in fine.named_parameters()}
    params = {n: t.shape for n, t in coarse.named_parameters()}
    op_params = bind_rule(RULE, params, {n: t.shape for n, t in fine.named_parameters()},
                          coarse_hints=coarse.transfer_hints, fine_hints=fine.transfer_hints,
                          options={"split": "random"})
    closed, auto = op_params.transpose(y), GroupOperator.transpose(op_params, y)
    for n in params:
        torch.testing.assert_close(closed[n], auto[n], rtol=1e-12, atol=1e-12)
    assert op.left_inverse


# --------------------------------------------------------------------------- whole networks


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("split", ["uniform", "random"])
@pytest.mark.parametrize(("small", "large"), [([4, 8], [8, 16]), ([3, 5], [7, 5]),
                                              ([2, 3], [2, 11])])
def test_function_preservation(residual: bool, split: str, small, large) -> None:
    coarse = randomize(build(small, residual=residual, blocks=[1, 2]), 0).double()
    fine = build(large, residual=residual, blocks=[1, 2]).double()
    op = bind_models(coarse, fine, split=split)
    fine.load_state_dict(op.prolongate(coarse.state_dict()))
    x = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        for mode in ("eval", "train"):  # train mode: batch statistics of copies are copies
            getattr(coarse, mode)(), getattr(fine, mode)()
            yc, yf = coarse(x), fine(x)
            gap = float((yf - yc).norm() / yc.norm())
            assert gap < 1e-13, (mode, gap)


def test_restriction_is_a_left_inverse_on_the_state_dict() -> None:
    coarse = randomize(build([3, 4], residual=True), 4).double()
    fine = build([5, 8], residual=True).double()
    op = bind_models(coarse, fine, split="random")
    sd = coarse.state_dict()
    back = op.restrict(op.prolongate(sd))
    assert set(back) == set(sd)
    for n, t in sd.items():
        torch.testing.assert_close(back[n], t, rtol=1e-13, atol=1e-13)
    assert back["stages.0.entry.bn.num_batches_tracked"].dtype == torch.long


def test_split_random_breaks_the_symmetry_of_copies() -> None:
    """Uniform split: copies get equal gradients and stay equal; random split: they drift."""
    spread = {}
    for split in ("uniform", "random"):
        torch.manual_seed(0)
        coarse, fine = build([2, 3]).double(), build([4, 6]).double()
        op = bind_models(coarse, fine, split=split)
        fine.load_state_dict(op.prolongate(coarse.state_dict()))
        opt = torch.optim.SGD(fine.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(5)
        for _ in range(2):
            x = torch.randn(8, 2, 8, 8, generator=g, dtype=F64)
            y = torch.randint(0, 5, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(fine(x), y).backward()
            opt.step()
        w = fine.stages[1].entry.conv.weight.detach()  # copies: output channels j and j + 3
        spread[split] = float((w[:3] - w[3:]).norm() / w.norm())
    assert spread["uniform"] < 1e-12
    assert spread["random"] > 1e-3


# --------------------------------------------------------------------------- family and file


def test_width_cnn_names_and_hints() -> None:
    model = build([4, 8], residual=True, blocks=1)
    names = set(model.state_dict())
    assert {"stages.0.entry.conv.weight", "stages.1.blocks.0.conv2.weight",
            "stages.1.blocks.0.bn1.running_var", "fc.weight", "fc.bias"} <= names
    assert model.transfer_hints["fc.weight"] == {"width": {"out": None, "in": 1}}
    assert model.transfer_hints["stages.1.entry.conv.weight"] == {"width": {"out": 0, "in": 1}}
    assert model(torch.randn(2, 2, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("options", [{"channels": []}, {"channels": [4], "kernel_size": 2},
                                     {"channels": [4, 8], "blocks": [1]},
                                     {"channels": [4], "depth": 2}])
def test_width_cnn_options_refused(options) -> None:
    with pytest.raises(ValidationError):
        width_model.WidthCNNOptions.model_validate(options)


def test_plugin_registers_its_names(registry) -> None:
    assert "width.net2wider" in registry.names("transfer rules")
    assert "width-cnn" in registry.names("architectures")
    assert "width.exactness" in registry.names("checks")
    assert plugin.MLSGD_DSL_API == ">=1.0"
    assert not registry.broken


def test_example_hierarchy_validates_at_float_precision(registry) -> None:
    report = check_hierarchy(EXAMPLE, registry=registry)
    assert report.ok, report.table()
    assert all(r.status == "pass" for r in report.rows), report.table()
    gaps = [float(re.search(r"gap ([0-9.e+-]+)", r.detail).group(1))
            for r in report.rows if r.name.endswith("function preservation")]
    assert len(gaps) == 2 and max(gaps) < 1e-13
    assert [r.status for r in report.rows if r.name.endswith("width exactness")] == ["pass"] * 2


RUTHOTTO = """
name = "ruthotto-width"
[data]
source = "synthetic"
options = { train = 64, test = 32, size = 8, channels = 1 }
validation = 16
[model]
family = "ruthotto-resnet"
layers = 1
[levels.fine]
model = { channels = [8, 16] }
[levels.coarse]
model = { channels = [4, 8] }
[transfer]
default = "width.net2wider"
[mlsgd]
correction = "none"
"""


def test_unsupported_architecture_is_flagged(registry, tmp_path) -> None:
    """ruthotto-resnet widens algebraically, but not exactly: the plugin's check warns."""
    path = tmp_path / "ruthotto-width.toml"
    path.write_text(RUTHOTTO)
    report = check_hierarchy(path, registry=registry)
    rows = {r.name: r for r in report.rows}
    assert rows["coarse->fine * [width.net2wider]: R∘P = I"].status == "pass"
    assert rows["coarse->fine * [width.net2wider]: adjoint"].status == "pass"
    exact = rows["coarse->fine: width exactness"]
    assert exact.status == "warn" and "does not widen family 'ruthotto-resnet'" in exact.detail
