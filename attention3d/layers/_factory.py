"""Small constructors shared by the attention layers: convolutions, norms and resizing for 2D or 3D.

Norms and activations are given by MONAI name ("instance", "batch", ("group", {"num_groups": 8}), "relu", ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return spatial_dims


def inter_channels(in_channels: int, inter_channels: int | None) -> int:
    """The width of an attention block's embedding: as given, or half the input's (at least 1), as the non-local
    paper and Oktay's gates choose it; a non-positive width is a ValueError."""
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    inter = max(1, in_channels // 2) if inter_channels is None else inter_channels
    if inter < 1:
        raise ValueError(f"inter_channels must be >= 1, got {inter_channels}")
    return inter


def conv(
    spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, bias: bool = True
) -> nn.Module:
    """A plain N-d convolution with 'same' padding for odd kernels (padding = kernel // 2)."""
    conv_type = Conv[Conv.CONV, check_spatial_dims(spatial_dims)]
    return conv_type(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)


def norm(name: str | tuple, spatial_dims: int, channels: int) -> nn.Module:
    """A MONAI norm layer by name. Instance norm is made affine: several layers zero-initialise a norm's
    weight so that a residual block starts as the identity, which needs the weight to exist."""
    if isinstance(name, str) and name.lower() == "instance":
        name = ("instance", {"affine": True})
    return get_norm_layer(name, spatial_dims=spatial_dims, channels=channels)


def act(name: str | tuple) -> nn.Module:
    return get_act_layer(name)


def conv_norm_act(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    norm_name: str | tuple = "instance",
    act_name: str | tuple = "relu",
) -> nn.Sequential:
    """conv (no bias: the norm's shift replaces it) -> norm -> act."""
    return nn.Sequential(
        conv(spatial_dims, in_channels, out_channels, kernel_size, stride, bias=False),
        norm(norm_name, spatial_dims, out_channels),
        act(act_name),
    )


def max_pool(spatial_dims: int, kernel_size: int = 2) -> nn.Module:
    return Pool[Pool.MAX, check_spatial_dims(spatial_dims)](kernel_size)


def resize(x: torch.Tensor, size: torch.Size | tuple[int, ...], mode: str = "linear") -> torch.Tensor:
    """Resize the spatial axes of (B, C, *S) to `size`; "linear" means bilinear in 2D and trilinear in 3D."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "linear":
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
        return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)
    return F.interpolate(x, size=tuple(size), mode=mode)
