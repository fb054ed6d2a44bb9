"""What seg3d does after the network, as MONAI transforms, for an exported MONAI Bundle (`seg3d export --format
monai-bundle`). This file is copied as it is into the bundle as `scripts/postprocess.py` and runs there without
seg3d: it imports numpy, scipy, torch and MONAI only.

`ResampleToInputd` is seg3d's inversion (pipeline/grid.py): the class probabilities go from the network's grid straight
onto the input's own grid through the two affines (MONAI's SpatialResample, trilinear), with the edge values up to
half a network voxel beyond the network grid and background beyond that (the air the body crop removed). MONAI's
Invertd undoes the crop by padding at the crop box instead, which differs in that half-voxel shell.

`KeepComponentsd` applies the rules of pipeline/postprocess.py to a label map (class indices, background 0) in the
input's grid, with 6-connectivity:
- `largest_component`: the largest connected component of all foreground classes taken together is kept, every other
  foreground voxel becomes background (MONAI's KeepLargestConnectedComponentd does the same but needs scikit-image);
- `inside`: [class, organ] pairs; a component of `class` that neither overlaps nor touches `organ` is removed (a
  tumour predicted far from any pancreas).
tests/pipeline/test_monai_bundle.py checks that it gives pipeline.postprocess.postprocess's labels.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialResample
from scipy import ndimage


def keep_components(labels: np.ndarray, largest_component: bool, inside: list[list[int]]) -> np.ndarray:
    """`labels` (X, Y, Z) class indices after the rules; works inside the foreground's bounding box."""
    if not largest_component and not inside:
        return labels
    hit = np.nonzero(labels > 0)
    if hit[0].size == 0:
        return labels
    box = tuple(slice(int(h.min()), int(h.max()) + 1) for h in hit)
    sub = labels[box].copy()
    structure = ndimage.generate_binary_structure(3, 1)
    if largest_component:
        comp, n = ndimage.label(sub > 0, structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            sub[comp != (1 + int(np.argmax(sizes)))] = 0
    for tumour, organ in inside:
        near_organ = ndimage.binary_dilation(sub == organ, structure)
        comp, n = ndimage.label(sub == tumour, structure)
        if n:
            keep = np.unique(comp[near_organ & (comp > 0)])
            sub[(comp > 0) & ~np.isin(comp, keep)] = 0
    out = labels.copy()
    out[box] = sub
    return out


class KeepComponentsd(MapTransform):
    """`keep_components` on each key, a channel-first label map (1, X, Y, Z); its metadata (affine) is kept."""

    def __init__(
        self,
        keys: KeysCollection,
        largest_component: bool = True,
        inside: list[list[int]] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.largest_component = largest_component
        self.inside = [[int(a), int(b)] for a, b in (inside or [])]

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            array = img.detach().cpu().numpy().astype(np.uint8)
            kept = np.stack([keep_components(c, self.largest_component, self.inside) for c in array])
            d[key] = d[key].clone().copy_(torch.from_numpy(kept))  # a MetaTensor's clone keeps its affine
        return d


def inside_network_grid(target_to_source: np.ndarray, source_shape, target_shape, slab: int = 1 << 23) -> torch.Tensor:
    """(X, Y, Z) bool: the target voxels whose centre lies within half a voxel of the source (network) grid, the rule
    and the float32 arithmetic of pipeline/grid.py (a centre exactly half a voxel out is inside), in slabs along z."""
    m = target_to_source
    i = torch.arange(target_shape[0], dtype=torch.float32)[:, None, None]
    j = torch.arange(target_shape[1], dtype=torch.float32)[None, :, None]
    out = torch.empty(tuple(target_shape), dtype=torch.bool)
    step = max(1, slab // max(1, target_shape[0] * target_shape[1]))
    for z0 in range(0, target_shape[2], step):
        k = torch.arange(z0, min(z0 + step, target_shape[2]), dtype=torch.float32)[None, None, :]
        inside = None
        for a in range(3):
            c = float(m[a, 0]) * i + float(m[a, 1]) * j + float(m[a, 2]) * k + float(m[a, 3])
            ok = (c >= -0.5) & (c <= source_shape[a] - 0.5)
            inside = ok if inside is None else inside & ok
        out[..., z0 : z0 + inside.shape[-1]] = inside
    return out


class ResampleToInputd(MapTransform):
    """Each key, (K, *S) probabilities on the grid of the preprocessed `image_key` (its affine), onto the grid the
    input was read in (the image's `original_affine` and `spatial_shape`)."""

    def __init__(self, keys: KeysCollection, image_key: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.resample = SpatialResample()

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image = d[self.image_key]
        source = np.asarray(image.affine, dtype=np.float64)
        target = np.asarray(image.meta["original_affine"], dtype=np.float64)
        shape = [int(s) for s in image.meta["spatial_shape"]]
        inside = inside_network_grid(np.linalg.inv(source) @ target, image.shape[1:], shape)
        meta = {k: v for k, v in image.meta.items() if k != "affine"}
        for key in self.key_iterator(d):
            probs = MetaTensor(torch.as_tensor(d[key]).as_tensor().float().cpu(), affine=source, meta=meta)
            values = self.resample(probs, dst_affine=target, spatial_size=shape, mode="bilinear", padding_mode="border")
            out = MetaTensor(values.as_tensor() * inside, meta=meta)
            out.affine = values.affine
            d[key] = out
        return d
