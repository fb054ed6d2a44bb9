from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from pipeline.config import InferenceConfig, load_config
from pipeline.errors import Seg3dError
from pipeline.integrity import CaseInfo
from pipeline.predict import Predictor
from pipeline.synthetic import CaseSpec, make_phantom, to_nifti
from pipeline.transforms import (
    IMAGE,
    LABEL,
    Preprocessing,
    as_record,
    cached_train_transforms,
    compute_preprocessing,
    random_train_transforms,
    validation_transforms,
)

LABELS = {"background": 0, "pancreas": 1, "cancer": 2}
SPEC = CaseSpec(shape=(96, 96, 32), spacing=(0.8, 0.8, 2.5), orientation="RAS", tumour=True, decoys=2)


def _info(case, spacing, sample):
    return CaseInfo(
        case=case,
        shape_ras=(10, 10, 10),
        spacing_ras=spacing,
        orientation="RAS",
        hu_range=(-1000.0, 1000.0),
        label_voxels={},
        foreground_sample=np.asarray(sample, dtype=np.float32),
    )


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One phantom stored three ways: RAS, LPS and LAS (same anatomy, different voxel order and header)."""
    root = tmp_path_factory.mktemp("orient")
    image, label, affine = make_phantom(np.random.default_rng(4), SPEC)
    paths = {}
    for code in ("RAS", "LPS", "LAS"):
        nib.save(to_nifti(image, affine, code), root / f"img_{code}.nii.gz")
        nib.save(to_nifti(label, affine, code), root / f"lab_{code}.nii.gz")
        paths[code] = (root / f"img_{code}.nii.gz", root / f"lab_{code}.nii.gz")
    return paths, image, label, affine


def _pre(**kw) -> Preprocessing:
    base = Preprocessing(
        target_spacing=(1.2, 1.2, 3.0),
        intensity_mode="foreground",
        clip=(-40.0, 220.0),
        mean=100.0,
        std=30.0,
        foreground_crop=True,
        body_threshold_hu=-500.0,
        label_names=list(LABELS),
        label_values=list(LABELS.values()),
        exhaustive=True,
    )
    return replace(base, **kw)


def test_statistics_are_the_training_sets_median_spacing_and_foreground_percentiles():
    rng = np.random.default_rng(0)
    samples = [rng.normal(100, 20, 5000), rng.normal(60, 10, 3000), rng.normal(120, 30, 4000)]
    infos = [
        _info(f"c{i}", sp, s)
        for i, (sp, s) in enumerate(zip([(0.7, 0.7, 2.5), (0.9, 0.9, 5.0), (0.8, 0.8, 1.5)], samples))
    ]
    pre = compute_preprocessing(load_config(None), LABELS, True, infos)
    assert pre.target_spacing == pytest.approx((0.8, 0.8, 2.5)) and pre.spacing_source == "median"
    pooled = np.concatenate(samples)
    lo, hi = np.percentile(pooled, [0.5, 99.5])
    assert pre.clip == pytest.approx((lo, hi))
    assert pre.mean == pytest.approx(np.clip(pooled, lo, hi).mean(), rel=1e-6)
    assert pre.std == pytest.approx(np.clip(pooled, lo, hi).std(), rel=1e-6)

    windowed = compute_preprocessing(
        load_config(None, ["data.intensity.mode=window", "data.target_spacing=[1, 1, 2]"]), LABELS, True, infos
    )
    assert windowed.clip == (-160.0, 240.0) and windowed.target_spacing == (1.0, 1.0, 2.0)
    assert Preprocessing.from_json(windowed.to_json()) == windowed


def test_preprocessing_is_independent_of_the_stored_orientation(phantom):
    """RAS, LPS and LAS files of one scan give the same preprocessed arrays, at the target spacing."""
    paths, *_ = phantom
    pre = _pre()
    chain = validation_transforms(pre)
    out = {code: chain(as_record(code, *paths[code])) for code in paths}
    ref = out["RAS"]
    spacing = np.linalg.norm(np.asarray(ref[IMAGE].affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, pre.target_spacing, atol=1e-5)
    for code in ("LPS", "LAS"):
        np.testing.assert_allclose(out[code][IMAGE].numpy(), ref[IMAGE].numpy(), atol=1e-4)
        np.testing.assert_array_equal(out[code][LABEL].numpy(), ref[LABEL].numpy())
        np.testing.assert_allclose(np.asarray(out[code][IMAGE].affine), np.asarray(ref[IMAGE].affine), atol=1e-4)
    # Normalised: clipped to the percentiles, then z-scored.
    img = ref[IMAGE].numpy()
    assert img.min() >= (pre.clip[0] - pre.mean) / pre.std - 1e-4
    assert img.max() <= (pre.clip[1] - pre.mean) / pre.std + 1e-4
    assert ref[LABEL].dtype == torch.uint8 and {0, 1} <= set(np.unique(ref[LABEL].numpy())) <= {0, 1, 2}


def test_foreground_crop_removes_air_and_keeps_the_body(phantom):
    paths, image, label, _ = phantom
    cropped = validation_transforms(_pre(target_spacing=SPEC.spacing))(as_record("c", *paths["RAS"]))
    assert cropped[IMAGE].shape[1] < image.shape[0], "the air around the body was not cropped"
    assert int((cropped[LABEL] > 0).sum()) == int((label > 0).sum()), "foreground lost in the crop"


def test_train_patches_have_the_patch_size_and_honour_the_foreground_fraction(phantom):
    paths, *_ = phantom
    cfg = load_config(
        None,
        [
            "data.patch_size=[32, 32, 16]",
            "data.samples_per_volume=4",
            "train.batch_size=4",
            "data.foreground_fraction=1.0",
        ],
    )
    pre = _pre()
    cached = cached_train_transforms(cfg, pre)(as_record("c", *paths["LPS"]))
    rnd = random_train_transforms(cfg, pre)
    rnd.set_random_state(seed=0)
    for _ in range(3):
        patches = rnd(cached)
        assert len(patches) == 4
        for p in patches:
            assert tuple(p[IMAGE].shape) == (1, 32, 32, 16) and tuple(p[LABEL].shape) == (1, 32, 32, 16)
            assert p[LABEL].dtype == torch.uint8 and p[IMAGE].dtype == torch.float32
            assert (p[LABEL] > 0).any(), "foreground_fraction=1 must centre every patch on foreground"
            assert set(p) == {"case", IMAGE, LABEL}, "index arrays must not reach the collate"


def test_a_thin_volume_is_padded_to_the_patch(tmp_path):
    image, label, affine = make_phantom(np.random.default_rng(0), replace(SPEC, shape=(64, 64, 8)))
    nib.save(to_nifti(image, affine, "RAS"), tmp_path / "i.nii.gz")
    nib.save(to_nifti(label, affine, "RAS"), tmp_path / "l.nii.gz")
    cfg = load_config(None, ["data.patch_size=[32, 32, 32]", "data.samples_per_volume=1"])
    cached = cached_train_transforms(cfg, _pre())(as_record("thin", tmp_path / "i.nii.gz", tmp_path / "l.nii.gz"))
    assert cached[IMAGE].shape[3] >= 32
    patch = random_train_transforms(cfg, _pre())(cached)[0]
    assert tuple(patch[IMAGE].shape) == (1, 32, 32, 32)


def test_label_selection_maps_values_and_exhaustive_labels_refuse_others(tmp_path, phantom):
    paths, _, label, affine = phantom
    ts = np.where(label == 1, 7, np.where(label == 2, 5, 0)).astype(np.uint8)  # TotalSegmentator-like ids
    nib.save(nib.Nifti1Image(ts, affine), tmp_path / "ts.nii.gz")
    selected = _pre(label_names=["background", "pancreas"], label_values=[0, 7], exhaustive=False)
    out = validation_transforms(selected)(as_record("c", paths["RAS"][0], tmp_path / "ts.nii.gz"))
    assert set(np.unique(out[LABEL].numpy())) == {0, 1}, "value 7 becomes class 1, value 5 background"
    with pytest.raises(Seg3dError, match=r"^c: label values 5, 7 are not declared"):
        validation_transforms(_pre())(as_record("c", paths["RAS"][0], tmp_path / "ts.nii.gz"))


class _Threshold(nn.Module):
    """A 'network' whose answer is known: class 1 wherever the normalised CT exceeds a level. Used to check
    geometry, not learning: whatever the storage, the prediction must land on the voxels that are bright."""

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, x):
        d = (x - self.level) * 50.0
        return torch.cat([-d, d, torch.full_like(d, -1e4)], dim=1)


@pytest.mark.parametrize("code", ["RAS", "LPS", "LAS"])
def test_prediction_lands_in_the_inputs_own_grid(phantom, code):
    """Predict through preprocessing (crop, resampling to 1.2 x 1.2 x 3 mm, RAS) and its inverse: the labels
    come back in the file's own voxel grid, and match where the CT really is bright (bone, > 200 HU)."""
    paths, *_ = phantom
    pre = _pre(clip=(-1000.0, 1000.0), mean=0.0, std=100.0)
    predictor = Predictor(_Threshold(2.0), pre, patch_size=(48, 48, 16), inference=InferenceConfig(), precision="fp32")
    pred = predictor.predict_file(paths[code][0])
    stored = nib.load(paths[code][0])
    assert pred.labels.shape == stored.shape and pred.labels.dtype == np.uint8
    np.testing.assert_allclose(pred.affine, stored.affine, atol=1e-5)
    truth = np.asarray(stored.dataobj) > 200
    agreement = (pred.labels.astype(bool) == truth).mean()
    dice = 2 * (pred.labels.astype(bool) & truth).sum() / (pred.labels.astype(bool).sum() + truth.sum())
    assert agreement > 0.99 and dice > 0.85, (agreement, dice)
    # The same check with the prediction flipped fails: the test can tell a mirrored result.
    flipped = pred.labels[:, ::-1].astype(bool)  # anterior-posterior: the spine is not symmetric there
    assert 2 * (flipped & truth).sum() / (flipped.sum() + truth.sum()) < dice - 0.2


