"""The ``vit`` family and the ``position_embedding`` rule."""

from __future__ import annotations

import pytest
import torch

import mlsgd_dsl
from mlsgd_dsl.api import ModelContext
from mlsgd_dsl.models.vit import ViTOptions, build
from mlsgd_dsl.testing import assert_rule_coherent, bind_rule, check_rule

CTX = ModelContext(in_channels=1, image_size=(8, 8), num_classes=3, h=2.0)


def test_vit_layout_and_residual_step() -> None:
    model = build({"patch_size": 2, "dim": 8, "heads": 2, "blocks": 3}, CTX)
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 1 + 16, 8) and sd["cls_token"].shape == (1, 1, 8)
    assert sd["blocks.2.attn.qkv.weight"].shape == (24, 8)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (16, 8)
    assert model.transfer_hints["pos_embed"] == {"grid": (4, 4), "prefix": 1}
    assert all(b.h == 2.0 for b in model.blocks)  # the level's h by default
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 3)
    mean = build({"patch_size": 4, "dim": 8, "heads": 2, "blocks": 1, "pool": "mean",
                  "h": 0.5}, CTX)
    assert "cls_token" not in mean.state_dict() and mean.blocks[0].h == 0.5
    assert mean.state_dict()["pos_embed"].shape == (1, 4, 8)


def test_vit_block_is_a_scaled_residual_step() -> None:
    model = build({"patch_size": 4, "dim": 8, "heads": 2, "blocks": 1}, CTX).double()
    block = model.blocks[0]
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mid = x + 2.0 * block.attn(block.norm1(x))
    expected = mid + 2.0 * block.mlp(block.norm2(mid))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("options, message", [
    ({"dim": 10, "heads": 4, "blocks": 1}, "multiple of heads"),
    ({"blocks": 0}, "greater than or equal to 1"),
])
def test_vit_options_are_checked(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        ViTOptions.model_validate(options)


def test_patch_size_must_divide_the_image() -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build({"patch_size": 3, "dim": 8, "heads": 2, "blocks": 1}, CTX)


POS = {"pos_embed": (1, 1 + 4, 6)}
POS_FINE = {"pos_embed": (1, 1 + 16, 6)}
HINTS = {"coarse_hints": {"pos_embed": {"grid": (2, 2), "prefix": 1}},
         "fine_hints": {"pos_embed": {"grid": (4, 4), "prefix": 1}}}


def test_position_rule_is_coherent() -> None:
    rows = assert_rule_coherent("position_embedding", POS, POS_FINE, **HINTS)
    assert any("R∘P = I" in r.name and r.status == "pass" for r in rows)
    assert any("adjoint" in r.name and r.status == "pass" for r in rows)
    # without a class token, from options instead of hints
    assert_rule_coherent("position_embedding", {"p": (1, 9, 4)}, {"p": (1, 36, 4)},
                         options={"coarse_grid": (3, 3), "fine_grid": (6, 6), "prefix": 0})
    # bilinear: no left inverse, the adjoint still exact (autograd)
    rows = check_rule("position_embedding", POS, POS_FINE, options={"mode": "bilinear"},
                      **HINTS)
    assert all(r.status == "pass" for r in rows), [r for r in rows if r.status != "pass"]


def test_position_rule_maps() -> None:
    op = bind_rule("position_embedding", POS, POS_FINE, **HINTS)
    coarse = torch.arange(30, dtype=torch.float64).reshape(1, 5, 6)
    fine = op.prolongate({"pos_embed": coarse})["pos_embed"]
    assert torch.equal(fine[:, 0], coarse[:, 0])  # the class token's slot is copied
    grid = fine[0, 1:].reshape(4, 4, 6)
    # every fine patch inside coarse patch (i, j) gets its vector
    for i in range(4):
        for j in range(4):
            assert torch.equal(grid[i, j], coarse[0, 1 + 2 * (i // 2) + j // 2])
    back = op.restrict({"pos_embed": fine})["pos_embed"]
    torch.testing.assert_close(back, coarse)


@pytest.mark.parametrize("coarse, fine, hints, message", [
    ({"pos_embed": (1, 5, 6)}, {"pos_embed": (1, 17, 8)}, HINTS, "same D"),
    ({"pos_embed": (1, 5, 6)}, {"pos_embed": (1, 10, 6)},
     {"coarse_hints": {"pos_embed": {"grid": (2, 2), "prefix": 1}},
      "fine_hints": {"pos_embed": {"grid": (3, 3), "prefix": 1}}}, "integer multiple"),
    ({"pos_embed": (1, 5, 6)}, {"pos_embed": (1, 17, 6)}, {}, "needs its patch grid"),
])
def test_position_rule_refuses_what_it_cannot_map(coarse, fine, hints, message) -> None:
    rows = check_rule("position_embedding", coarse, fine, **hints)
    assert rows[0].status == "fail" and message in rows[0].detail


def _hierarchy(tmp_path, text: str):
    f = tmp_path / "vit.toml"
    f.write_text(text)
    return mlsgd_dsl.compile(mlsgd_dsl.load(f))


TINY = '''
name = "vit-tiny"
[data]
source = "synthetic"
options = {{ train = 64, test = 16, size = 8, channels = 1, classes = 3 }}
validation = 16
[model]
family = "vit"
patch_size = 2
dim = 8
heads = 2
{model}
{levels}
[transfer]
default = "identity"
rules = {rules}
[mlsgd]
batch_size = 16
optimizer = {{ name = "adamw" }}
lr = 0.001
threads = 1
[mlsgd.objective]
l2 = 0.0
smoothness = 0.0
[report]
plot = false
'''


def test_depth_hierarchy_validates_and_runs(tmp_path) -> None:
    text = TINY.format(model="", levels='''
[levels.fine]
h = 1.0
model = { blocks = 4 }
[levels.coarse]
h = 2.0
model = { blocks = 2 }
''', rules='{ "blocks.*" = { rule = "depth.constant", index = "blocks" } }')
    c = _hierarchy(tmp_path, text)
    report = mlsgd_dsl.validate(c)
    assert report.ok, report.table()
    summary = mlsgd_dsl.run(c, out_dir=tmp_path / "run", quiet=True, validate=False)
    assert 0 <= summary["val_acc"] <= 1


def test_resolution_hierarchy_validates(tmp_path) -> None:
    text = TINY.format(model="blocks = 1", levels='''
[levels.fine]
h = 1.0
[levels.coarse]
h = 1.0
data = { coarsen = [{ method = "avgpool", factor = 2 }] }
''', rules='{ "pos_embed" = "position_embedding" }')
    c = _hierarchy(tmp_path, text)
    report = mlsgd_dsl.validate(c)
    assert report.ok, report.table()
    names = [r.name for r in report.rows]
    assert any("pos_embed [position_embedding]" in n for n in names)
