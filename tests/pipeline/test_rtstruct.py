"""RT Structure Sets (pipeline/rtstruct.py) and the DICOM SEG, as a planning system and a PACS get them: each passes
dicom3tools' dciodvfy without an error; the RTSTRUCT's contours, filled again, give the mask back within one voxel
of its boundary (the round-trip Dice per structure of the real series is printed: `pytest -s`), and its points lie
on the structure's boundary voxel centres in patient coordinates; the SEG's frames equal the NIfTI mask."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform
from scipy import ndimage

from pipeline.cli import main
from pipeline.errors import Seg3dError
from pipeline.imageio import LPS_TO_RAS, read_volume
from pipeline.infer import run_inference
from pipeline.predict import Prediction
from pipeline.rtstruct import check_rtstruct_sources, read_rtstruct, write_rtstruct
from pipeline.writers import dicom_seg_sources
from tests.pipeline._ct_series import dciodvfy_errors, files_under, phantom_hu, write_ct_series
from tests.pipeline.conftest import PRE
from tests.pipeline.test_infer import _series_with_uids

# TotalSegmentator v2 ids of dicom_series_labels.nii.gz (../shared/data/real_ct/README.md).
REAL_STRUCTURES = {1: "spleen", 5: "liver", 6: "stomach", 7: "pancreas", 52: "aorta"}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _within_one_voxel_of_the_boundary(mask: np.ndarray, back: np.ndarray) -> bool:
    """Every voxel that differs lies within one voxel (in-plane, 8-neighbourhood) of the mask's boundary."""
    plane = np.ones((3, 3, 1), bool)
    band = ndimage.binary_dilation(mask, plane) & ~ndimage.binary_erosion(mask, plane)
    return not bool(((mask ^ back) & ~band).any())


@pytest.fixture
def real_series(real_ct, tmp_path) -> Path:
    return _series_with_uids(real_ct, tmp_path / "series")


def test_round_trip_of_the_real_series_per_structure(real_ct, real_series, tmp_path):
    """The reference organ masks of the real series (LAS on disk, put on the series' LPS grid) through an RTSTRUCT
    and back."""
    volume = read_volume(real_series)
    labels_img = nib.load(real_ct / "dicom_series_labels.nii.gz")
    turn = ornt_transform(io_orientation(labels_img.affine), io_orientation(volume.affine))
    np.testing.assert_allclose(labels_img.as_reoriented(turn).affine, volume.affine, atol=1e-3)
    ids = apply_orientation(np.asarray(labels_img.dataobj), turn)
    classes = np.zeros(ids.shape, np.uint8)
    for index, value in enumerate(REAL_STRUCTURES, start=1):
        classes[ids == value] = index
    pre = replace(PRE, label_names=["background", *REAL_STRUCTURES.values()], label_values=[0, *REAL_STRUCTURES])
    sources = dicom_seg_sources(real_series)
    out = write_rtstruct(
        Prediction(classes, volume.affine, source=volume.source),
        pre,
        sources=sources,
        out=tmp_path / "rt.dcm",
        model_name="reference masks",
    )
    back = read_rtstruct(out, dicom_seg_sources(real_series))
    assert list(back) == list(REAL_STRUCTURES.values())
    dice = {}
    for index, name in enumerate(REAL_STRUCTURES.values(), start=1):
        mask = classes == index
        assert mask.sum() > 1000, f"{name} is in the series"
        dice[name] = _dice(mask, back[name])
        assert _within_one_voxel_of_the_boundary(mask, back[name]), name
    print("RTSTRUCT round-trip Dice on the real series:", {k: round(v, 4) for k, v in dice.items()})
    assert min(dice.values()) > 0.99
    assert dciodvfy_errors(out) == []  # last: without dicom3tools the test skips here, after the round trip


def test_holes_one_voxel_lines_islands_and_empty_structures_come_back(tmp_path):
    series = tmp_path / "series"
    write_ct_series(series, phantom_hu((48, 48, 8)))
    volume = read_volume(series)
    classes = np.zeros(volume.array.shape, np.uint8)
    classes[8:30, 8:30, 1:5] = 1
    classes[14:22, 14:22, 1:5] = 0  # a hole
    classes[35:36, 5:40, 2:4] = 2  # a one-voxel-wide line
    classes[40:44, 40:44, 6] = 2  # an island on another slice
    classes[2, 45, 7] = 2  # a single voxel
    names = ["background", "pancreas", "cancer", "liver"]  # liver: not found, still listed
    pre = replace(PRE, label_names=names, label_values=[0, 1, 2, 3])
    sources = dicom_seg_sources(series)
    out = write_rtstruct(
        Prediction(classes, volume.affine), pre, sources=sources, out=tmp_path / "rt.dcm", model_name="m"
    )
    back = read_rtstruct(out, sources)
    assert list(back) == names[1:]
    for index, name in enumerate(names[1:], start=1):
        mask = classes == index
        assert _within_one_voxel_of_the_boundary(mask, back[name]), name
        assert (back[name] == mask).all() if name != "liver" else not back[name].any()
    assert dciodvfy_errors(out) == []