@pytest.mark.parametrize(
    "spacing, target, flip",
    [
        ((0.8, 0.8, 2.5), (1.0, 1.0, 3.0), False),  # downsampling, the CT case
        ((1.7, 0.6, 4.0), (1.0, 1.0, 1.5), False),  # up on two axes, down on one
        ((0.9, 1.1, 2.0), (1.0, 1.0, 3.0), True),  # a flipped axis (not reoriented first)
        ((1.0, 0.7, 3.0), (1.0, 1.0, 3.0), False),  # two axes already at the target spacing
    ],
)
def test_separable_resampling_equals_monais_spacing(spacing, target, flip, monkeypatch):
    """ResampleToSpacingd computes MONAI Spacingd's grid, affine and values (trilinear, border padding) by three 1-D
    interpolations; labels (nearest) are MONAI's own, voxel for voxel."""
    from monai.transforms import Spacingd

    import pipeline.transforms as transforms
    from pipeline.transforms import ResampleToSpacingd

    calls = []
    real = transforms.separable_resample
    monkeypatch.setattr(transforms, "separable_resample", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(0)
    shape = (37, 29, 23)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    if flip:
        affine[0, 0] *= -1
    smooth = torch.from_numpy(rng.normal(size=(2, *shape)).astype(np.float32)).cumsum(1).cumsum(3)
    image = MetaTensor(smooth, affine=torch.as_tensor(affine))
    label = MetaTensor(torch.from_numpy(rng.integers(0, 3, size=(1, *shape)).astype(np.float32)), affine=affine)
    data = {IMAGE: image, LABEL: label}
    ours = ResampleToSpacingd((IMAGE, LABEL), pixdim=target, mode=("bilinear", "nearest"))(dict(data))
    ref = Spacingd((IMAGE, LABEL), pixdim=target, mode=("bilinear", "nearest"), dtype=np.float32)(dict(data))
    assert calls == [1]  # the image went the separable way (the label MONAI's)
    for key in (IMAGE, LABEL):
        assert ours[key].shape == ref[key].shape
        torch.testing.assert_close(ours[key].affine, ref[key].affine)
    scale = ref[IMAGE].abs().max().item()
    torch.testing.assert_close(ours[IMAGE].as_tensor(), ref[IMAGE].as_tensor(), atol=1e-5 * scale, rtol=1e-5)
    assert torch.equal(ours[LABEL].as_tensor(), ref[LABEL].as_tensor())


def test_an_oblique_grid_is_resampled_by_monai():
    """A mapping that is not axis-aligned is not separable: MONAI's Spacingd does it, with the same result."""
    from monai.transforms import Spacingd

    from pipeline.transforms import ResampleToSpacingd

    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]]) @ np.diag([0.8, 0.8, 1.0, 1.0])
    image = MetaTensor(torch.randn(1, 20, 18, 9), affine=torch.as_tensor(affine))
    ours = ResampleToSpacingd(IMAGE, pixdim=(1.0, 1.0, 3.0), mode="bilinear")({IMAGE: image})[IMAGE]
    ref = Spacingd(IMAGE, pixdim=(1.0, 1.0, 3.0), mode="bilinear", dtype=np.float32)({IMAGE: image})[IMAGE]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.as_tensor(), ref.as_tensor())


@pytest.mark.parametrize("shape", [(7, 5, 3), (16, 9, 11), (4, 4, 1)])
def test_memory_order_conversions_copy_exactly(shape):
    from pipeline.imageio import c_ordered, fortran_ordered

    array = np.asfortranarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    out = c_ordered(array)
    assert out.is_contiguous() and tuple(out.shape) == shape
    np.testing.assert_array_equal(out.numpy(), array)
    c_array = np.ascontiguousarray(array)
    np.testing.assert_array_equal(c_ordered(c_array).numpy(), array)
    back = fortran_ordered(c_array)
    assert back.flags.f_contiguous
    np.testing.assert_array_equal(back, array)
