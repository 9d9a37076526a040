"""The ``torchvision-resnet`` family and the ``resnet.depth`` rule."""

from __future__ import annotations

import pytest
import torch

import mlsgd_dsl
from mlsgd_dsl.api import ModelContext
from mlsgd_dsl.models.resnet import build
from mlsgd_dsl.testing import assert_rule_coherent, bind_rule, check_rule

CTX = ModelContext(in_channels=3, image_size=(32, 32), num_classes=10, h=1.0)


def _blocks(model) -> dict[str, torch.Size]:
    return {n: t.shape for n, t in model.state_dict().items() if n.startswith("layer")}


def test_layout_and_function_are_torchvisions() -> None:
    from torchvision.models import resnet18

    ours = build({"arch": "resnet18", "small_images": False}, CTX).eval()
    theirs = resnet18(num_classes=10).eval()
    mine = {n: t.shape for n, t in ours.state_dict().items()}
    assert mine == {n: t.shape for n, t in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_residual_step_skips_transition_blocks() -> None:
    model = build({"layers": [2, 2], "width": 4}, ModelContext(1, (8, 8), 3, 2.0))
    assert [b.h for b in model.layer1] == [2.0, 2.0]  # 4 -> 4 channels: no downsample
    assert [b.h for b in model.layer2] == [1.0, 2.0]  # block 0 downsamples
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert list(build({"arch": "resnet34", "width": 2}, CTX).layer3) and \
        len(build({"arch": "resnet34", "width": 2}, CTX).layer3) == 6


def test_depth_rule_is_coherent() -> None:
    ctx = ModelContext(1, (8, 8), 3, 1.0)
    coarse = build({"layers": [2, 2, 2, 2], "width": 4}, ctx)
    fine = build({"layers": [4, 3, 3, 3], "width": 4}, ctx)
    rows = assert_rule_coherent("resnet.depth", _blocks(coarse), _blocks(fine),
                                h_coarse=2.0, h_fine=1.0)
    assert any("R∘P = I" in r.name and r.status == "pass" for r in rows)
    op = bind_rule("resnet.depth", _blocks(coarse), _blocks(fine), h_coarse=2.0, h_fine=1.0)
    sd = {n: t for n, t in coarse.state_dict().items() if n.startswith("layer")}
    up = op.prolongate(sd)
    # stage 1 (no transition): fine blocks 2i, 2i+1 copy coarse block i
    for i in range(4):
        assert torch.equal(up[f"layer1.{i}.conv1.weight"], sd[f"layer1.{i // 2}.conv1.weight"])
    # stage 2: the transition block once, then the regular block twice
    assert torch.equal(up["layer2.0.downsample.0.weight"], sd["layer2.0.downsample.0.weight"])
    assert torch.equal(up["layer2.0.conv1.weight"], sd["layer2.0.conv1.weight"])
    for i in (1, 2):
        assert torch.equal(up[f"layer2.{i}.bn1.running_var"], sd["layer2.1.bn1.running_var"])
        assert torch.equal(up[f"layer2.{i}.bn1.num_batches_tracked"],
                           sd["layer2.1.bn1.num_batches_tracked"])


def test_depth_rule_refuses_counts_that_do_not_double() -> None:
    ctx = ModelContext(1, (8, 8), 3, 1.0)
    coarse = build({"layers": [2, 2], "width": 4}, ctx)
    fine = build({"layers": [4, 4], "width": 4}, ctx)  # stage 2 would need 1 + 2 = 3
    rows = check_rule("resnet.depth", _blocks(coarse), _blocks(fine))
    assert rows[0].status == "fail" and "needs 3" in rows[0].detail
    rows = check_rule("resnet.depth", {"fc.weight": (3, 4)}, {"fc.weight": (3, 4)})
    assert rows[0].status == "fail" and "not a block tensor" in rows[0].detail


TINY = '''
name = "resnet-tiny"
[data]
source = "synthetic"
options = { train = 64, test = 16, size = 8, channels = 1, classes = 3 }
validation = 16
[model]
family = "torchvision-resnet"
width = 4
[levels.fine]
h = 1.0
model = { layers = [4, 3] }
[levels.coarse]
h = 2.0
model = { layers = [2, 2] }
[transfer]
default = "identity"
rules = { "layer*" = "resnet.depth" }
[mlsgd]
batch_size = 16
lr = 0.05
optimizer = { momentum = 0.9 }
bn_recalibration = 32
threads = 1
[mlsgd.objective]
l2 = 0.0
smoothness = 0.0
[report]
plot = false
'''


def test_hierarchy_validates_and_runs(tmp_path) -> None:
    f = tmp_path / "resnet.toml"
    f.write_text(TINY)
    c = mlsgd_dsl.compile(mlsgd_dsl.load(f))
    report = mlsgd_dsl.validate(c)
    assert report.ok and report.counts()["warn"] == 0, report.table()
    summary = mlsgd_dsl.run(c, out_dir=tmp_path / "run", quiet=True, validate=False)
    assert 0 <= summary["val_acc"] <= 1


@pytest.mark.parametrize("options, message", [
    ({"layers": [0, 2]}, "1 to 128 blocks"),
    ({"arch": "resnet50"}, "resnet18"),
])
def test_options_are_checked(options, message) -> None:
    from mlsgd_dsl.models.resnet import ResNetOptions

    with pytest.raises(ValueError, match=message):
        ResNetOptions.model_validate(options)