def test_contour_points_are_boundary_voxel_centres_in_patient_coordinates(tmp_path):
    """Independent of rt-utils' reader: every point, mapped through the series' own affine, is the centre of a voxel
    of the structure on the slice the contour references, next to a voxel outside it. Rows != Columns here."""
    import pydicom

    series = tmp_path / "series"
    write_ct_series(series, phantom_hu((52, 36, 6)))
    volume = read_volume(series)
    classes = np.zeros(volume.array.shape, np.uint8)
    classes[10:40, 6:20, 1:5] = 1
    classes[20:30, 20:30, 2:4] = 1
    sources = dicom_seg_sources(series)
    pre = replace(PRE, label_names=["background", "pancreas"], label_values=[0, 1])
    out = write_rtstruct(
        Prediction(classes, volume.affine), pre, sources=sources, out=tmp_path / "rt.dcm", model_name="m"
    )
    ds = pydicom.dcmread(out)
    to_index = np.linalg.inv(LPS_TO_RAS @ volume.affine)  # LPS mm -> (x, y, z) voxel index
    slice_of = {s.SOPInstanceUID: z for z, s in enumerate(sources)}
    mask = classes == 1
    edge = mask & ~ndimage.binary_erosion(mask, np.ones((3, 3, 1), bool))
    points = 0
    for contour in ds.ROIContourSequence[0].ContourSequence:
        xyz = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        ijk = np.c_[xyz, np.ones(len(xyz))] @ to_index.T
        assert np.abs(ijk[:, :3] - np.round(ijk[:, :3])).max() < 1e-3, "on voxel centres"
        i, j, k = np.round(ijk[:, :3]).astype(int).T
        assert set(k) == {slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]}
        assert edge[i, j, k].all(), "on the structure's boundary"
        points += len(xyz)
    assert points > 20


def test_non_square_pixels_are_refused_before_any_compute(tmp_path):
    series = tmp_path / "series"
    write_ct_series(series, phantom_hu(), spacing=(0.7, 0.9, 2.5))
    with pytest.raises(Seg3dError, match=r"non-square pixels \(0.9 x 0.7 mm\).*--dicom-seg works"):
        check_rtstruct_sources(dicom_seg_sources(series), series)


def test_an_rtstruct_for_a_nifti_input_is_one_line_exit_2_and_nothing_written(real_ct, bundle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["infer", "--model", str(bundle_dir), "--input", str(real_ct / "ct_small.nii.gz"), "--output", str(out)]
    assert main([*argv, "--rtstruct"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--dicom-rtstruct needs a DICOM series" in err and "'ct_small'" in err
    assert files_under(out) == [] and not out.exists()


def test_infer_writes_a_seg_and_an_rtstruct_that_dciodvfy_accepts_and_that_read_back_as_the_mask(bundle_dir, tmp_path):
    """A multi-slice phantom series with real UIDs and a patient, as a PACS sends it (issue 14, 2.1 and 2.2)."""
    import highdicom as hd

    series = tmp_path / "series"
    write_ct_series(series, phantom_hu((48, 44, 10)))
    summary = run_inference(
        bundle_dir, series, tmp_path / "out", dicom_seg=True, rtstruct=True, postprocess=False, progress=False
    )
    assert summary.done == ["series"]
    out = tmp_path / "out"
    labels = np.asarray(nib.load(out / "series.nii.gz").dataobj)
    assert labels.any(), "the untrained model marks some voxels: there are contours to check"
    sources = dicom_seg_sources(series)
    frames = hd.seg.segread(out / "series_seg.dcm").get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in sources], combine_segments=True
    )
    np.testing.assert_array_equal(frames, labels.transpose(2, 1, 0))
    back = read_rtstruct(out / "series_rtstruct.dcm", sources)
    for index, name in enumerate(PRE.label_names[1:], start=1):
        assert _within_one_voxel_of_the_boundary(labels == index, back[name]), name
    assert dciodvfy_errors(series / sorted(p.name for p in series.iterdir())[0]) == [], "the source is clean too"
    assert dciodvfy_errors(out / "series_seg.dcm") == []
    assert dciodvfy_errors(out / "series_rtstruct.dcm") == []
