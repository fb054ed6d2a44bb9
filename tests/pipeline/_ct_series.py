"""CT series written with pydicom the way a scanner and a PACS lay them out: one file per slice, real UIDs, the
Patient, General Study, General Series, Frame of Reference, General Equipment, Image Plane, Image Pixel, CT Image
and SOP Common modules filled, ImagePositionPatient per slice. Options make the series hospitals also send: slices
in shuffled order, a gantry tilt, an uneven gap, two series in one folder, and zips of them."""

from __future__ import annotations

import random
import shutil
import zipfile
from pathlib import Path

import numpy as np

NAME, PATIENT_ID = "DOE^JANE^SECRET", "PID-987654321"


def phantom_hu(shape=(40, 36, 8), seed: int = 0) -> np.ndarray:
    """(x, y, z) HU: air, a soft-tissue body, and a brighter organ that the statistics can be checked on."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000, np.int16)
    hu[4:-4, 4:-4, :] = 40 + rng.integers(-20, 20, size=(shape[0] - 8, shape[1] - 8, shape[2]), dtype=np.int16)
    hu[14:24, 12:22, 2:6] = 120
    return hu


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing=(0.8, 0.8, 2.5),
    description: str = "CT Abdomen 2.5",
    shuffle: bool = False,
    tilt_mm_per_slice: float = 0.0,
    gap_after: int | None = None,
    study: str | None = None,
    prefix: str = "IM",
) -> dict[str, str]:
    """Write `hu` (x, y, z) as an uncompressed CT series; returns its UIDs (study, series, frame of reference).
    `shuffle`: file names and InstanceNumbers in random order; `tilt_mm_per_slice`: each slice shifted along y by
    that much (a gantry tilt); `gap_after`: one extra slice gap after that slice (a missing slice)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": study or generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    order = list(range(hu.shape[2]))
    if shuffle:
        random.Random(7).shuffle(order)
    for rank, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20240102", "101500", "20240102", "101700"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "A1", "", "1"
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = "CT", "phantom", description
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = NAME, PATIENT_ID, "19600101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.SeriesNumber, ds.InstanceNumber = 2, rank + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame"], ""
        ds.PatientPosition, ds.BodyPartExamined = "HFS", "ABDOMEN"  # unpaired: no Laterality
        extra = spacing[2] if gap_after is not None and z > gap_after else 0.0
        ds.ImagePositionPatient = [-16.0, -14.0 + z * tilt_mm_per_slice, float(z * spacing[2] + extra)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [float(spacing[1]), float(spacing[0])], float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.PixelData = np.ascontiguousarray(hu[:, :, z].T.astype("<i2")).tobytes()  # rows are y
        pydicom.dcmwrite(folder / f"{prefix}{rank:04d}.dcm", ds, enforce_file_format=True)
    return uids


def zip_folder(folder: Path, archive: Path, inside: str = "DICOM/") -> Path:
    """A zip of the files of `folder` under `inside` (as a PACS export puts them)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, inside + path.name)
    return archive


def copy_series(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        shutil.copy(path, target / path.name)
    return target


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' dciodvfy's error lines for one file (warnings are not errors); the test skips without it."""
    import shutil as sh
    import subprocess

    import pytest

    tool = sh.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not found: install dicom3tools (apt-get install dicom3tools)")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).splitlines()
    assert lines, "dciodvfy said nothing"
    return [line for line in lines if line.startswith("Error")]
