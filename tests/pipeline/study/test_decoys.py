"""Decoy masks: the confusion measure on hand-made arrays, the geometry check of read_decoy on real NIfTI files, and
the datalist's "decoy" key (read from `seg3d synth`'s dataset.json, hostile paths refused)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.datalists import load_dataset
from pipeline.errors import Seg3dError
from pipeline.study.decoys import decoy_confusion, read_decoy
from pipeline.synthetic import synthesize, to_nifti
from tests.pipeline._datasets import ct, organ, save

# -- decoy_confusion ----------------------------------------------------------------------------------------------


def test_decoy_confusion_is_the_fraction_of_decoy_voxels_with_the_class():
    labels = np.zeros((4, 3, 2), dtype=np.uint8)
    decoy = np.zeros((4, 3, 2), dtype=np.uint8)
    decoy[0] = 1  # 6 decoy voxels
    labels[0, 0, :] = 1  # 2 of them labelled pancreas
    labels[0, 1, 0] = 2  # 1 labelled cancer
    labels[3] = 1  # pancreas outside the decoys does not count
    assert decoy_confusion(labels, decoy, 1) == pytest.approx(2 / 6)
    assert decoy_confusion(labels, decoy, 2) == pytest.approx(1 / 6)
    assert decoy_confusion(labels, decoy, 0) == pytest.approx(3 / 6)
    assert decoy_confusion(labels, decoy.astype(bool), 1) == pytest.approx(2 / 6)  # a bool mask is the same mask


def test_decoy_confusion_none_without_decoys_and_refuses_other_shapes():
    labels = np.ones((4, 3, 2), dtype=np.uint8)
    assert decoy_confusion(labels, np.zeros((4, 3, 2), np.uint8), 1) is None
    with pytest.raises(Seg3dError, match=r"shape \(4, 3, 2\) and decoy mask of shape \(4, 3, 3\) differ"):
        decoy_confusion(labels, np.zeros((4, 3, 3), np.uint8), 1)


# -- read_decoy ---------------------------------------------------------------------------------------------------


def _mask() -> np.ndarray:
    mask = np.zeros((10, 8, 6), dtype=np.uint8)
    mask[2:5, 3:6, 1:4] = 1
    return mask


def test_read_decoy_in_the_prediction_grid_of_a_non_ras_file(tmp_path):
    """Stored LPS (as synth stores every second case), the mask comes back in stored order with the image's affine."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image = to_nifti(np.zeros((10, 8, 6), np.int16), affine, "LPS")
    stored = to_nifti(_mask(), affine, "LPS")
    nib.save(stored, tmp_path / "decoy.nii.gz")
    mask = read_decoy(tmp_path / "decoy.nii.gz", like_affine=image.affine, like_shape=image.shape)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, np.asarray(stored.dataobj) == 1)
    assert mask.sum() == _mask().sum()


