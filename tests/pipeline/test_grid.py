"""The inverse of the preprocessing: seg3d's affine resampling against MONAI's own inverse transforms."""

from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from pipeline.grid import Grid, bounding_box, labels_in_grid, resample_to_grid
from pipeline.synthetic import CaseSpec, make_phantom, to_nifti
from pipeline.transforms import IMAGE, Preprocessing, as_record, inference_transforms

SPEC = CaseSpec(shape=(72, 64, 20), spacing=(0.9, 0.9, 2.5), orientation="RAS", tumour=True, decoys=2)
PRE = Preprocessing(
    target_spacing=(1.3, 1.1, 3.5),
    intensity_mode="foreground",
    clip=(-50.0, 250.0),
    mean=100.0,
    std=40.0,
    foreground_crop=True,
    body_threshold_hu=-500.0,
    label_names=["background", "pancreas", "cancer"],
    label_values=[0, 1, 2],
    exhaustive=True,
)


def _smooth_probabilities(shape, seed=0) -> torch.Tensor:
    """Three smooth, positive fields normalised to sum to 1, with a confident foreground blob."""
    rng = np.random.default_rng(seed)
    fields = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 2.0) for _ in range(3)])
    fields[1] += 4.0 * (ndimage.gaussian_filter((rng.random(shape) > 0.995).astype(float), 2.0) > 0.01)
    e = np.exp(3.0 * fields)
    return torch.as_tensor(e / e.sum(0), dtype=torch.float32)


@pytest.mark.parametrize("code", ["RAS", "LPS", "LAS"])
def test_resampling_by_affines_matches_monais_inverse(tmp_path, code):
    image, _, affine = make_phantom(np.random.default_rng(1), SPEC)
    path = tmp_path / f"img_{code}.nii.gz"
    nib.save(to_nifti(image, affine, code), path)
    chain = inference_transforms(PRE)
    img: MetaTensor = chain(as_record("c", path))[IMAGE]
    probs = _smooth_probabilities(img.shape[1:])

    # MONAI: undo spacing, crop and orientation through the recorded operations.
    out = MetaTensor(probs.clone(), meta=dict(img.meta))
    out.applied_operations = list(img.applied_operations)
    monai_result = torch.as_tensor(chain.inverse({IMAGE: out})[IMAGE])

    grid = Grid(np.asarray(img.affine, np.float64), img.meta["original_affine"], tuple(img.meta["original_shape"]))
    ours = resample_to_grid(probs, grid, background_first=True)
    assert tuple(ours.shape[1:]) == nib.load(path).shape == tuple(monai_result.shape[1:])
    # Where both lie inside the body crop they agree to interpolation accuracy, and the labels agree almost
    # everywhere (MONAI pads the cropped-away air with all-zero probabilities, seg3d with background = 1).
    crop = (monai_result.sum(0) > 0.99).numpy()  # MONAI leaves all-zero probabilities outside the body crop
    inside = torch.as_tensor(ndimage.binary_erosion(crop, iterations=2))  # away from the crop's edge
    assert inside.float().mean() > 0.3
    torch.testing.assert_close(ours[:, inside], monai_result[:, inside], atol=2e-2, rtol=0)
    agree = (ours.argmax(0) == monai_result.argmax(0))[torch.as_tensor(crop)].float().mean()
    assert agree > 0.995, float(agree)
    assert (ours.argmax(0)[~torch.as_tensor(crop)] == 0).all(), "outside the body crop is background"
    np.testing.assert_allclose(ours.sum(0).numpy(), 1.0, atol=1e-4)


def test_label_shortcut_is_exactly_the_full_argmax(tmp_path):
    """labels_in_grid resamples only near the foreground; it must equal the argmax of the full resampling."""
    image, _, affine = make_phantom(np.random.default_rng(2), SPEC)
    path = tmp_path / "img.nii.gz"
    nib.save(to_nifti(image, affine, "LPS"), path)
    img = inference_transforms(replace(PRE, target_spacing=(1.7, 1.4, 4.0)))(as_record("c", path))[IMAGE]
    grid = Grid(np.asarray(img.affine, np.float64), img.meta["original_affine"], tuple(img.meta["original_shape"]))
    for seed in range(3):
        probs = _smooth_probabilities(img.shape[1:], seed)
        full = resample_to_grid(probs, grid, background_first=True).argmax(0).to(torch.uint8).numpy()
        np.testing.assert_array_equal(labels_in_grid(probs, grid), full)
    empty = torch.zeros_like(probs)
    empty[0] = 1.0
    assert not labels_in_grid(empty, grid).any()


def test_bounding_box_is_the_tightest_box_and_grows_by_its_margin_within_the_array():
    mask = np.zeros((10, 12, 8), bool)
    mask[2, 5, 0] = mask[6, 3, 7] = True
    box = bounding_box(mask)
    assert box == (slice(2, 7), slice(3, 6), slice(0, 8))
    assert mask[box].sum() == mask.sum() and mask[box].shape == (5, 3, 8)
    assert bounding_box(mask, margin=1) == (slice(1, 8), slice(2, 7), slice(0, 8)), "clipped at the array's edges"
    assert bounding_box(np.zeros((4, 4, 4), bool)) is None
