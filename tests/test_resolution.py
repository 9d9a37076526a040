"""The resolution hierarchy (thesis 4.3): shipped files, kernel-basis operators through the
compiled edge, avgpool level data, and malformed resolution hierarchies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlsgd_dsl.compiler import compile as compile_hierarchy
from mlsgd_dsl.loader import load
from mlsgd_dsl.validation import validate

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "hierarchies" / "resolution-cifar10.toml"
FMNIST = ROOT / "hierarchies" / "resolution-fashion-mnist.toml"

KERNEL = "blocks.1.layers.2.conv.weight"  # any residual kernel; block 1 has 64 channels
COEFFS = "blocks.1.layers.2.conv.parametrizations.weight.original"

# --------------------------------------------------------------------------- thesis matrices
# The four kernels the coarse 2x2 kernel entries w11, w12, w21, w22 stand for on the fine level
# (thesis 4.3.2, "the lower level approximately learns the weights for the following
# convolution kernels"), in that order.
THESIS_BLOCK_KERNELS = torch.tensor([
    [[1, 1, 0], [1, 1, 0], [0, 0, 0]],
    [[0, 1, 1], [0, 1, 1], [0, 0, 0]],
    [[0, 0, 0], [1, 1, 0], [1, 1, 0]],
    [[0, 0, 0], [0, 1, 1], [0, 1, 1]],
], dtype=torch.float64) / 4
# The completing unit kernels c12, c21, c22, c23, c32 (1-based (row, column) of the 1).
THESIS_UNITS = [(1, 2), (2, 1), (2, 2), (2, 3), (3, 2)]
# P as a 9x4 matrix from the coarse entries (w11, w12, w21, w22) to the row-major fine kernel.
P_MATRIX = THESIS_BLOCK_KERNELS.reshape(4, 9).T
# R (4x9, on the row-major fine kernel), worked out by hand from the basis: each corner of
# the 3x3 kernel lies in exactly one 1/4-block and in no unit kernel, so w_ab = 4 K[corner].
R_MATRIX = torch.zeros(4, 9, dtype=torch.float64)
for _row, _corner in enumerate((0, 2, 6, 8)):
    R_MATRIX[_row, _corner] = 4.0
# The thesis' P1 / R1 on the nine coordinates (w12, w21, w22, w23, w32, w11, w12, w21, w22):
# P1 pads the four coarse weights with five zeros in front, R1 reads the last four.
P1_MATRIX = torch.cat([torch.zeros(5, 4), torch.eye(4)]).double()
R1_MATRIX = P1_MATRIX.T


def thesis_basis() -> torch.Tensor:
    """The thesis' basis of 3x3 kernels as the columns of a 9x9 matrix, in its order."""
    units = torch.zeros(5, 3, 3, dtype=torch.float64)
    for c, (i, j) in enumerate(THESIS_UNITS):
        units[c, i - 1, j - 1] = 1.0
    return torch.cat([units, THESIS_BLOCK_KERNELS]).reshape(9, 9).T


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compiled() -> dict[str, object]:
    """The shipped files, compiled once (plus the plain-kernel and h_coarse = 2 variants)."""
    return {
        "cifar": compile_hierarchy(load(CIFAR)),
        "fmnist": compile_hierarchy(load(FMNIST)),
        "cifar-plain": compile_hierarchy(load(CIFAR, ["levels.fine.model.kernel_basis=false"])),
        "cifar-h2": compile_hierarchy(load(CIFAR, ["levels.coarse.h=2.0"])),
        "cifar-plain-h2": compile_hierarchy(load(
            CIFAR, ["levels.coarse.h=2.0", "levels.fine.model.kernel_basis=false"])),
    }