def test_read_decoy_refuses_another_grid_and_other_values_in_one_line(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    save(tmp_path / "decoy.nii.gz", _mask(), affine)
    shifted = affine.copy()
    shifted[0, 3] = 0.8  # one voxel along x
    for like_affine, like_shape in ((affine, (10, 8, 7)), (shifted, (10, 8, 6))):
        with pytest.raises(Seg3dError) as err:
            read_decoy(tmp_path / "decoy.nii.gz", like_affine=like_affine, like_shape=like_shape, case="c1")
        text = str(err.value)
        assert "\n" not in text and "decoy.nii.gz" in text and "c1" in text and "decoy mask of the image" in text
    save(tmp_path / "two.nii.gz", _mask() * 2, affine)
    with pytest.raises(Seg3dError, match="holds values 2; a decoy mask holds 0"):
        read_decoy(tmp_path / "two.nii.gz", like_affine=affine, like_shape=(10, 8, 6))
    with pytest.raises(Seg3dError, match="decoy mask not found"):
        read_decoy(tmp_path / "none.nii.gz", like_affine=affine, like_shape=(10, 8, 6))


# -- the datalist's "decoy" key -----------------------------------------------------------------------------------


def test_datalist_reads_the_decoy_masks_synth_writes(tmp_path):
    synthesize(tmp_path, cases=2, seed=1, test_cases=1)
    ds = load_dataset(tmp_path)
    assert [c.decoy for c in ds.cases] == [tmp_path / "decoysTr" / f"pancreas_00{i}.nii.gz" for i in (1, 2)]
    assert [c.decoy for c in ds.test] == [tmp_path / "decoysTs" / "pancreas_003.nii.gz"]
    for case in ds.cases + ds.test:
        image = nib.load(case.image)
        mask = read_decoy(case.decoy, like_affine=image.affine, like_shape=image.shape, case=case.case)
        assert mask.shape == image.shape


def _msd(root: Path, decoy: object = None, test: list | None = None) -> Path:
    """A one-case dataset.json with real files, its training entry's "decoy" set to `decoy` (absent when None)."""
    save(root / "imagesTr" / "a.nii.gz", ct())
    save(root / "labelsTr" / "a.nii.gz", organ())
    save(root / "decoysTr" / "a.nii.gz", np.zeros_like(organ()))
    entry = {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}
    if decoy is not None:
        entry["decoy"] = decoy
    doc = {"labels": {"0": "background", "1": "pancreas", "2": "cancer"}, "training": [entry], "test": test or []}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def test_datalist_decoy_absent_is_none_and_relative_inside_is_read(tmp_path):
    assert load_dataset(_msd(tmp_path)).cases[0].decoy is None
    assert load_dataset(_msd(tmp_path, "./decoysTr/a.nii.gz")).cases[0].decoy == tmp_path / "decoysTr" / "a.nii.gz"
    inside_absolute = str(tmp_path / "decoysTr" / "a.nii.gz")
    assert load_dataset(_msd(tmp_path, inside_absolute)).cases[0].decoy == Path(inside_absolute)
    # A test entry written as a dict may name its decoy mask; a test entry given as a path finds it in decoysTs/.
    save(tmp_path / "imagesTs" / "b.nii.gz", ct())
    save(tmp_path / "imagesTs" / "c.nii.gz", ct())
    save(tmp_path / "decoysTs" / "c.nii.gz", np.zeros_like(organ()))
    test = [{"image": "./imagesTs/b.nii.gz", "decoy": "./decoysTr/a.nii.gz"}, "./imagesTs/c.nii.gz"]
    ds = load_dataset(_msd(tmp_path, test=test))
    assert [c.decoy for c in ds.test] == [tmp_path / "decoysTr" / "a.nii.gz", tmp_path / "decoysTs" / "c.nii.gz"]


def test_datalist_refuses_hostile_decoy_paths_in_one_line(tmp_path):
    root = tmp_path / "data"
    outside = save(tmp_path / "x.nii.gz", np.zeros_like(organ()))  # exists, but outside the dataset folder
    (root / "decoysTr").mkdir(parents=True)
    (root / "decoysTr" / "link.nii.gz").symlink_to(outside)
    for decoy, why in [
        ("../x.nii.gz", "outside the dataset folder"),
        (str(outside), "outside the dataset folder"),
        ("./decoysTr/link.nii.gz", "outside the dataset folder"),
        ("./decoysTr/missing.nii.gz", "not found"),
        ("./decoysTr", "not found"),
        ("", "must be a path"),
        (7, "must be a path"),
    ]:
        path = _msd(root, decoy)
        with pytest.raises(Seg3dError) as err:
            load_dataset(path)
        text = str(err.value)
        assert why in text and "training entry 0" in text and "\n" not in text, (decoy, text)
    test = [{"image": "./imagesTr/a.nii.gz", "decoy": "../x.nii.gz"}]
    with pytest.raises(Seg3dError, match=r"test entry 0.*outside the dataset folder"):
        load_dataset(_msd(root, test=test))


def test_folder_and_csv_layouts_have_no_decoys(tmp_path):
    save(tmp_path / "images" / "a.nii.gz", ct())
    save(tmp_path / "labels" / "a.nii.gz", organ())
    save(tmp_path / "decoysTr" / "a.nii.gz", np.zeros_like(organ()))  # not part of a folder layout: ignored
    (tmp_path / "list.csv").write_text("case,image,label\na,images/a.nii.gz,labels/a.nii.gz\n")
    for source in (tmp_path, tmp_path / "list.csv"):
        assert [c.decoy for c in load_dataset(source).cases] == [None]


def test_decoy_does_not_change_the_fingerprint_of_a_dataset(tmp_path):
    """The fingerprint names the training data; the mask is only read to score context errors."""
    without = load_dataset(_msd(tmp_path)).fingerprint()
    assert load_dataset(_msd(tmp_path, "./decoysTr/a.nii.gz")).fingerprint() == without
