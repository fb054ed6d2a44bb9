"""Non-local block, embedded-Gaussian form (Wang et al. 2018, "Non-local Neural Networks", arXiv:1711.07971).

The file is `non_local.py` because `nonlocal` is a Python keyword.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attention3d.layers import _factory


class NonLocalBlock(nn.Module):
    """z = x + norm(W_z y), y_i = sum_j softmax_j(theta(x_i) . phi(x_j) / sqrt(d)) g(x_j).

    Eq. (1) with the embedded Gaussian f = exp(theta^T phi) of eq. (3), whose normalisation 1/C(x) makes it a
    softmax over j (Sec. 3.2); the residual of eq. (6). theta, phi and g are 1x1(x1) convolutions to
    d = `inter_channels` (default max(1, C // 2), the bottleneck of Sec. 3.3); the logits are scaled by
    1/sqrt(d) as in scaled dot-product attention, which the paper does not have.

    `subsample` is the trick of Sec. 3.3: phi and g (not theta) are max-pooled with kernel 2, so the map is
    N x N/2^k (k the number of pooled axes) rather than N x N. An axis of size 1 cannot be halved: it gets a
    kernel of 1; pooling uses ceil_mode so that an odd axis keeps its last slice (size s -> ceil(s / 2)).

    `norm` follows W_z and its weight (and bias) start at 0, as the paper zero-initialises the scale of the BN
    after W_z (Sec. 4), so the block is exactly the identity at initialisation; the norm must therefore be
    affine (`_factory.norm` makes "instance" affine).

    The attention runs through `F.scaled_dot_product_attention` when `fused` is True (the default) and
    through the explicit softmax(Q K^T / sqrt(d)) V otherwise; both give the same result.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        inter_channels: int | None = None,
        subsample: bool = True,
        norm: str | tuple = "instance",
    ) -> None:
        super().__init__()
        self.spatial_dims = _factory.check_spatial_dims(spatial_dims)
        inter = _factory.inter_channels(in_channels, inter_channels)
        self.inter_channels = inter
        self.subsample = subsample
        self.fused = True
        self.theta = _factory.conv(spatial_dims, in_channels, inter, kernel_size=1, bias=True)
        self.phi = _factory.conv(spatial_dims, in_channels, inter, kernel_size=1, bias=True)
        self.g = _factory.conv(spatial_dims, in_channels, inter, kernel_size=1, bias=True)
        self.w_z = _factory.conv(spatial_dims, inter, in_channels, kernel_size=1, bias=True)
        self.norm = _factory.norm(norm, spatial_dims, in_channels)
        if getattr(self.norm, "weight", None) is None:
            raise ValueError(
                f"NonLocalBlock needs an affine norm (its weight starts at 0 so the block starts as the identity); "
                f"{norm!r} has no weight"
            )
        nn.init.zeros_(self.norm.weight)
        if getattr(self.norm, "bias", None) is not None:
            nn.init.zeros_(self.norm.bias)

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        kernel = tuple(2 if s >= 2 else 1 for s in t.shape[2:])
        if all(k == 1 for k in kernel):
            return t
        pool = F.max_pool2d if self.spatial_dims == 2 else F.max_pool3d
        return pool(t, kernel_size=kernel, stride=kernel, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, N, d) with N = prod(S)
        phi, g = self.phi(x), self.g(x)
        if self.subsample:
            phi, g = self._pool(phi), self._pool(g)
        phi = phi.flatten(2).transpose(1, 2)  # (B, M, d) with M = N, or prod(ceil(S / 2)) when subsampled
        g = g.flatten(2).transpose(1, 2)  # (B, M, d)
        if self.fused:
            # (B, 1, N, d): one head; the default scale of SDPA is 1/sqrt(d), no dropout. PyTorch's CPU flash
            # kernel is taken only for contiguous inputs; otherwise SDPA silently builds the N x M map.
            q, k, v = (t.unsqueeze(1).contiguous() for t in (theta, phi, g))
            y = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        else:
            f = torch.softmax(theta @ phi.transpose(1, 2) / math.sqrt(self.inter_channels), dim=-1)  # (B, N, M)
            y = f @ g  # (B, N, d)
        y = y.transpose(1, 2).reshape(b, self.inter_channels, *spatial)  # (B, d, *S)
        return x + self.norm(self.w_z(y))
