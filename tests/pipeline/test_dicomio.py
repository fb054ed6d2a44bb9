"""DICOM series folders read through pipeline.imageio.read_volume (pipeline.dicomio): the real series of
../shared/data/real_ct and broken copies of it made here."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.errors import Seg3dError
from pipeline.imageio import LPS_TO_RAS, read_volume, to_ras


def test_dicom_series_geometry_in_ras_and_hu_after_rescale(real_ct):
    """SimpleITK gives LPS; the affine must be the RAS one, and the stored unsigned values must come back
    as HU (RescaleIntercept -1024 applied): checked against the raw pixels of the first slice."""
    v = read_volume(real_ct / "dicom_series", case="dcm")
    assert v.array.shape == (512, 512, 20) and v.array.dtype == np.float32
    assert v.axcodes == "LPS" and v.notes == []
    # DICOM: identity direction, origin (-249.51, -437.51, -804.5) in LPS; x and y negate in RAS.
    expected = np.diag([-0.9765625, -0.9765625, 2.0, 1.0])
    expected[:3, 3] = (249.51171875, 437.51171875, -804.5)
    np.testing.assert_allclose(v.affine, expected)
    np.testing.assert_allclose(LPS_TO_RAS @ v.affine @ [0, 0, 0, 1], (-249.51171875, -437.51171875, -804.5, 1))
    pydicom = pytest.importorskip("pydicom")
    first = next(
        ds
        for ds in (pydicom.dcmread(p) for p in sorted((real_ct / "dicom_series").glob("*.dcm")))
        if float(ds.ImagePositionPatient[2]) == -804.5
    )
    assert int(first.PixelRepresentation) == 0 and float(first.RescaleIntercept) == -1024
    hu = first.pixel_array.astype(np.float32) * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(v.array[:, :, 0], hu.T)  # pydicom rows are y, columns x
    assert v.array.min() < -1000 + 50  # air in HU, impossible for the unsigned stored values


def test_dicom_folder_errors(real_ct, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Seg3dError, match=r"^c1: no DICOM series in .*empty"):
        read_volume(empty, case="c1")
    pydicom = pytest.importorskip("pydicom")
    two = tmp_path / "two"
    two.mkdir()
    second = pydicom.uid.generate_uid()
    for i, path in enumerate(sorted((real_ct / "dicom_series").glob("*.dcm"))[:6]):
        ds = pydicom.dcmread(path)
        if i >= 3:
            ds.SeriesInstanceUID = second
        ds.save_as(two / path.name)
    with pytest.raises(Seg3dError, match=r"^c1: 2 DICOM series in .*two; point at a folder holding exactly one"):
        read_volume(two, case="c1")


def test_dicom_missing_slice_is_an_error(real_ct, tmp_path):
    """ITK takes the slice gap from the first two slices; a gap further on would stretch the anatomy silently."""
    series = tmp_path / "series"
    shutil.copytree(real_ct / "dicom_series", series)
    (series / "slice_010.dcm").unlink()
    with pytest.raises(
        Seg3dError, match=r"^c1: DICOM series .* has uneven slice gaps, 2 to 4 mm \(a missing slice\?\)"
    ):
        read_volume(series, case="c1")


def test_dicom_series_and_las_label_align_voxel_for_voxel(real_ct):
    """The DICOM series (LPS) and its label map (stored LAS) must coincide once both are in RAS. The content
    check fails for a label flipped along y or x: solid organs land on fat and air."""
    image = to_ras(read_volume(real_ct / "dicom_series"))
    label = to_ras(read_volume(real_ct / "dicom_series_labels.nii.gz", kind="label"))
    assert read_volume(real_ct / "dicom_series_labels.nii.gz", kind="label").axcodes == "LAS"
    assert image.array.shape == label.array.shape == (512, 512, 20)
    np.testing.assert_allclose(image.affine, label.affine, atol=1e-3)

    def plausible(lab: np.ndarray) -> bool:
        solid = np.isin(lab, (1, 5, 7))  # TotalSegmentator v2: spleen, liver, pancreas
        medians = [float(np.median(image.array[lab == v])) for v in (1, 5, 7)]
        return all(0 <= m <= 250 for m in medians) and float(np.mean(image.array[solid] > -500)) >= 0.99

    assert plausible(label.array)
    assert not plausible(label.array[:, ::-1])
    assert not plausible(label.array[::-1])
