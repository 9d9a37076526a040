"""The compiler (graph, levels, paths, composed transfers) and the operators it binds, checked
end-to-end against the thesis' matrices (4.2.2: P, R = ½Pᵀ, P* = (h_fine/h_coarse)·Pᵀ)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mlsgd_dsl
from mlsgd_dsl.errors import ConfigError
from mlsgd_dsl.operators import EdgeTransfer, Transfer

pytestmark = pytest.mark.usefixtures("one_thread")

HIERARCHIES = Path(__file__).resolve().parents[1] / "hierarchies"
QUICKSTART = HIERARCHIES / "quickstart.toml"
DEPTH = HIERARCHIES / "depth-cifar10.toml"
LINEAR = {'transfer.rules."blocks.*.layers.*"': "depth.linear"}
SUFFIXES = ("conv.weight", "norm.weight", "norm.bias")

DIAMOND = """
name = "diamond"
[data]
options = {{ train = 20, test = 10, size = 8 }}
[model]
family = "ruthotto-resnet"
channels = [2]
[levels.fine]
model = {{ layers = 4 }}
[levels.a]
h = 2.0
model = {{ layers = 2 }}
[levels.b]
h = 2.0
model = {{ layers = 2 }}
[levels.coarse]
h = 4.0
model = {{ layers = 1 }}
[transfer]
rules = {{ "blocks.*.layers.*" = "depth.constant" }}
[[edges]]
coarse = "coarse"
fine = "a"
[[edges]]
coarse = "coarse"
fine = "b"
[[edges]]
coarse = "a"
fine = "fine"
[[edges]]
coarse = "b"
fine = "fine"
[mlsgd]
{mlsgd}
"""


@pytest.fixture(scope="module")
def quick() -> mlsgd_dsl.Compiled:
    return mlsgd_dsl.compile(mlsgd_dsl.load(QUICKSTART))


@pytest.fixture(scope="module")
def quick_linear() -> mlsgd_dsl.Compiled:
    return mlsgd_dsl.compile(mlsgd_dsl.load(QUICKSTART, overrides=LINEAR))


def random_state(c: mlsgd_dsl.Compiled, level: str, seed: int) -> dict[str, torch.Tensor]:
    """Random float64 parameters (a step, a gradient) of one level."""
    g = torch.Generator().manual_seed(seed)
    node = c.nodes[level]
    return {n: torch.randn(tuple(node.shapes[n]), generator=g, dtype=torch.float64)
            for n in node.parameters}


def layer_stack(sd: dict, block: int, suffix: str) -> torch.Tensor:
    """The layers of one residual block as rows: ``(layers, numel)``."""
    layers = sorted(int(n.split(".")[3]) for n in sd
                    if n.startswith(f"blocks.{block}.layers.") and n.endswith(suffix))
    return torch.stack([sd[f"blocks.{block}.layers.{i}.{suffix}"].flatten() for i in layers])


def constant_p(n: int) -> torch.Tensor:
    """Thesis 4.2.2, constant interpolation: fine layers 2i and 2i+1 are coarse layer i."""
    p = torch.zeros(2 * n, n, dtype=torch.float64)
    for i in range(n):
        p[2 * i, i] = p[2 * i + 1, i] = 1
    return p


def linear_p(n: int) -> torch.Tensor:
    """Thesis 4.2.2, linear: w2_{2i-1} = w1_i, w2_{2i} = ½(w1_i + w1_{i+1}), last = w1_n."""
    p = torch.zeros(2 * n, n, dtype=torch.float64)
    for i in range(n):
        p[2 * i, i] = 1
        nxt = min(i + 1, n - 1)
        p[2 * i + 1, i] += 0.5
        p[2 * i + 1, nxt] += 0.5
    return p


def is_layer(name: str) -> bool:
    return name.startswith("blocks.")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- graph


def test_graph_nodes_edges_and_attributes(quick) -> None:
    g = quick.graph
    assert set(g.nodes) == {"fine", "mid", "coarse"}
    assert set(g.edges) == {("coarse", "mid"), ("mid", "fine")}
    assert [g.nodes[n]["h"] for n in ("coarse", "mid", "fine")] == [4.0, 2.0, 1.0]
    assert all(g.nodes[n]["input_shape"] == (1, 16, 16) for n in g)
    assert all(g.nodes[n]["family"] == "ruthotto-resnet" for n in g)
    params = [g.nodes[n]["parameters"] for n in ("coarse", "mid", "fine")]
    flops = [g.nodes[n]["flops"] for n in ("coarse", "mid", "fine")]
    assert params == sorted(params) and len(set(params)) == 3
    assert flops[0] < flops[1] < flops[2]
    edge = g.edges["mid", "fine"]["transfer"]
    assert isinstance(edge, EdgeTransfer) and edge is quick.edge("mid", "fine")
    assert (edge.coarse, edge.fine, edge.h_coarse, edge.h_fine) == ("mid", "fine", 2.0, 1.0)
    assert {(b.pattern, b.rule) for b in edge.full} == {("blocks.*.layers.*", "depth.constant"),
                                                        ("*", "identity")}
    # every tensor of both levels is in exactly one group
    fine_names = [n for b in edge.full for n in b.operator.spec.fine]
    assert sorted(fine_names) == sorted(quick.nodes["fine"].shapes)


def test_levels_coarsest_first_and_finest(quick) -> None:
    assert quick.levels == ["coarse", "mid", "fine"]
    assert quick.finest == "fine"
    assert quick.paths == [["coarse", "mid", "fine"]]
    assert [r["level"] for r in quick.describe()] == quick.levels


def test_thesis_depth_parameter_counts() -> None:
    c = mlsgd_dsl.compile(mlsgd_dsl.load(DEPTH))
    counts = {n: c.nodes[n].n_parameters for n in c.levels}
    assert counts == {"coarse": 141514, "mid": 238730, "fine": 433162}  # Table 4.1
    assert c.graph.nodes["fine"]["input_shape"] == (3, 32, 32)
    fine = c.model("fine")
    assert sum(p.numel() for p in fine.parameters()) == 433162


def test_model_is_fresh_and_matches_the_node(quick) -> None:
    a, b = quick.model("mid"), quick.model("mid")
    assert a is not b
    assert {n: t.shape for n, t in a.state_dict().items()} == dict(quick.nodes["mid"].shapes)
    name = "blocks.0.layers.0.conv.weight"
    assert not torch.equal(a.state_dict()[name], b.state_dict()[name])  # drawn afresh
    assert a.state_dict()[name].device.type == "cpu"


def test_config_hash_follows_the_resolved_configuration(quick) -> None:
    again = mlsgd_dsl.compile(mlsgd_dsl.load(QUICKSTART))
    other = mlsgd_dsl.compile(mlsgd_dsl.load(QUICKSTART, overrides={"mlsgd.cycles": 2}))
    assert again.config_hash() == quick.config_hash() != other.config_hash()
    assert quick.resolved()["levels"]["mid"]["model"]["layers"] == 2


# --------------------------------------------------------------------------- transfers


def test_transfer_composes_along_the_path(quick) -> None:
    t = quick.transfer("coarse", "fine")
    assert isinstance(t, Transfer) and t.path == ["coarse", "mid", "fine"]
    assert (t.h_coarse, t.h_fine) == (4.0, 1.0)
    cm, mf = quick.edge("coarse", "mid"), quick.edge("mid", "fine")
    x, y = random_state(quick, "coarse", 0), random_state(quick, "fine", 1)
    for got, want in [(t.prolongate(x), mf.prolongate(cm.prolongate(x))),
                      (t.restrict(y), cm.restrict(mf.restrict(y))),
                      (t.adjoint(y), cm.adjoint(mf.adjoint(y))),
                      (t.transpose(y), cm.transpose(mf.transpose(y)))]:
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in got)
    assert quick.transfer("coarse", "fine") is t  # cached
    via = quick.transfer("coarse", "fine", via=["coarse", "mid", "fine"])
    assert all(torch.equal(via.prolongate(x)[n], t.prolongate(x)[n]) for n in y)


def test_composed_adjoint_identity(quick) -> None:
    # h_fine <P x, y> = h_coarse <x, P* y> with P* = (h_fine/h_coarse) Pᵀ along the path
    t = quick.transfer("coarse", "fine")
    x, y = random_state(quick, "coarse", 2), random_state(quick, "fine", 3)
    px, pstar = t.prolongate(x), t.adjoint(y)
    lhs = 1.0 * sum((px[n] * y[n]).sum() for n in y)
    rhs = 4.0 * sum((x[n] * pstar[n]).sum() for n in x)
    assert torch.isclose(lhs, rhs, rtol=1e-12)
    pt = t.transpose(y)
    assert all(close(pstar[n], 0.25 * pt[n]) for n in x)


def test_no_transfer_from_fine_to_coarse(quick) -> None:
    with pytest.raises(KeyError, match="no path from 'fine' up to 'coarse'"):
        quick.transfer("fine", "coarse")


def test_whole_state_dicts_carry_buffers(quick) -> None:
    coarse = quick.model("mid")
    with torch.no_grad():
        coarse.opening.bn.running_mean.uniform_()
    coarse.opening.bn.num_batches_tracked.fill_(7)
    sd = coarse.state_dict()
    edge = quick.edge("mid", "fine")
    fine_sd = edge.prolongate(sd)
    assert fine_sd.keys() == set(quick.nodes["fine"].shapes)
    fine = quick.model("fine")
    fine.load_state_dict(fine_sd)  # strict: every parameter and buffer, right shapes
    assert torch.equal(fine.opening.bn.running_mean, coarse.opening.bn.running_mean)
    assert fine_sd["opening.bn.num_batches_tracked"].dtype == torch.int64
    assert int(fine_sd["opening.bn.num_batches_tracked"]) == 7
    back = edge.adjoint(fine_sd)  # counters are copied, never scaled
    assert int(back["opening.bn.num_batches_tracked"]) == 7
    assert torch.equal(back["fc.bias"], 0.5 * fine_sd["fc.bias"])
    assert edge.restrict(fine_sd).keys() == sd.keys()


def test_parameters_only_state_dicts(quick) -> None:
    edge = quick.edge("mid", "fine")
    x = random_state(quick, "mid", 4)
    assert edge.prolongate(x).keys() == set(quick.nodes["fine"].parameters)
    y = random_state(quick, "fine", 5)
    assert edge.restrict(y).keys() == set(quick.nodes["mid"].parameters)
    assert edge.adjoint(y).keys() == set(quick.nodes["mid"].parameters)
    del x["fc.bias"]
    with pytest.raises(KeyError, match="does not fit level 'mid'"):
        edge.prolongate(x)
    with pytest.raises(KeyError, match="does not fit level 'fine'"):
        edge.restrict({**y, "extra": torch.zeros(1)})


# --------------------------------------------------------------------------- thesis matrices


@pytest.mark.parametrize(("coarse", "fine", "p", "scale", "h_ratio"), [
    ("mid", "fine", constant_p(2), 0.5, 0.5),
    ("coarse", "mid", constant_p(1), 0.5, 0.5),
    # composed: P = P_mf P_cm (all ones), R = ½P_cmᵀ ½P_mfᵀ = ¼Pᵀ, P* = (1/4)Pᵀ
    ("coarse", "fine", constant_p(2) @ constant_p(1), 0.25, 0.25),
])
def test_constant_interpolation_matches_the_thesis(quick, coarse, fine, p, scale,
                                                   h_ratio) -> None:
    t = quick.transfer(coarse, fine)
    x, y = random_state(quick, coarse, 6), random_state(quick, fine, 7)
    px, ry, pstar = t.prolongate(x), t.restrict(y), t.adjoint(y)
    assert torch.equal(constant_p(2) @ constant_p(1), torch.ones(4, 1, dtype=torch.float64))
    for block in range(2):
        for suffix in SUFFIXES:
            xs, ys = layer_stack(x, block, suffix), layer_stack(y, block, suffix)
            assert close(layer_stack(px, block, suffix), p @ xs)
            assert close(layer_stack(ry, block, suffix), scale * p.T @ ys)  # R = ½Pᵀ
            assert close(layer_stack(pstar, block, suffix), h_ratio * p.T @ ys)  # h_f/h_c Pᵀ
    for name in (n for n in x if not is_layer(n)):  # identity: P = R = I, P* = h_f/h_c I
        assert torch.equal(px[name], x[name])
        assert torch.equal(ry[name], y[name])
        assert close(pstar[name], h_ratio * y[name])


def test_mid_to_fine_adjoint_is_half_the_transpose_and_equals_r(quick) -> None:
    # h = 1/2: P* = (h_fine/h_coarse) Pᵀ = ½ Pᵀ, which for constant interpolation is R
    edge = quick.edge("mid", "fine")
    y = random_state(quick, "fine", 8)
    pstar, r = edge.adjoint(y), edge.restrict(y)
    assert all(close(pstar[n], r[n]) for n in r if is_layer(n))


def test_r_is_a_left_inverse_of_constant_p(quick) -> None:
    t = quick.transfer("coarse", "fine")
    x = random_state(quick, "coarse", 9)
    rpx = t.restrict(t.prolongate(x))
    assert all(close(rpx[n], x[n]) for n in x)
    assert t.left_inverse


@pytest.mark.parametrize(("coarse", "fine", "n"), [("mid", "fine", 2), ("coarse", "mid", 1)])
def test_linear_interpolation_matches_the_thesis(quick_linear, coarse, fine, n) -> None:
    edge = quick_linear.edge(coarse, fine)
    assert {b.rule for b in edge.full} == {"depth.linear", "identity"}
    x, y = random_state(quick_linear, coarse, 10), random_state(quick_linear, fine, 11)
    p = linear_p(n)
    px, ry, pstar = edge.prolongate(x), edge.restrict(y), edge.adjoint(y)
    for block in range(2):
        for suffix in SUFFIXES:
            ys = layer_stack(y, block, suffix)
            assert close(layer_stack(px, block, suffix), p @ layer_stack(x, block, suffix))
            assert close(layer_stack(ry, block, suffix), 0.5 * p.T @ ys)  # thesis R = ½Pᵀ
            assert close(layer_stack(pstar, block, suffix), 0.5 * p.T @ ys)
    assert not quick_linear.transfer("coarse", "fine").left_inverse


# --------------------------------------------------------------------------- paths


def test_list_of_paths_alternates_by_cycle() -> None:
    h = mlsgd_dsl.load(QUICKSTART, overrides={"mlsgd.path": [["mid", "fine"],
                                                             ["coarse", "mid", "fine"]]})
    c = mlsgd_dsl.compile(h)
    assert [c.path(i) for i in range(4)] == [["mid", "fine"], ["coarse", "mid", "fine"]] * 2
    c.path(0).append("x")
    assert c.path(2) == ["mid", "fine"]  # a copy


def test_graph_that_is_not_a_chain_needs_a_path() -> None:
    h = mlsgd_dsl.loads(DIAMOND.format(mlsgd=""))
    with pytest.raises(ConfigError, match=r"^<string>: mlsgd.path: the level graph is not a "
                                          r"chain"):
        mlsgd_dsl.compile(h)


def test_diamond_with_alternating_paths() -> None:
    text = DIAMOND.format(mlsgd='path = [["coarse", "a", "fine"], ["coarse", "b", "fine"]]')
    c = mlsgd_dsl.compile(mlsgd_dsl.loads(text))
    assert c.levels == ["coarse", "b", "a", "fine"]  # file order reversed among equals
    assert c.finest == "fine"
    assert [c.path(i)[1] for i in range(3)] == ["a", "b", "a"]
    assert sorted(c.all_paths("coarse", "fine")) == [["coarse", "a", "fine"],
                                                      ["coarse", "b", "fine"]]
    via_a = c.transfer("coarse", "fine", via=["coarse", "a", "fine"])
    via_b = c.transfer("coarse", "fine", via=["coarse", "b", "fine"])
    x = random_state(c, "coarse", 12)
    pa, pb = via_a.prolongate(x), via_b.prolongate(x)
    assert via_a.path != via_b.path and all(torch.equal(pa[n], pb[n]) for n in pa)


def test_sgd_method_needs_no_chain() -> None:
    c = mlsgd_dsl.compile(mlsgd_dsl.loads(DIAMOND.format(mlsgd='method = "sgd"')))
    assert c.paths == [["fine"]]


def test_missing_default_rule_leaves_parameters_uncovered() -> None:
    h = mlsgd_dsl.load(QUICKSTART)
    h.transfer.default = None  # not expressible in TOML (see test_malformed: no-rule-covers)
    with pytest.raises(ConfigError, match=r"transfer.rules: no rule covers \['opening"):
        mlsgd_dsl.compile(h)
