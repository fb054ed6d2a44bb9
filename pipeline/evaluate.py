"""Per-case segmentation metrics.

Dice per class follows nnU-Net's convention for empty structures: when a class is absent from both the
reference and the prediction its Dice is undefined (NaN, left out of means and counted separately); when it is
absent from the reference only, the prediction is all false positives and Dice is 0.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


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
