"""pipeline.metrics on hand-made masks: expected values from closed forms of the geometry, or from an independent
surface and distance computation (numpy face neighbours and scipy's EDT), never from the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from pipeline.metrics import evaluate_case

SPACING = (0.8, 0.8, 2.5)
AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, -8.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])
SHAPE = (40, 40, 20)
VOXEL_ML = 0.8 * 0.8 * 2.5 / 1000
PANCREAS = {"pancreas": 1}
MSD = {"pancreas": 1, "cancer": 2}


def box(lo, size, shape=SHAPE, value=1) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, a + n) for a, n in zip(lo, size))] = value
    return mask


def one(records: list[dict], label: str = "pancreas") -> dict:
    (record,) = [r for r in records if r["label"] == label]
    return record


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask.astype(bool), 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    all_inside = np.ones_like(inner)
    for axis in range(3):
        for step in (-1, 1):
            all_inside &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return inner & ~all_inside


# -- known values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis, k", [(2, 2), (0, 3)], ids=["z-2-slices-2.5mm", "x-3-voxels-0.8mm"])
def test_boxes_offset_along_an_axis_have_closed_form_metrics(axis, k):
    """Two 12x12x6 boxes, the second shifted k voxels along `axis`.

    Dice = (n - k) / n with n the box's length along the axis. Every surface voxel lies within k voxels along the
    axis of the other surface, and the whole face at the leading end (more than 5% of the surface) lies exactly
    k * spacing away, so HD95 = k * spacing. The two surfaces share only their ring of side voxels over the
    overlap, so at a tolerance below the smallest voxel step NSD = shared / surface, and above k * spacing it is 1.
    """
    size = (12, 12, 6)
    shift = [0, 0, 0]
    shift[axis] = k
    ref = box((10, 10, 5), size)
    pred = box((10 + shift[0], 10 + shift[1], 5 + shift[2]), size)
    n = size[axis]
    across = [s for a, s in enumerate(size) if a != axis]
    ring = across[0] * across[1] - (across[0] - 2) * (across[1] - 2)
    total = math.prod(size) - math.prod(s - 2 for s in size)
    offset_mm = k * SPACING[axis]

    below = one(evaluate_case(pred, ref, SPACING, PANCREAS, tolerance_mm=0.5, case="c"))
    assert below["dice"] == pytest.approx((n - k) / n, abs=1e-6)
    assert below["hd95_mm"] == pytest.approx(offset_mm, abs=1e-5)
    assert below["volume_diff_ml"] == 0.0
    assert below["nsd"] == pytest.approx(ring * (n - k) / total, abs=1e-6)
    assert below["status"] == "both_present" and below["case"] == "c"
    above = one(evaluate_case(pred, ref, SPACING, PANCREAS, tolerance_mm=offset_mm + 0.01))
    assert above["nsd"] == pytest.approx(1.0)


def test_volume_difference_is_prediction_minus_reference_in_ml():
    ref = box((10, 10, 5), (12, 12, 6))
    larger = box((10, 10, 5), (12, 12, 8))
    smaller = box((10, 10, 5), (12, 12, 3))
    grown = one(evaluate_case(larger, ref, SPACING, PANCREAS))
    assert grown["volume_diff_ml"] == pytest.approx(12 * 12 * 2 * VOXEL_ML, abs=1e-6)
    assert grown["pred_volume_ml"] == pytest.approx(12 * 12 * 8 * VOXEL_ML, abs=1e-6)
    assert grown["dice"] == pytest.approx(2 * 6 / (6 + 8), abs=1e-6)
    assert one(evaluate_case(smaller, ref, SPACING, PANCREAS))["volume_diff_ml"] == pytest.approx(
        -12 * 12 * 3 * VOXEL_ML, abs=1e-6
    )


def test_sphere_against_a_shifted_sphere_with_an_island_matches_scipy_edt():
    """HD95 and NSD against scipy's exact EDT on explicit surface sets. The prediction is the sphere shifted by
    (2, 1, 1) voxels plus a far island of false positives, 6% of its surface: the max of the directed 95th
    percentiles sees the island, the pooled percentile (medpy) does not, so the test tells the two apart."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij"), axis=-1)
    centre = np.array([14.0, 16.0, 22.5])
    ref = (np.linalg.norm(grid - centre, axis=-1) <= 9.0).astype(np.uint8)
    pred = (np.linalg.norm(grid - centre - [1.6, 0.8, 2.5], axis=-1) <= 9.0).astype(np.uint8)
    pred[33:38, 33:38, 2:4] = 1
    sp, sr = surface(pred), surface(ref)
    d_pr = distance_transform_edt(~sr, sampling=SPACING)[sp]  # each prediction surface voxel to the reference's
    d_rp = distance_transform_edt(~sp, sampling=SPACING)[sr]
    hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    pooled = np.percentile(np.concatenate([d_pr, d_rp]), 95)
    assert hd95 > 10.0 > 4.0 > pooled  # the island separates the two conventions
    for tol in (1.0, 2.0, 4.0):
        nsd = (np.sum(d_pr <= tol) + np.sum(d_rp <= tol)) / (d_pr.size + d_rp.size)
        record = one(evaluate_case(pred, ref, SPACING, PANCREAS, tolerance_mm=tol))
        assert record["hd95_mm"] == pytest.approx(hd95, abs=1e-4)
        assert record["nsd"] == pytest.approx(nsd, abs=1e-6)
        assert 0 < record["nsd"] < 1
    dice = 2 * np.sum(pred & ref) / (pred.sum() + ref.sum())
    assert record["dice"] == pytest.approx(dice, abs=1e-6)


# -- edge cases -------------------------------------------------------------------------------------------------
