"""Pyramid attention: Feature Pyramid Attention (FPA) and Global Attention Upsample (GAU).

Li, Xiong, An, Wang, "Pyramid Attention Network for Semantic Segmentation", BMVC 2018, arXiv:1805.10180,
Fig. 2 (FPA) and Fig. 3 (GAU), in 2D or 3D.
"""

from __future__ import annotations

import torch
from torch import nn

from attention3d.layers._factory import act as act_layer
from attention3d.layers._factory import check_spatial_dims, conv, conv_norm_act, resize
from attention3d.layers._factory import norm as norm_layer

# A layer norm over channels: defined for any spatial size and any batch size, unlike instance or batch
# statistics of a 1-voxel map.
_CHANNEL_LAYER_NORM = ("group", {"num_groups": 1})


def _global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)  # (B, C, 1, ...)


def _conv_act(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int, act_name: str | tuple
) -> nn.Sequential:
    return nn.Sequential(
        conv(spatial_dims, in_channels, out_channels, kernel_size, stride, bias=True),
        act_layer(act_name),
    )


class FeaturePyramidAttention(nn.Module):
    """Feature Pyramid Attention (PAN, Fig. 2).

    A 7/5/3 U-shaped convolution pyramid turns x into a pixel-wise attention map that multiplies a 1x1
    projection of x; a global-pooling branch is added on top:

        proj = act(norm(conv1x1(x)))
        d1 = act(conv7_s2(x)),  d2 = act(conv5_s2(d1)),  d3 = act(conv3_s2(d2))
        c1 = act(conv7(d1)),    c2 = act(conv5(d2)),     c3 = act(conv3(d3))
        att = up(expand(c1 + up(c2 + up(c3))))    (each up to the next finer grid, the last to x's grid)
        y = proj * att + conv1x1(GAP(x))          (the global term broadcast over the grid)

    The pyramid runs at `mid_channels` (default out_channels // 4, as in the widely used PAN reference
    code) and `expand` (1x1 conv with bias) lifts the map to `out_channels` before the product: with 7^3
    kernels at a 256-channel 3D bottleneck, a full-width pyramid alone would hold some 60 M parameters.
    Upsampling is (bi/tri)linear interpolation to an explicit size, so odd and non-cubic grids work.

    Deviation from the paper: the original puts batch norm after every convolution. Here only `proj`
    carries `norm`; the pyramid convolutions are conv + act and the global branch is a plain conv. At the
    bottleneck of a 3D U-Net the coarse pyramid levels and the pooled vector are 1 voxel, where instance
    norm is undefined and batch norm at batch size 1 (usual for 3D training) raises, so those convolutions
    keep their bias instead of a norm.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        mid_channels: int | None = None,
        norm: str | tuple = "instance",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        mid = max(1, out_channels // 4) if mid_channels is None else mid_channels
        if mid < 1:
            raise ValueError(f"mid_channels must be >= 1, got {mid_channels}")
        self.proj = conv_norm_act(spatial_dims, in_channels, out_channels, 1, norm_name=norm, act_name=act)
        self.down1 = _conv_act(spatial_dims, in_channels, mid, 7, 2, act)
        self.down2 = _conv_act(spatial_dims, mid, mid, 5, 2, act)
        self.down3 = _conv_act(spatial_dims, mid, mid, 3, 2, act)
        self.conv1 = _conv_act(spatial_dims, mid, mid, 7, 1, act)
        self.conv2 = _conv_act(spatial_dims, mid, mid, 5, 1, act)
        self.conv3 = _conv_act(spatial_dims, mid, mid, 3, 1, act)
        self.expand = conv(spatial_dims, mid, out_channels, 1, bias=True)
        self.glob = conv(spatial_dims, in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.proj(x)  # (B, Co, *S)
        d1 = self.down1(x)  # (B, Cm, *S1), S1 = ceil(S / 2)
        d2 = self.down2(d1)  # (B, Cm, *S2), S2 = ceil(S1 / 2)
        d3 = self.down3(d2)  # (B, Cm, *S3), S3 = ceil(S2 / 2)
        p = self.conv2(d2) + resize(self.conv3(d3), d2.shape[2:])  # (B, Cm, *S2)
        p = self.conv1(d1) + resize(p, d1.shape[2:])  # (B, Cm, *S1)
        att = resize(self.expand(p), x.shape[2:])  # (B, Co, *S)
        glob = self.glob(_global_avg_pool(x))  # (B, Co, 1, ...): upsampling a constant is a broadcast
        return proj * att + glob


class GlobalAttentionUpsample(nn.Module):
    """Global Attention Upsample (PAN, Fig. 3): a decoder step in which the pooled coarse
    features choose which low-level channels pass.

        up  = interp(conv1x1_bias(high), size of low)            (B, Cl, *S_low)
        w   = sigmoid(layer_norm(conv1x1(GAP(high))))            (B, Cl, 1, ...)
        out = up + norm(conv3x3(low)) * w

    `high` (B, Ch, *S_high) is the coarser input, `low` (B, Cl, *S_low) the skip connection; the output is
    (B, Cl, *S_low). Two choices the paper leaves open or that differ from it:
    - The upsampling of `high` is learned as a 1x1 convolution Ch -> Cl (with bias) followed by linear
      interpolation to low's exact size, which also handles odd sizes, where a stride-2 transposed conv
      would not.
    - The paper normalises the pooled 1x1 conv with batch norm. Batch statistics of a 1-voxel map are
      undefined at batch size 1, so the pooled channel vector gets a layer norm (one group over channels).
    """

    def __init__(
        self,
        spatial_dims: int,
        high_channels: int,
        low_channels: int,
        norm: str | tuple = "instance",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        # `act` is accepted so that both pyramid layers share one signature; the paper's GAU has no
        # activation on any of its three paths, so it is unused.
        self.up = conv(spatial_dims, high_channels, low_channels, 1, bias=True)
        self.gate = nn.Sequential(
            conv(spatial_dims, high_channels, low_channels, 1, bias=False),
            norm_layer(_CHANNEL_LAYER_NORM, spatial_dims, low_channels),
        )
        self.low = nn.Sequential(
            conv(spatial_dims, low_channels, low_channels, 3, bias=False),
            norm_layer(norm, spatial_dims, low_channels),
        )

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        up = resize(self.up(high), low.shape[2:])  # (B, Cl, *S_low)
        w = torch.sigmoid(self.gate(_global_avg_pool(high)))  # (B, Cl, 1, ...)
        return up + self.low(low) * w
