"""The inverse of the preprocessing: seg3d's affine resampling against MONAI's own inverse transforms."""

from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from pipeline.predict import Grid, labels_in_grid, resample_to_grid
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


def test_postprocess_keeps_the_organ_and_the_tumour_inside_it():
    from pipeline.config import PostprocessConfig
    from pipeline.predict import postprocess

    names = ["background", "pancreas", "cancer"]
    labels = np.zeros((60, 60, 40), np.uint8)
    labels[10:30, 10:30, 5:20] = 1
    labels[15:20, 15:20, 8:12] = 2  # tumour inside the gland: kept
    labels[40:45, 40:45, 30:35] = 1  # a smaller pancreas-like blob elsewhere: removed
    labels[50:53, 5:8, 2:4] = 2  # a tumour far from any pancreas: removed
    out = postprocess(labels, names, PostprocessConfig())
    expected = labels.copy()
    expected[40:45, 40:45, 30:35] = 0
    expected[50:53, 5:8, 2:4] = 0
    np.testing.assert_array_equal(out, expected)
    off = PostprocessConfig(largest_component=False, tumour_inside_pancreas=False)
    np.testing.assert_array_equal(postprocess(labels, names, off), labels)
    only_tumour_rule = postprocess(labels, names, PostprocessConfig(largest_component=False))
    assert (only_tumour_rule[40:45, 40:45, 30:35] == 1).all() and not only_tumour_rule[50:53, 5:8, 2:4].any()


@pytest.mark.parametrize("name", ["attention_unet", "danet", "emanet"])
def test_channels_last_inference_gives_the_same_probabilities(name):
    """The CPU predictor runs the network in NDHWC (faster 3D convolutions); the blended probabilities must equal
    those of the default layout, including through reshapes inside attention modules."""
    from attention3d import create_model
    from pipeline.config import InferenceConfig
    from pipeline.predict import Predictor

    torch.manual_seed(0)
    model = create_model(name, in_channels=1, out_channels=3, channels=[8, 16, 32], strides=[2, 2]).eval()
    pre = PRE
    image = torch.randn(1, 1, 40, 36, 20)
    out = {}
    for cl in (False, True):
        predictor = Predictor(model, pre, (32, 32, 16), InferenceConfig(), None, "cpu", "fp32", channels_last=cl)
        out[cl], _ = predictor.predict_probabilities(image)
    weights = [p for p in model.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2] > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
    assert not any(w.is_contiguous() for w in weights)  # really converted, not contiguous in both layouts
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-4)


def test_batch_norms_are_folded_in_a_copy_with_the_same_probabilities():
    """Predictor(fold_norms=True), as `from_bundle` builds it, runs a copy of the network with its batch norms
    folded into the convolutions: the same probabilities, and the caller's model (a bundle's, maybe saved or
    trained further) is untouched."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from attention3d import create_model
    from pipeline.config import InferenceConfig
    from pipeline.predict import Predictor
    from tests.attention3d.test_fusion import _randomise_statistics

    torch.manual_seed(0)
    model = create_model(
        "attention_unet", in_channels=1, out_channels=3, channels=[8, 16, 32], strides=[2, 2], norm="batch"
    )
    _randomise_statistics(model)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.randn(1, 1, 40, 36, 20)
    out = {}
    for fold in (False, True):
        predictor = Predictor(model, PRE, (32, 32, 16), InferenceConfig(), None, "cpu", "fp32", fold_norms=fold)
        assert any(isinstance(m, _BatchNorm) for m in predictor.model.modules()) is not fold
        out[fold], _ = predictor.predict_probabilities(image)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-4)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
