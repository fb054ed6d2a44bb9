"""Context errors: how much of a case's decoy tissue a model labels as a class.

`seg3d synth` paints decoys, pancreas-like tubes where no pancreas belongs, and writes where they are as a uint8 mask
per case (1 = decoy voxel) in the image's geometry, named by the "decoy" key of dataset.json. Locally a decoy looks
like pancreas; only its place says it is not. The fraction of decoy voxels a model labels pancreas is therefore the
study's measure of whether a variant uses context (issue 13, section 2.3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import Seg3dError


def decoy_confusion(labels: np.ndarray, decoy: np.ndarray, class_index: int) -> float | None:
    """The fraction of decoy voxels (`decoy` != 0) whose label is `class_index`; None where the mask is empty, since
    a case without decoys says nothing about context errors (0.0 would claim a perfect score)."""
    if labels.shape != decoy.shape:
        raise Seg3dError(
            f"labels of shape {tuple(labels.shape)} and decoy mask of shape {tuple(decoy.shape)} differ; the mask must"
            " be in the prediction's voxel grid"
        )
    inside = decoy != 0
    total = int(np.count_nonzero(inside))
    if total == 0:
        return None
    return int(np.count_nonzero(labels[inside] == class_index)) / total


def read_decoy(
    path: Path | str, like_affine: np.ndarray, like_shape: tuple[int, ...], case: str | None = None
) -> np.ndarray:
    """The decoy mask at `path` as a bool array, refused unless it lies on the prediction's grid: the same shape and
    the same affine (within imageio.AFFINE_TOL), since resampling one onto the other would hide mismatched files."""
    from pipeline.imageio import AFFINE_TOL, Volume, read_volume

    volume = read_volume(path, case=case, kind="decoy mask")
    like_affine = np.asarray(like_affine, dtype=np.float64)
    if volume.array.shape != tuple(like_shape) or not np.allclose(volume.affine, like_affine, atol=AFFINE_TOL):
        # A zero-stride array of the prediction's shape describes its grid in the same words as the mask's.
        like = Volume(array=np.broadcast_to(np.uint8(0), tuple(like_shape)), affine=like_affine)
        raise Seg3dError(
            f"decoy mask {path} has {volume.describe()} but the prediction has {like.describe()}; give the decoy mask"
            " of the image the prediction was made from",
            case=case,
        )
    values = np.unique(volume.array)
    if not np.isin(values, (0, 1)).all():
        odd = ", ".join(f"{v:g}" for v in values[~np.isin(values, (0, 1))][:5])
        raise Seg3dError(
            f"decoy mask {path} holds values {odd}; a decoy mask holds 0 (no decoy) and 1 (decoy): write it again"
            " with seg3d synth",
            case=case,
        )
    return volume.array != 0
