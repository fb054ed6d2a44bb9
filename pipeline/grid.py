"""From the network's grid back to the input's: the inverse of the preprocessing (orientation, crop, resampling).

The network sees a reoriented, cropped, resampled volume; a prediction is useful only in the input's own voxel grid.
Both grids are voxel -> world RAS affines, so one affine map between them undoes whatever the preprocessing did.
The class probabilities are resampled (trilinear), then the argmax taken, so boundaries are not
nearest-neighbour blocky. Also the bounding box of a mask, which post-processing and the surface metrics use to
work on the small part of a CT where a structure lies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Grid:
    """The network's grid (after orientation, crop and resampling) and the input's own grid, both as voxel -> world
    RAS affines: everything the inverse of the preprocessing needs, whatever orientation, crop or spacing it used."""

    source_affine: np.ndarray  # network grid voxel -> world
    target_affine: np.ndarray  # input grid voxel -> world
    target_shape: tuple[int, int, int]

    @property
    def target_to_source(self) -> np.ndarray:
        return np.linalg.inv(self.source_affine) @ self.target_affine


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of `mask`, grown by `margin` voxels on each side and clipped to
    the array; None for an empty mask."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def resample_to_grid(
    values: torch.Tensor,
    grid: Grid,
    *,
    box: tuple[slice, ...] | None = None,
    background_first: bool = False,
    chunk_voxels: int = 1 << 23,
) -> torch.Tensor:
    """Trilinear resampling of `values` (C, *S) from the network's grid onto the input grid (or the sub-box `box` of
    it), voxel centres mapped through the two affines. Outside the network's grid (the cropped-away air) values
    are 0, except channel 0 with `background_first`, which is 1 there: class probabilities keep summing to 1.
    Done in slabs along the last axis so that memory stays bounded for a 512 x 512 x 1000 CT."""
    if background_first:
        shifted = values.clone()
        shifted[0] -= 1.0  # pad with 0 after the shift = pad the background with 1
        out = resample_to_grid(shifted, grid, box=box, chunk_voxels=chunk_voxels)
        out[0] += 1.0
        return out
    box = box or tuple(slice(0, n) for n in grid.target_shape)
    m = grid.target_to_source  # float64; the per-voxel arithmetic below is float32 (1e-4 voxel at 1,000 voxels)
    size = values.shape[1:]
    src = values[None].float()  # (1, C, X, Y, Z): grid_sample's (N, C, D, H, W)
    i = torch.arange(box[0].start, box[0].stop, dtype=torch.float32)[:, None, None]
    j = torch.arange(box[1].start, box[1].stop, dtype=torch.float32)[None, :, None]
    step = max(1, chunk_voxels // max(1, len(i) * j.shape[1]))
    out = torch.empty((values.shape[0], len(i), j.shape[1], box[2].stop - box[2].start), dtype=torch.float32)
    for z0 in range(box[2].start, box[2].stop, step):
        k = torch.arange(z0, min(z0 + step, box[2].stop), dtype=torch.float32)[None, None, :]
        norm, inside = [], None
        for a in range(3):
            c = float(m[a, 0]) * i + float(m[a, 1]) * j + float(m[a, 2]) * k + float(m[a, 3])  # source index
            # A source voxel stands for half a voxel around its centre (so the grid's edge values reach its edge,
            # as MONAI's border padding does); beyond that lies the cropped-away air.
            ok = (c >= -0.5) & (c <= size[a] - 0.5)
            inside = ok if inside is None else inside & ok
            norm.append(c.mul_(2.0 / (size[a] - 1)).sub_(1.0) if size[a] > 1 else c.zero_())  # -> [-1, 1]
        # grid_sample wants (x, y, z) = (W, H, D) order: our (X, Y, Z) axes are its (D, H, W).
        sample_grid = torch.stack(torch.broadcast_tensors(norm[2], norm[1], norm[0]), dim=-1)[None]
        part = nn.functional.grid_sample(src, sample_grid, mode="bilinear", padding_mode="border", align_corners=True)
        out[..., z0 - box[2].start : z0 - box[2].start + part.shape[-1]] = part[0] * inside
    return out


def labels_in_grid(probs: torch.Tensor, grid: Grid, threshold: float = 0.25) -> np.ndarray:
    """argmax of the resampled probabilities, computed only where it can differ from background.

    Trilinear interpolation is a convex combination of 8 source voxels: where all of them hold less than half of
    their probability in foreground classes, so does the result, and background wins the argmax. So only the box
    around source voxels with foreground >= `threshold` (< 0.5, plus a voxel of margin) needs resampling, and
    background there is 1 - the resampled foreground (interpolation preserves sums): exact, and for a pancreas a
    small fraction of the volume."""
    labels = np.zeros(grid.target_shape, dtype=np.uint8)
    foreground = probs[1:]
    hot = torch.nonzero(foreground.sum(0) >= threshold)
    if hot.numel() == 0:
        return labels
    lo, hi = hot.min(0).values.double() - 1, hot.max(0).values.double() + 1
    corners = torch.cartesian_prod(*[torch.stack([lo[a], hi[a]]) for a in range(3)])  # (8, 3) source indices
    to_target = torch.as_tensor(np.linalg.inv(grid.target_to_source), dtype=torch.float64)
    mapped = corners @ to_target[:3, :3].T + to_target[:3, 3]
    start = torch.floor(mapped.min(0).values).long() - 1
    stop = torch.ceil(mapped.max(0).values).long() + 2
    box = tuple(slice(max(0, int(a)), min(n, int(b))) for a, b, n in zip(start, stop, grid.target_shape))
    if any(s.stop <= s.start for s in box):
        return labels
    fg = resample_to_grid(foreground, grid, box=box)
    labels[box] = argmax_classes(torch.cat([1.0 - fg.sum(0, keepdim=True), fg], dim=0)).numpy()
    return labels


def argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """argmax over the (few) classes of (K, *S) as K element-wise passes, uint8: torch's argmax along a leading
    dimension is a strided reduction, which walks a CT-sized volume badly. Ties go to the lower class."""
    best, labels = probs[0].clone(), torch.zeros(probs.shape[1:], dtype=torch.uint8)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        labels[better] = c
        best = torch.maximum(best, probs[c])
    return labels
