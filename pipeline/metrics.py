"""Segmentation metrics of one case: the Dice that training validates on, and the Dice, HD95, NSD and volume
difference per class that `seg3d evaluate` reports, with its conventions for empty structures (see
pipeline/evaluate.py's docstring for the table of conventions and the definitions)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pipeline.errors import Seg3dError
from pipeline.grid import bounding_box

STATUSES = ("both_present", "both_empty", "missed", "false_positive")
METRICS = ("dice", "hd95_mm", "nsd", "volume_diff_ml")
DIGITS = 6  # MONAI returns float32 distances; more digits than this would be noise


def dice_per_class(pred, ref, num_classes: int) -> list[float]:
    """Dice of each foreground class 1..num_classes-1 between two integer label maps of one shape."""
    pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred)
    ref = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    out = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


def mean_foreground_dice(per_case: list[list[float]]) -> tuple[list[float], float]:
    """Per-class mean over cases (NaN cases left out) and the mean of those class means."""
    arr = np.asarray(per_case, dtype=float)
    if arr.size == 0:
        return [], float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN class is reported as NaN on purpose
        per_class = np.nanmean(arr, axis=0)
        overall = float(np.nanmean(per_class))
    return [float(v) for v in per_class], overall


# -- one case -------------------------------------------------------------------------------------------------


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, int],
    tolerance_mm: float = 2.0,
    case: str | None = None,
) -> list[dict]:
    """One record per foreground class of `labels` (background, value 0, is skipped): case, label, the METRICS
    and status, plus pred_volume_ml and ref_volume_ml. `spacing` is the voxel size in mm along the array's axes."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape or pred.ndim != len(spacing):
        raise Seg3dError(
            f"prediction shape {pred.shape}, reference shape {ref.shape} and spacing {tuple(spacing)} do not "
            "agree; a prediction must be on its reference's voxel grid",
            case=case,
        )
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise Seg3dError(f"NSD tolerance {tolerance_mm} mm is not a distance; give one >= 0, e.g. --tolerance 2")
    classes = {name: int(value) for name, value in labels.items() if int(value) != 0}
    pred, ref = _label_map(pred, classes, case, "prediction"), _label_map(ref, classes, case, "reference")
    spacing = tuple(float(s) for s in spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    diagonal = float(np.sqrt(np.sum((np.asarray(pred.shape) * np.asarray(spacing)) ** 2)))
    records = []
    for name, value in classes.items():
        p, r = pred == value, ref == value
        n_pred, n_ref = int(p.sum()), int(r.sum())
        if n_pred and n_ref:
            dice = 2.0 * int(np.count_nonzero(p & r)) / (n_pred + n_ref)
            hd95, nsd = _surface_metrics(p, r, spacing, tolerance_mm)
            status = "both_present"
        elif not n_pred and not n_ref:
            dice, hd95, nsd, status = 1.0, 0.0, 1.0, "both_empty"
        else:
            dice, hd95, nsd, status = 0.0, diagonal, 0.0, "missed" if n_ref else "false_positive"
        values = {"dice": dice, "hd95_mm": hd95, "nsd": nsd, "volume_diff_ml": (n_pred - n_ref) * voxel_ml}
        records.append(
            {
                "case": case,
                "label": name,
                **{k: round(float(v), DIGITS) for k, v in values.items()},
                "status": status,
                "pred_volume_ml": round(n_pred * voxel_ml, DIGITS),
                "ref_volume_ml": round(n_ref * voxel_ml, DIGITS),
            }
        )
    return records


def _label_map(array: np.ndarray, classes: dict[str, int], case: str | None, what: str) -> np.ndarray:
    """The array as integers, after checking that every value is background or a declared class: an undeclared
    value means the wrong --labels or the wrong file, and mapping it to background would hide that."""
    allowed = sorted({0, *classes.values()})
    outside = ~np.isin(array, allowed)  # NaN included: it equals nothing
    if outside.any():
        bad = np.unique(array[outside]).tolist()
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        declared = ", ".join(f"{k}={v}" for k, v in classes.items())
        raise Seg3dError(
            f"{what} holds label values {shown}, which are neither background (0) nor declared ({declared}); "
            "declare every class with --labels NAME=VALUE,... or check that the right file was given",
            case=case,
        )
    # Float label files (nibabel writes float64 masks) become the smallest integer type holding the labels.
    return array if array.dtype.kind in "iu" else array.astype(np.min_scalar_type(allowed[-1]))


def _surface_metrics(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float):
    """(HD95 mm, NSD) of two non-empty masks, by MONAI. Cropped to the union's bounding box plus one voxel first:
    MONAI crops the same way (the image border counts as outside), so the numbers are unchanged and a full CT
    is not copied into float32 channels."""
    box = bounding_box(p | r, margin=1)
    pt = torch.from_numpy(np.ascontiguousarray(p[box]))[None, None]  # (1, 1, X, Y, Z): batch and one-hot channel
    rt = torch.from_numpy(np.ascontiguousarray(r[box]))[None, None]
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    with warnings.catch_warnings():
        # MONAI >= 1.5 warns about an argument its own metrics still pass; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=list(spacing))
        nsd = compute_surface_dice(pt, rt, [tolerance_mm], include_background=True, spacing=list(spacing))
    return float(hd95.item()), float(nsd.item())