def coarse_params(c, fill: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Zero float64 parameters of the coarse level, with some tensors replaced."""
    node = c.nodes["coarse"]
    params = {n: torch.zeros(node.shapes[n], dtype=torch.float64) for n in node.parameters}
    params.update(fill or {})
    return params


def fine_params(c, fill: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    node = c.nodes["fine"]
    params = {n: torch.zeros(node.shapes[n], dtype=torch.float64) for n in node.parameters}
    params.update(fill or {})
    return params


# --------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("key, fine, coarse", [
    ("cifar", 560_570, 241_850),   # thesis Table 4.4
    ("fmnist", 266_890, 96_010),   # channels 32/64 (see the file's comment)
])
def test_shipped_files_compile_with_their_parameter_counts(compiled, key, fine, coarse):
    c = compiled[key]
    assert c.levels == ["coarse", "fine"]
    assert c.nodes["fine"].n_parameters == fine
    assert c.nodes["coarse"].n_parameters == coarse
    assert c.h("fine") == c.h("coarse") == 1.0
    assert c.nodes["coarse"].input_shape[1:] == tuple(s // 2 for s in
                                                      c.nodes["fine"].input_shape[1:])


def test_cifar_counts_hold_with_plain_kernels_too(compiled):
    c = compiled["cifar-plain"]
    assert (c.nodes["fine"].n_parameters, c.nodes["coarse"].n_parameters) == (560_570, 241_850)
    assert KERNEL in c.nodes["fine"].shapes and COEFFS not in c.nodes["fine"].shapes


def test_cifar_settings_are_the_thesis_resolution_experiment(compiled):
    m = compiled["cifar"].hierarchy.mlsgd
    assert (m.cycles, m.epochs, m.batch_size) == (23, {"fine": 7.0, "coarse": 3.0}, 250)
    assert m.lr == 0.1 and m.schedule.kind == "step"
    assert (m.schedule.factor, m.schedule.every) == (0.7, 50.0)
    assert m.correction == "none"


@pytest.mark.parametrize("key", ["cifar", "fmnist"])
def test_shipped_files_validate_with_the_numerical_rows(compiled, key):
    report = validate(compiled[key])
    assert report.ok, report.table()
    assert all(r.status == "pass" for r in report.rows), report.table()
    names = [r.name for r in report.rows]
    for group in ("[kernel_basis]", "[resolution]"):
        for check in ("shapes", "R∘P = I", "adjoint"):
            assert any(group in n and n.endswith(check) for n in names), (group, check)
    gap = [r for r in report.rows if r.name.endswith("function preservation")]
    assert len(gap) == 1 and "relative output gap" in gap[0].detail


def _gap(report) -> float:
    row = next(r for r in report.rows if r.name.endswith("function preservation"))
    return float(row.detail.split("relative output gap ")[1].split()[0])


def test_fc_scale_shows_in_the_function_preservation_gap(compiled):
    """Shipped: "auto" (sum pooling); the thesis' scale 1.0 computes ~4x the coarse logits."""
    assert compiled["fmnist"].hierarchy.transfer.rules["fc.weight"].options() == {
        "mode": "nearest", "scale": "auto"}
    thesis = compile_hierarchy(load(FMNIST, ['transfer.rules."fc.weight".scale=1.0']))
    auto_gap, thesis_gap = _gap(validate(compiled["fmnist"])), _gap(validate(thesis))
    assert auto_gap < 1.0 < 2.0 < thesis_gap, (auto_gap, thesis_gap)


def test_validate_cli_passes_on_the_shipped_files(run_cli):
    for path in (CIFAR, FMNIST):
        rc, out, err = run_cli(["validate", path])
        assert rc == 0, err
        assert "0 failed" in out and "function preservation" in out


# --------------------------------------------------------------------------- kernel basis


def test_thesis_basis_is_a_basis_and_r_is_its_block_coordinates():
    basis = thesis_basis()
    assert torch.linalg.matrix_rank(basis) == 9
    # R = the last four rows of the inverse change of basis (the B-coordinates) = R_MATRIX
    torch.testing.assert_close(torch.linalg.inv(basis)[5:], R_MATRIX)
    torch.testing.assert_close(R_MATRIX @ P_MATRIX, torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("a, b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_edge_prolongates_unit_coarse_kernels_to_the_thesis_kernels(compiled, a, b):
    unit = torch.zeros(64, 64, 2, 2, dtype=torch.float64)
    unit[3, 5, a, b] = 1.0
    expected = THESIS_BLOCK_KERNELS[2 * a + b]

    plain = compiled["cifar-plain"].edge("coarse", "fine").prolongate(
        coarse_params(compiled["cifar-plain"], {KERNEL: unit}))
    torch.testing.assert_close(plain[KERNEL][3, 5], expected)
    assert plain[KERNEL].abs().sum() == pytest.approx(1.0)  # nothing else is touched

    c = compiled["cifar"]  # the shipped default: the fine level trains the 9 coordinates
    fine = c.edge("coarse", "fine").prolongate(coarse_params(c, {KERNEL: unit}))
    torch.testing.assert_close(fine[COEFFS][3, 5], P1_MATRIX[:, 2 * a + b])
    # ... and the fine network built from them convolves with the very same thesis kernel
    model = c.model("fine").double()
    model.load_state_dict({**model.state_dict(), **fine})
    torch.testing.assert_close(model.blocks[1].layers[2].conv.weight[3, 5], expected)


def test_edge_p_r_and_adjoint_are_the_thesis_matrices_on_plain_kernels(compiled):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(64, 64, 2, 2, generator=gen, dtype=torch.float64)
    big = torch.randn(64, 64, 3, 3, generator=gen, dtype=torch.float64)
    for key, h_ratio in (("cifar-plain", 1.0), ("cifar-plain-h2", 0.5)):
        edge = compiled[key].edge("coarse", "fine")
        fine = edge.prolongate(coarse_params(compiled[key], {KERNEL: k}))
        torch.testing.assert_close(fine[KERNEL].reshape(64, 64, 9),
                                   k.reshape(64, 64, 4) @ P_MATRIX.T)
        coarse = edge.restrict(fine_params(compiled[key], {KERNEL: big}))
        torch.testing.assert_close(coarse[KERNEL].reshape(64, 64, 4),
                                   big.reshape(64, 64, 9) @ R_MATRIX.T)
        # P* = (h_fine / h_coarse) Pᵀ: a quarter of each 2x2 block's sum, times h_1/h_0
        adjoint = edge.adjoint(fine_params(compiled[key], {KERNEL: big}))
        torch.testing.assert_close(adjoint[KERNEL].reshape(64, 64, 4),
                                   h_ratio * big.reshape(64, 64, 9) @ P_MATRIX)
        assert not torch.allclose(adjoint[KERNEL], h_ratio * coarse[KERNEL])  # R ≠ Pᵀ here
        # R∘P = I through the edge
        back = edge.restrict(fine)
        torch.testing.assert_close(back[KERNEL], k)


def test_edge_p_r_and_adjoint_are_the_thesis_p1_r1_on_coordinates(compiled):
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(64, 64, 2, 2, generator=gen, dtype=torch.float64)
    w = torch.randn(64, 64, 9, generator=gen, dtype=torch.float64)
    for key, h_ratio in (("cifar", 1.0), ("cifar-h2", 0.5)):
        edge = compiled[key].edge("coarse", "fine")
        fine = edge.prolongate(coarse_params(compiled[key], {KERNEL: k}))
        torch.testing.assert_close(fine[COEFFS], k.reshape(64, 64, 4) @ P1_MATRIX.T)
        coarse = edge.restrict(fine_params(compiled[key], {COEFFS: w}))
        torch.testing.assert_close(coarse[KERNEL].reshape(64, 64, 4), w @ R1_MATRIX.T)
        adjoint = edge.adjoint(fine_params(compiled[key], {COEFFS: w}))
        torch.testing.assert_close(adjoint[KERNEL].reshape(64, 64, 4),
                                   h_ratio * w @ P1_MATRIX)


def test_both_parametrisations_restrict_the_same_kernel_alike(compiled):
    """R reads the same four numbers whether the fine kernel is stored plain or in the basis."""
    gen = torch.Generator().manual_seed(2)
    kernel = torch.randn(64, 64, 3, 3, generator=gen, dtype=torch.float64)
    coords = (kernel.reshape(64, 64, 9) @ torch.linalg.inv(thesis_basis()).T)
    torch.testing.assert_close((coords @ thesis_basis().T).reshape(64, 64, 3, 3), kernel)
    plain = compiled["cifar-plain"].edge("coarse", "fine").restrict(
        fine_params(compiled["cifar-plain"], {KERNEL: kernel}))
    basis = compiled["cifar"].edge("coarse", "fine").restrict(
        fine_params(compiled["cifar"], {COEFFS: coords}))
    torch.testing.assert_close(plain[KERNEL], basis[KERNEL])


# --------------------------------------------------------------------------- level data


def test_avgpool_coarsens_the_level_data_like_the_hand_computed_example(tmp_path,
                                                                         tmp_hierarchy):
    image = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    torch.save({"train_x": torch.cat([image, image + 100, image * 2]),
                "train_y": torch.tensor([0, 1, 0]),
                "test_x": -image, "test_y": torch.tensor([1])}, tmp_path / "tiny.pt")
    path = tmp_hierarchy(f"""
        extends = {str(CIFAR)!r}
        name = "tiny-resolution"
        [data]
        source = "tensors"
        options = {{ path = {str(tmp_path / "tiny.pt")!r} }}
        validation = 1
        normalize = false
        augment = {{ flip = false, crop = 0.0 }}
        [model]
        channels = [2, 4]
        layers = 1
        """)
    c = compile_hierarchy(load(path))
    data = c.data()
    # 0  1  2  3        (0+1+4+5)/4 = 2.5    (2+3+6+7)/4 = 4.5
    # 4  5  6  7   ->
    # 8  9 10 11        (8+9+12+13)/4 = 10.5 (10+11+14+15)/4 = 12.5
    # 12 13 14 15
    hand = torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]])
    torch.testing.assert_close(data["coarse"].test_x, -hand)
    fine, coarse = data["fine"], data["coarse"]
    assert coarse.train_x.shape[1:] == (1, 2, 2) and fine.train_x.shape[1:] == (1, 4, 4)
    torch.testing.assert_close(fine.test_x, -image)  # the fine level keeps the originals
    # the training images were image, image + 100 and 2·image: pooling is linear
    by_original = [(image[0], hand[0]), (image[0] + 100, hand[0] + 100),
                   (image[0] * 2, hand[0] * 2)]
    seen = 0
    for split in ("train", "val"):
        xf, xc = getattr(fine, f"{split}_x"), getattr(coarse, f"{split}_x")
        for original, pooled in by_original:
            for n in range(len(xf)):
                if torch.equal(xf[n], original):
                    torch.testing.assert_close(xc[n], pooled)
                    seen += 1
        torch.testing.assert_close(getattr(fine, f"{split}_y"), getattr(coarse, f"{split}_y"))
    assert seen == 3
    assert c.data() is data  # computed once, cached


