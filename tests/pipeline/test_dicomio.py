"""DICOM series folders read through pipeline.imageio.read_volume (pipeline.dicomio): the real series of
../shared/data/real_ct, broken copies of it, and uncompressed series written here with pydicom (`write_series`),
some with headers that declare more pixels than their files hold."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import limits
from pipeline.errors import Seg3dError
from pipeline.imageio import LPS_TO_RAS, read_volume, to_ras


def write_series(folder: Path, hu: np.ndarray, spacing=(0.8, 0.8, 2.0), rows: int | None = None, cols=None) -> Path:
    """An uncompressed CT series (explicit VR little endian) of `hu` (x, y, z), one file per z, stored as unsigned
    values with RescaleIntercept -1024. `rows`/`cols` override what the headers declare (the pixel data stay)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for z in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.PatientID, ds.InstanceNumber = "hostile", z + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z * spacing[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [float(spacing[1]), float(spacing[0])], float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = hu.shape[1] if rows is None else rows
        ds.Columns = hu.shape[0] if cols is None else cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.ascontiguousarray((hu[:, :, z].T + 1024).astype(np.uint16)).tobytes()  # rows are y
        pydicom.dcmwrite(folder / f"slice_{z:03d}.dcm", ds, enforce_file_format=True)
    return folder


def _ct(shape=(16, 12, 4)) -> np.ndarray:
    hu = np.full(shape, -1000, np.int16)
    hu[3:-3, 3:-3] = 40
    return hu


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


def test_an_uncompressed_series_written_here_reads_back_in_hu(tmp_path):
    """The helper's series is a valid one: the hostile copies below differ from it only in what they declare."""
    hu = _ct()
    v = read_volume(write_series(tmp_path / "s", hu), case="c1")
    np.testing.assert_array_equal(v.array, hu)
    assert v.spacing == pytest.approx((0.8, 0.8, 2.0))
    assert [Path(f).name for f in v.source.files] == [f"slice_{z:03d}.dcm" for z in range(4)]


def test_a_series_declaring_more_voxels_than_the_limit_is_refused_before_itk_reads_it(tmp_path):
    """3 files of 40000 x 40000: 4.8e9 voxels, over 2**31; ITK would allocate 9.6 GB for them first."""
    series = write_series(tmp_path / "s", _ct((16, 12, 3)), rows=40000, cols=40000)
    with pytest.raises(
        Seg3dError,
        match=r"^c1: DICOM series .* \(3 files of 40000 x 40000 x 1 frames x 1 samples\) "
        r"declares 4.8e\+09 voxels, over the limit of 2.15e\+09 \(2\*\*31\)",
    ):
        read_volume(series, case="c1")


def test_an_uncompressed_file_shorter_than_its_rows_and_columns_is_refused(tmp_path):
    """Within the limit (9e8 voxels), but each file holds 384 bytes of pixels, not 1.8 GB."""
    series = write_series(tmp_path / "s", _ct((16, 12, 2)), rows=30000, cols=30000)
    with pytest.raises(
        Seg3dError,
        match=r"^c1: DICOM series .*: slice_000.dcm declares 30000 x 30000 x 1 frames of "
        r"16-bit pixels \(1.8e\+09 bytes\), but the file is [0-9,]+ bytes",
    ):
        read_volume(series, case="c1")


def test_the_real_series_is_within_the_limits_and_a_lower_limit_refuses_it(real_ct, monkeypatch):
    assert read_volume(real_ct / "dicom_series").array.size == 512 * 512 * 20 <= limits.MAX_VOXELS
    monkeypatch.setattr(limits, "MAX_VOXELS", 512 * 512 * 20 - 1)
    with pytest.raises(Seg3dError, match=r"declares 5,242,880 voxels, over the limit of 5,242,879"):
        read_volume(real_ct / "dicom_series", case="c1")


def test_a_slice_replaced_while_the_series_is_read_is_refused(tmp_path, monkeypatch):
    """The identity of every file is taken before ITK reads them and compared after: a series that changed in
    between is refused rather than read half old, half new."""
    import SimpleITK as sitk

    series = write_series(tmp_path / "s", _ct())
    execute = sitk.ImageSeriesReader.Execute

    def replace_a_slice(reader):
        image = execute(reader)
        copy = series / "copy.tmp"
        shutil.copy(series / "slice_002.dcm", copy)
        copy.replace(series / "slice_002.dcm")  # same bytes, another inode
        return image

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", replace_a_slice)
    with pytest.raises(Seg3dError, match=r"^c1: image .* changed while it was being read"):
        read_volume(series, case="c1")
