"""Built-in transfer rules, registered through pluggy like any third-party plugin."""

from __future__ import annotations

from ..api import NoOptions, TransferRule
from ..hookspecs import hookimpl
from ..transfers.depth import DepthOptions, LinearDepthOptions, bind_constant, bind_linear
from ..transfers.identity import bind_identity
from ..transfers.kernel_basis import bind_kernel_basis
from ..transfers.position import PositionOptions, bind_position
from ..transfers.resnet_depth import ResNetDepthOptions, bind_resnet_depth
from ..transfers.resolution import ResolutionOptions, bind_resolution

MLSGD_DSL_API = ">=1.0"


@hookimpl
def mlsgd_transfer_rules() -> list[TransferRule]:
    return [
        TransferRule(
            name="identity",
            options=NoOptions,
            bind=bind_identity,
            description="Same names and shapes on both levels; P = R = Pᵀ = I "
                        "(biases, norms, opening/connecting layers, BatchNorm buffers).",
        ),
        TransferRule(
            name="depth.constant",
            options=DepthOptions,
            bind=bind_constant,
            description="Residual layers along the layer index (thesis 4.2.2): each coarse "
                        "layer copied to `factor` fine layers; R = Pᵀ/factor (the mean), "
                        "R∘P = I. Options: index ('layers'), factor (2).",
        ),
        TransferRule(
            name="depth.linear",
            options=LinearDepthOptions,
            bind=bind_linear,
            description="Residual layers along the layer index (thesis 4.2.2): linear "
                        "interpolation between neighbouring coarse layers, last one repeated. "
                        "restriction='transpose' (default, thesis R = Pᵀ/factor, not a left "
                        "inverse) or 'injection' (keep the copied layers, R∘P = I). "
                        "Options: index, factor, restriction.",
        ),
        TransferRule(
            name="kernel_basis",
            options=NoOptions,
            bind=bind_kernel_basis,
            description="2×2 → 3×3 convolution kernels (thesis 4.3.2): P k = Σ k[a,b]·B_ab "
                        "with B_ab = ¼ on the 2×2 block at (a,b); R = the B-coordinates in the "
                        "basis (e01, e10, e11, e12, e21, B00, B01, B10, B11), R∘P = I. Accepts "
                        "fine kernels (Co,Ci,3,3) or their KernelBasisParametrization "
                        "coefficients (Co,Ci,9). Only 2×2 → 3×3 is supported.",
        ),
        TransferRule(
            name="resolution",
            options=ResolutionOptions,
            bind=bind_resolution,
            description="Final linear layer weight (out, C·H·W) between image resolutions "
                        "(thesis 4.3.2): reshaped to (out, C, H, W) via the model's "
                        "input_shape hint or coarse_shape/fine_shape; R = avgpool/scale, "
                        "P = scale·(nearest | bilinear). scale=1 (default) is the thesis' "
                        "operator; with nearest P, average and sum pooling differ by factor² in "
                        "what the network computes, and scale='auto' (= 1/factor²) preserves "
                        "the function of a network whose feature maps are upsampled.",
        ),
        TransferRule(
            name="resnet.depth",
            options=ResNetDepthOptions,
            bind=bind_resnet_depth,
            description="torchvision's ResNet layout (layerK.I.conv1/bn1/conv2/bn2, "
                        "BatchNorm buffers included): along each stage, every block that keeps "
                        "its shape copied to `factor` fine blocks (R: their mean, R∘P = I); a "
                        "first block with downsample is copied once. resnet18 [2,2,2,2] -> "
                        "[4,3,3,3]. Options: factor (2).",
        ),
        TransferRule(
            name="position_embedding",
            options=PositionOptions,
            bind=bind_position,
            description="A transformer's position embedding (1, prefix + H·W, D) between "
                        "patch grids factor× apart: P = scale·(nearest | bilinear) on the grid, "
                        "R = average pooling/scale, prefix (class) tokens copied; nearest: "
                        "R∘P = I and Pᵀ = sum pooling·scale. Grid and prefix from the model's "
                        "transfer_hints (the vit family) or the options coarse_grid, "
                        "fine_grid, prefix.",
        ),
    ]
