"""The sanity bounds that training, inference, export and bundle loading share: patch size and network size, so that
no config, bundle or command-line value can ask for an absurd allocation before the network fails."""

from __future__ import annotations

import math
from typing import Any

from attention3d import UNetConfig
from pipeline.errors import one_line, shown

# Sanity bounds that training, inference and export share. A patch edge of 1024 voxels is several times what fits on
# any GPU today (nnU-Net's largest are about 320); the product bound keeps one patch's input under 128 MiB of float32,
# so no patch size a config or --patch can name allocates without bound before the network fails.
MAX_PATCH_EDGE = 1024
MAX_PATCH_VOXELS = 2**25
MAX_CHANNELS = 4096  # per U-Net level
MAX_LEVELS = 8
MAX_STRIDE = 8
MAX_KERNEL = 9


def patch_problem(patch: Any) -> str | None:
    """What is wrong with a patch size (three whole numbers of voxels), or None."""
    if not isinstance(patch, (tuple, list)) or len(patch) != 3:
        return f"must be three whole numbers of voxels X,Y,Z, got {shown(patch)}"
    if not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_PATCH_EDGE for n in patch):
        return f"each edge must be a whole number of voxels in 1..{MAX_PATCH_EDGE}, got {shown(patch)}"
    if math.prod(patch) > MAX_PATCH_VOXELS:
        return f"{shown(patch)} is {math.prod(patch):,} voxels, more than the {MAX_PATCH_VOXELS:,} allowed in one patch"
    return None


def unet_problem(cfg: UNetConfig) -> str | None:
    """Bounds UNetConfig itself does not set (it checks consistency, not size): channels, levels, strides, kernel
    and dropout within what any CT U-Net uses, so a config or a bundle's metadata cannot ask for an absurd network."""
    ints = [*cfg.channels, cfg.kernel_size, *(s for axis in cfg.axis_strides() for s in axis)]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in ints):
        return "channels, strides and kernel_size must be whole numbers"
    if not 2 <= len(cfg.channels) <= MAX_LEVELS:
        return f"channels must have 2..{MAX_LEVELS} levels, got {len(cfg.channels)}"
    if not all(1 <= c <= MAX_CHANNELS for c in cfg.channels):
        return f"channels must each be in 1..{MAX_CHANNELS}, got {shown(cfg.channels)}"
    if not all(1 <= s <= MAX_STRIDE for axis in cfg.axis_strides() for s in axis):
        return f"strides must each be in 1..{MAX_STRIDE}, got {shown(cfg.strides)}"
    if not 1 <= cfg.kernel_size <= MAX_KERNEL:
        return f"kernel_size must be odd and in 1..{MAX_KERNEL}, got {cfg.kernel_size}"
    if not (isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1):
        return f"dropout must be in [0, 1), got {shown(cfg.dropout)}"
    from monai.networks.layers.factories import Act, Norm, split_args

    for key, value in (("norm", cfg.norm), ("act", cfg.act)):
        try:  # the names MONAI's layer factories know, looked up as the network's blocks will look them up
            name, _ = split_args(value)
            _ = Norm[name, cfg.spatial_dims] if key == "norm" else Act[name]
        except (KeyError, TypeError, ValueError) as err:
            return f"{key} {shown(value)} is not a MONAI {key} layer ({one_line(err, 100)})"
    return None
