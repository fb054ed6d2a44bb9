"""Expectation-maximisation attention unit of EMANet (Li et al. 2019, arXiv:1907.13426, Sec. 3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from attention3d.layers._factory import check_spatial_dims, conv
from attention3d.layers._factory import norm as norm_layer


def _l2norm(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t / (1e-6 + t.norm(dim=dim, keepdim=True))


class EMAttention(nn.Module):
    """EMAU: attention over K bases found by a few EM iterations instead of over all N positions.

    With x' = conv_in(x) as (B, C, N) and bases mu (B, C, K) starting from the running buffer `mu`,
    `stages` iterations under no_grad alternate

        E-step: z  = softmax_K(x'^T mu)                (B, N, K) responsibilities
        M-step: mu = x' z / (1e-6 + sum_N z), then L2-normalised over C

    and the input is re-estimated from the final bases and responsibilities (with grad):

        y = ReLU(norm(conv_out(ReLU(mu z^T))) + x)

    Cost O(N K T C) rather than the O(N^2 C) of non-local attention. As in the paper, the EM iterations are
    not back-propagated through, so conv_in and the bases receive no gradient; conv_out and the norm learn.
    In training mode the buffer follows the batch mean of the final bases with a moving average,
    mu <- momentum * mu + (1 - momentum) * mean_B(mu_T); eval mode leaves it unchanged.

    The EM iterations always run in float32 (or wider), even under autocast: they are sensitive to rounding
    (unscaled dot products into a softmax, sums over all N positions), which bfloat16 / float16 would
    feed back into the bases at every stage.
    """

    mu: torch.Tensor

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        bases: int = 64,
        stages: int = 3,
        momentum: float = 0.9,
        norm: str | tuple = "instance",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if bases < 1:
            raise ValueError(f"bases must be >= 1, got {bases}")
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.bases = bases
        self.stages = stages
        self.momentum = momentum
        mu = torch.randn(1, channels, bases) * math.sqrt(2.0 / bases)  # (1, C, K) ~ N(0, sqrt(2/K))
        self.register_buffer("mu", _l2norm(mu, dim=1))
        self.conv_in = conv(spatial_dims, channels, channels, kernel_size=1, bias=True)
        self.conv_out = conv(spatial_dims, channels, channels, kernel_size=1, bias=False)
        self.norm = norm_layer(norm, spatial_dims, channels)

    def em(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the EM iterations on feats (B, C, N); returns the final bases mu (B, C, K) and the
        responsibilities z (B, N, K) of the last E-step, both detached and at least float32."""
        dtype = torch.promote_types(feats.dtype, torch.float32)
        with torch.no_grad(), torch.autocast(device_type=feats.device.type, enabled=False):
            feats = feats.to(dtype)
            mu = self.mu.to(dtype).expand(feats.shape[0], -1, -1)  # (B, C, K)
            for _ in range(self.stages):
                z = torch.softmax(torch.bmm(feats.transpose(1, 2), mu), dim=2)  # (B, N, K)
                z_ = z / (1e-6 + z.sum(dim=1, keepdim=True))  # (B, N, K), each basis' weights sum to 1 over N
                mu = _l2norm(torch.bmm(feats, z_), dim=1)  # (B, C, K)
        return mu, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.conv_in(x).flatten(2)  # (B, C, N) with N = prod(S)
        mu, z = self.em(feats)
        if self.training:
            with torch.no_grad():
                batch_mu = mu.mean(dim=0, keepdim=True).to(self.mu.dtype)  # (1, C, K)
                self.mu.mul_(self.momentum).add_(batch_mu, alpha=1 - self.momentum)
        recon = torch.relu(torch.bmm(mu, z.transpose(1, 2)))  # (B, C, N)
        # Back from the loop's float32 to x's dtype, so that a bf16 / fp16 model's conv_out accepts it.
        recon = recon.reshape(x.shape[0], -1, *x.shape[2:]).to(x.dtype)  # (B, C, *S)
        return torch.relu(self.norm(self.conv_out(recon)) + x)