# --------------------------------------------------------------------------- malformed files


def _extending(tmp_hierarchy, base: Path, body: str) -> Path:
    return tmp_hierarchy(f'extends = {str(base)!r}\n' + body)


@pytest.mark.parametrize("body, expected", [
    pytest.param(
        '[levels.coarse.data]\ncoarsen = [{ method = "avgpool", factor = 3 }]\n',
        ["levels.coarse.data.coarsen[0]", "28x28 is not divisible by factor 3"],
        id="factor-3-on-28x28"),
    pytest.param(
        '[levels.fine.model]\nkernel_basis = false\n'
        '[transfer.rules]\n"blocks.*.layers.*.conv.*" = "identity"\n',
        ['transfer.rules."blocks.*.layers.*.conv.*"', "rule 'identity'",
         "(32, 32, 2, 2) on level 'coarse' but (32, 32, 3, 3) on 'fine'"],
        id="kernel-2-to-3-by-identity"),
    pytest.param(
        '[transfer.rules]\n"blocks.*.layers.*.conv.*" = "identity"\n',
        ['transfer.rules."blocks.*.layers.*.conv.*"', "rule 'identity'",
         "exists on level 'coarse' but not on 'fine'"],
        id="kernel-2-to-coordinates-by-identity"),
    pytest.param(
        '[levels.coarse.model]\nkernel_size = 4\n',
        ['transfer.rules."blocks.*.layers.*.conv.*"', "kernel_basis",
         "must be a 2×2 kernel"],
        id="kernel-4-to-3-by-kernel-basis"),
    pytest.param(
        '[levels.fine.model]\nkernel_size = 5\nkernel_basis = false\n',
        ['transfer.rules."blocks.*.layers.*.conv.*"', "kernel_basis", "5, 5)", "must be"],
        id="kernel-2-to-5-by-kernel-basis"),
    pytest.param(
        '[model]\nchannels = [32, 64, 112]\n',
        ['transfer.rules."fc.weight"', "resolution", "(7, 7)", "(3, 3)",
         "not an integer multiple"],
        id="fc-7x7-vs-3x3"),
])
def test_malformed_resolution_hierarchies_fail_with_a_clear_message(tmp_hierarchy, run_cli,
                                                                    body, expected):
    path = _extending(tmp_hierarchy, FMNIST, body)
    rc, out, err = run_cli(["validate", path])
    assert rc == 2, (out, err)
    assert err.startswith(f"mlsgd-dsl: error: {path}: "), err
    assert "Traceback" not in err and err.count("\n") <= 3, err
    for part in expected:
        assert part in err, (part, err)
