"""Additive attention gate of Attention U-Net (Oktay et al. 2018, arXiv:1804.03999, Sec. 2, "grid attention")."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from attention3d.layers._factory import check_spatial_dims, conv, resize
from attention3d.layers._factory import inter_channels as embedding_width
from attention3d.layers._factory import norm as norm_layer


class AttentionGate(nn.Module):
    """Gates a skip connection `x` with a coarser gating signal `g`.

    With theta a strided convolution of x (kernel = stride = `subsample`, no bias) and phi a 1x1x1
    convolution of g (with bias, the paper's b_g), resized to theta's grid:

        alpha = sigmoid(psi(ReLU(theta(x) + phi(g))))      psi: 1x1x1 conv to one channel, with bias (b_psi)
        y     = W(resize(alpha, x's grid) * x)             W: 1x1x1 conv C -> C, then norm

    `forward(x, g)` returns `(y, alpha)`, alpha of shape (B, 1, *S_x) with values in (0, 1). theta has no
    padding, so an odd extent of x is floored on the coarse grid; alpha is resized back to x's grid anyway.
    W's convolution has no bias because the norm's shift replaces it.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        gating_channels: int,
        inter_channels: int | None = None,
        subsample: int | tuple[int, ...] = 2,
        norm: str | tuple = "instance",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        # An int, or one entry per axis for anisotropic grids (e.g. (2, 2, 1) on thick slices).
        subsample = tuple(subsample) if isinstance(subsample, (tuple, list)) else (subsample,) * spatial_dims
        if len(subsample) != spatial_dims or min(subsample) < 1:
            raise ValueError(f"subsample must be >= 1, one value or one per spatial axis, got {subsample}")
        inter_channels = embedding_width(in_channels, inter_channels)
        self.in_channels = in_channels
        self.gating_channels = gating_channels
        self.inter_channels = inter_channels
        self.subsample = subsample
        # Built directly rather than with `conv`: that helper pads kernel // 2, and theta must not pad.
        self.theta = Conv[Conv.CONV, spatial_dims](
            in_channels, inter_channels, kernel_size=subsample, stride=subsample, padding=0, bias=False
        )
        self.phi = conv(spatial_dims, gating_channels, inter_channels, kernel_size=1, bias=True)
        self.psi = conv(spatial_dims, inter_channels, 1, kernel_size=1, bias=True)
        self.W = nn.Sequential(
            conv(spatial_dims, in_channels, in_channels, kernel_size=1, bias=False),
            norm_layer(norm, spatial_dims, in_channels),
        )

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta_x = self.theta(x)  # (B, inter, *S_x // subsample)
        phi_g = resize(self.phi(g), theta_x.shape[2:])  # (B, inter, *S_theta): bilinear / trilinear
        f = torch.relu(theta_x + phi_g)
        alpha = torch.sigmoid(self.psi(f))  # (B, 1, *S_theta)
        alpha = resize(alpha, x.shape[2:])  # (B, 1, *S_x)
        y = self.W(_scale(x, alpha))  # (B, C, *S_x)
        return y, alpha


def _scale(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """alpha * x, alpha broadcast over the channels. Where the channels are the innermost dimension (channels-last
    inference on CPU), a broadcast along that dimension walks memory badly, so x is multiplied by alpha's expansion
    laid out like x instead (docs/benchmarks.md, "design measurements")."""
    if x.stride(1) == 1 and x.shape[1] > 1:
        return torch.empty_like(x).copy_(alpha.expand_as(x)).mul_(x)
    return alpha * x
