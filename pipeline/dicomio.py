"""Reading a DICOM series folder (SimpleITK/GDCM) into imageio's convention: the array in (X, Y, Z) voxel order and a
RAS+ affine in mm. SimpleITK is imported here, and only when a series is read, so commands on NIfTI files never load
it. What GDCM's series reader would get silently wrong (a missing slice, a gantry tilt) is an error naming the
series, and a series whose headers declare more voxels than seg3d reads is refused before ITK allocates them.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.errors import Seg3dError, one_line
from pipeline.imageio import AFFINE_TOL, LPS_TO_RAS, SourceFile, check_read_whole, file_identity
from pipeline.limits import check_dicom_size


@contextmanager
def quiet_itk():
    """ITK writes its warnings (an empty folder, uneven slices) straight to the process's stderr, several lines
    each, next to the one line the CLI prints; what they say is checked and reported here instead."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def read_dicom_series(path: Path, case: str | None, kind: str) -> tuple[np.ndarray, np.ndarray, list[str], SourceFile]:
    """The voxels of the one series in `path` (HU for an image), its RAS affine, notes (none yet) and the files
    read, with their identity."""
    with quiet_itk():
        return _read_dicom_series_quietly(path, case, kind)


def _read_dicom_series_quietly(path: Path, case: str | None, kind: str):
    import SimpleITK as sitk

    notes: list[str] = []
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(path))
    except RuntimeError as err:
        raise Seg3dError(f"cannot list DICOM series in {path}: {one_line(err, limit=1000)}", case=case) from None
    if len(series) == 0:
        article = "an" if kind[0] in "aeiou" else "a"
        raise Seg3dError(
            f"no DICOM series in {path}; {article} {kind} must be a NIfTI file or a folder of one DICOM series",
            case=case,
        )
    if len(series) > 1:
        from pipeline.dicom_input import list_series, listed

        raise Seg3dError(
            f"{len(series)} DICOM series in {path}; point at a folder holding exactly one series "
            f"(e.g. sort the files into one folder per SeriesInstanceUID, or pick one with `seg3d infer --series UID`):"
            f" {listed(list_series(path))}",
            case=case,
        )
    files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    check_dicom_size(path, files=list(files), case=case)  # ITK allocates the whole volume before it reads a slice
    source = SourceFile(path=path, files=tuple(str(f) for f in files), identity=file_identity(files))
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    # ITK prints its own multi-line warning for uneven slice gaps; _slice_gaps below makes that an error instead.
    reader.SetSpacingWarningRelThreshold(1e9)
    try:
        # GDCM applies RescaleSlope/RescaleIntercept per file: the values come back in HU.
        image = reader.Execute()
    except RuntimeError as err:
        raise Seg3dError(f"cannot read DICOM series {path}: {one_line(err, limit=1000)}", case=case) from None
    check_read_whole(source, case, kind)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise Seg3dError(
            f"DICOM series {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a CT series is grey-scale",
            case=case,
        )
    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(image).transpose(tuple(range(dim))[::-1])  # (z, y, x) -> (x, y, z)
    if kind == "image":
        array = array.astype(np.float32, copy=False)
    if dim != 3:
        return array, np.eye(4), notes, source  # _as_3d rejects it with the shape in the message
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    _check_slice_positions(reader, len(files), direction[:, 2], path, case, kind)
    return array, LPS_TO_RAS @ affine_lps, notes, source


def _check_slice_positions(reader, n: int, normal: np.ndarray, path: Path, case: str | None, kind: str) -> None:
    """ITK takes the slice spacing from the first two slices and stacks the slices along their normal. A missing
    slice further on would stretch the anatomy silently, and a gantry-tilted series (slices shifted along the
    table, not along their normal) would be read sheared as if it were straight: both are errors."""
    positions = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return
        try:
            positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
        except ValueError:
            return
    if n < 2:
        return
    steps = np.diff(np.asarray(positions), axis=0)  # (n - 1, 3): from each slice's origin to the next's, LPS mm
    gaps = steps @ normal
    tolerance = max(AFFINE_TOL, 0.01 * abs(float(np.median(gaps))))
    sideways = float(np.linalg.norm(steps - gaps[:, None] * normal, axis=1).max())
    if sideways > tolerance:
        tilt = float(np.degrees(np.arctan2(sideways, abs(float(np.median(gaps))))))
        raise Seg3dError(
            f"DICOM series {path} is sheared: each slice is shifted {sideways:.3g} mm sideways of its normal "
            f"(gantry tilt of about {tilt:.1f} degrees); resample it onto a straight grid first (e.g. dcm2niix "
            "corrects gantry tilt) and give the NIfTI",
            case=case,
        )
    if n >= 3 and np.ptp(gaps) > tolerance:
        raise Seg3dError(
            f"DICOM series {path} has uneven slice gaps, {gaps.min():.3g} to {gaps.max():.3g} mm (a missing "
            f"slice?); the volume would be stretched: complete the series ({n} slices now) or export it again",
            case=case,
        )
