"""Squeeze-and-excitation: channel gating (cSE) and its spatial + channel extension (scSE).

- cSE: Hu et al. 2018, "Squeeze-and-Excitation Networks", arXiv:1709.01507, eqs. (2)-(4).
- scSE: Roy et al. 2018, "Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional
  Networks", MICCAI, arXiv:1803.02579, Sec. 2.
"""

from __future__ import annotations

import torch
from torch import nn

from attention3d.layers._factory import check_spatial_dims, conv


class SqueezeExcitation(nn.Module):
    """Channel squeeze and excitation (cSE).

    z = GAP(x) (eq. 2), s = sigmoid(W2 relu(W1 z + b1) + b2) (eq. 3, with biases as in the reference code),
    out = s_c * x_c (eq. 4). W1 maps C -> max(1, C // reduction), W2 maps back to C. The FCs are
    nn.Linear, so the weights do not depend on `spatial_dims`.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial_axes = tuple(range(2, x.ndim))
        z = x.mean(dim=spatial_axes)  # (B, C): the squeeze
        s = torch.sigmoid(self.fc2(self.act(self.fc1(z))))  # (B, C): the excitation
        return x * s.view(*s.shape, *([1] * len(spatial_axes)))  # (B, C, *S)


class SpatialChannelSqueezeExcitation(nn.Module):
    """Concurrent spatial and channel squeeze and excitation (scSE).

    cSE is `SqueezeExcitation`; sSE gates every position by q = sigmoid(W_s * x + b) with W_s a 1x1(x1)
    convolution C -> 1, out_sSE = q * x. The two recalibrations are aggregated by element-wise addition,
    out = cSE(x) + sSE(x), the addition aggregation of Roy et al. 2018 (arXiv:1803.02579, scSE block).
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.cse = SqueezeExcitation(spatial_dims, channels, reduction)
        self.sse = conv(spatial_dims, channels, 1, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.sigmoid(self.sse(x))  # (B, 1, *S): one gate per position, broadcast over channels
        return self.cse(x) + x * q
