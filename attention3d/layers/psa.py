"""Point-wise spatial attention (Zhao et al. 2018, "PSANet: Point-wise Spatial Attention Network for Scene
Parsing", ECCV), bi-directional: a collect and a distribute branch, extended from 2D to 3D."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attention3d.layers import _factory


def offset_index(grid: Sequence[int]) -> torch.Tensor:
    """(N, N) int64 with N = prod(grid): entry [i, j] is the flat index, in an over-complete map of shape
    (2 G_a - 1 for every axis a), of the relative offset (j - i) + (G - 1). Offset 0 (i == j) is the centre."""
    grid = tuple(grid)
    axes = [torch.arange(g) for g in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))  # (N, D), C order
    centre = torch.tensor([g - 1 for g in grid])
    rel = coords[None, :, :] - coords[:, None, :] + centre  # (N_i, N_j, D): (j - i) + centre, in [0, 2G - 2]
    map_shape = [2 * g - 1 for g in grid]
    strides = torch.tensor([math.prod(map_shape[a + 1 :]) for a in range(len(grid))])
    return (rel * strides).sum(-1)  # (N_i, N_j)


def collect_logits(m: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A_c[b, i, j] = M_i[(j - i) + centre]: the map predicted at the target i says how much it takes from j.

    m: (B, N, P), row i the over-complete map M_i; index: `offset_index(grid)`. Returns (B, N_i, N_j)."""
    return m.gather(2, index.expand(m.shape[0], -1, -1))


def distribute_logits(m: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A_d[b, i, j] = M_j[(i - j) + centre]: the map predicted at the source j says how much it gives to i.

    Same arguments as `collect_logits`. Returns (B, N_i, N_j)."""
    return m.gather(2, index.expand(m.shape[0], -1, -1)).transpose(1, 2)


def _as_grid(grid: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(grid, int):
        grid = (grid,) * spatial_dims
    grid = tuple(grid) if isinstance(grid, Sequence) else (grid,)
    if len(grid) != spatial_dims or not all(isinstance(g, int) and g >= 1 for g in grid):
        raise ValueError(f"grid must be an int >= 1 or {spatial_dims} ints >= 1, got {grid!r}")
    return grid


class PointwiseSpatialAttention(nn.Module):
    """PSANet's bi-directional point-wise spatial attention followed by its head, cat(x, psa) -> conv.

    x (B, C, *S) is first shrunk to the fixed `grid` G (adaptive average pooling on axes larger than G, linear
    interpolation on axes smaller) and reduced by a 1x1 conv-norm-act to d = `inter_channels` (default
    max(1, C // 2)); call these features x_j, j over the N = prod(G) grid positions. Each branch predicts, at
    every position i, an over-complete map M_i of P = prod(2 G_a - 1) values centred on i (conv-norm-act 1x1,
    then a 1x1 conv d -> P without bias, as the official code), and crops from it the G grid around i:

        collect     A_c[i, j] = M^c_i[(j - i) + (G - 1)]   (predicted at the target i)
        distribute  A_d[i, j] = M^d_j[(i - j) + (G - 1)]   (predicted at the source j)

    and out_i = sum_j softmax_j(A[i, j]) x_j: the two terms of the paper's bi-directional propagation
    z_i = 1/N sum_j a^c_ij x_j + 1/N sum_j a^d_ij x_j, kept apart and concatenated as in its PSA module. The
    1/N factor is replaced by the softmax over j, as in the official code with `use_softmax`. The crop is a
    `gather` with the precomputed `offset_index` buffer (non-persistent, built once for the grid). The two
    outputs are concatenated, projected by a 1x1 conv-norm-act (2d -> C), resized (linear) back to S,
    concatenated with x and fused by a 3x3 conv-norm-act (2C -> C): output (B, C, *S).

    Differences from the official code: one reduction shared by both branches (the official code has one per
    branch), and a fixed grid instead of a fixed shrink factor, so that the attention maps have a fixed size.

    Memory: per sample and per branch, the P x N over-complete map plus the N x N attention logits and their
    softmax; the N x N int64 `offset_index` once per module. In float32, forward only (backward about doubles
    it, since the gather's gradient is a dense P x N map):

        G = 8^3:  N = 512,  P = 3,375:  P x N = 6.6 MiB, N x N = 1 MiB; both branches ~17 MiB; index 2 MiB.
        G = 16^3: N = 4096, P = 29,791: P x N = 465 MiB, N x N = 64 MiB; both branches ~1.2 GiB; index 128 MiB.

    The P x N map grows as 8 N^2 in 3D, so grids beyond 16^3 do not fit: G = 32^3 would need 30 GiB per map.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        inter_channels: int | None = None,
        grid: int | Sequence[int] = 8,
        norm: str | tuple = "instance",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        self.spatial_dims = _factory.check_spatial_dims(spatial_dims)
        inter = _factory.inter_channels(in_channels, inter_channels)
        self.inter_channels = inter
        self.grid = _as_grid(grid, spatial_dims)
        n_offsets = math.prod(2 * g - 1 for g in self.grid)

        def cna(cin: int, cout: int, kernel_size: int = 1) -> nn.Sequential:
            return _factory.conv_norm_act(spatial_dims, cin, cout, kernel_size, norm_name=norm, act_name=act)

        def branch() -> nn.Sequential:  # d -> P over-complete map per position; no bias, as the official code
            return nn.Sequential(cna(inter, inter), _factory.conv(spatial_dims, inter, n_offsets, 1, bias=False))

        self.reduce = cna(in_channels, inter)
        self.collect = branch()
        self.distribute = branch()
        self.proj = cna(2 * inter, in_channels)
        self.fuse = cna(2 * in_channels, in_channels, kernel_size=3)
        self.register_buffer("offset_index", offset_index(self.grid), persistent=False)

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *G): average-pool the axes larger than G, then interpolate those smaller."""
        pooled = tuple(min(s, g) for s, g in zip(x.shape[2:], self.grid))
        if pooled != tuple(x.shape[2:]):
            pool = F.adaptive_avg_pool2d if self.spatial_dims == 2 else F.adaptive_avg_pool3d
            x = pool(x, pooled)
        return _factory.resize(x, self.grid, "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        feats = self.reduce(self.shrink(x))  # (B, d, *G)
        values = feats.flatten(2)  # (B, d, N) with N = prod(G)
        m_c = self.collect(feats).flatten(2).transpose(1, 2)  # (B, N, P): row i is the map M_i
        m_d = self.distribute(feats).flatten(2).transpose(1, 2)  # (B, N, P)
        outs = []
        for logits in (collect_logits(m_c, self.offset_index), distribute_logits(m_d, self.offset_index)):
            weights = torch.softmax(logits, dim=-1)  # (B, N_i, N_j), normalised over the sources j
            outs.append(values @ weights.transpose(1, 2))  # (B, d, N_i): out_i = sum_j w_ij x_j
        psa = torch.cat(outs, dim=1).reshape(b, 2 * self.inter_channels, *self.grid)  # (B, 2d, *G)
        psa = _factory.resize(self.proj(psa), spatial, "linear")  # (B, C, *S)
        return self.fuse(torch.cat([x, psa], dim=1))  # (B, C, *S)
