"""Reading CT volumes (NIfTI files and DICOM series folders) into one convention: the array in stored voxel
order (X, Y, Z) and a 4x4 voxel -> world affine in RAS+ millimetres, as nibabel and MONAI's NibabelReader
give it. Everything a user can get wrong in a file becomes a Seg3dError naming the case; things worth
reporting that are not errors become notes.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from pipeline.errors import Seg3dError

# World coordinates: DICOM/ITK use LPS+, NIfTI/nibabel RAS+; the two differ by negating x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE_TOL = 1e-3  # mm and direction-cosine tolerance: above float32 header rounding, far below a voxel

# Everything nibabel, gzip and zlib raise for a file that is truncated, corrupt or not NIfTI at all.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError)


class Note(str):
    """A remark about a file that is not an error. A plain str, so that `Volume.notes` prints and compares as
    text; `level` ("info" or "warning") tells the integrity check how loudly to report it."""

    level: str

    def __new__(cls, text: str, level: str = "info") -> Note:
        note = super().__new__(cls, text)
        note.level = level
        return note


@dataclass
class Volume:
    array: np.ndarray  # (X, Y, Z) in stored voxel order; float32 for images, the file's dtype for labels
    affine: np.ndarray  # (4, 4) voxel -> world, RAS+ mm, float64
    notes: list[str] = field(default_factory=list)

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def read_volume(path: Path | str, case: str | None = None, kind: str = "image") -> Volume:
    """Read a NIfTI file or a DICOM series folder. `kind` is "image" (float32 HU) or "label" (file dtype kept,
    so that a non-integer label value is still visible to the integrity check)."""
    path = Path(path)
    if not path.exists():
        raise Seg3dError(f"{kind} not found: {path}; check the path in the datalist", case=case)
    if path.is_dir():
        array, affine, notes = _read_dicom_series(path, case, kind)
    else:
        array, affine, notes = _read_nifti(path, case, kind)
    stored_shape = array.shape
    array, squeezed = _as_3d(array, path, case, kind)
    if squeezed:
        notes.append(Note(f"{kind} {path.name}: shape {stored_shape} squeezed to {array.shape} (a 4th axis of 1)"))
    notes.extend(_check_affine(affine, path, case, kind))
    return Volume(array=array, affine=affine, notes=notes)


def to_ras(volume: Volume) -> Volume:
    """The same voxels reordered (flips and axis swaps, no resampling) so that the axes run closest to R, A, S:
    what nib.as_closest_canonical and MONAI's Orientation("RAS") do, so two files stored in different
    orientations can be compared voxel for voxel."""
    ornt = nib.orientations.io_orientation(volume.affine)
    array = nib.orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.array.shape)
    return Volume(array=np.ascontiguousarray(array), affine=affine, notes=list(volume.notes))


def _read_nifti(path: Path, case: str | None, kind: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    notes: list[str] = []
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ImageFileError(f"{type(img).__name__} is not NIfTI")
        # nibabel reads lazily: the data must be read here, inside the try, for a truncated file to fail here.
        array = img.get_fdata(dtype=np.float32) if kind == "image" else np.asanyarray(img.dataobj)
    except _READ_ERRORS as err:
        raise Seg3dError(
            f"cannot read {kind} {path} (truncated or not NIfTI?): {type(err).__name__}: {err}; "
            "re-export or re-download it (a DICOM series is given as its folder)",
            case=case,
        ) from err
    header = img.header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qcode and scode and not np.allclose(qform, sform, atol=AFFINE_TOL):
        diff = float(np.abs(qform - sform).max())
        q_axes, s_axes = "".join(nib.aff2axcodes(qform)), "".join(nib.aff2axcodes(sform))
        notes.append(
            Note(
                f"{kind} {path.name}: qform ({q_axes}) and sform ({s_axes}) disagree, by up to {diff:.3g} "
                "(mm or direction cosine); the sform was used, as nibabel and MONAI do, while ITK-based tools "
                "use the qform: make sure the sform is the intended one",
                "warning",
            )
        )
    elif not qcode and not scode:
        notes.append(
            Note(f"{kind} {path.name}: neither qform nor sform is set; voxel sizes only, no position", "warning")
        )
    return array, np.asarray(img.affine, dtype=np.float64), notes


def _read_dicom_series(path: Path, case: str | None, kind: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import SimpleITK as sitk

    notes: list[str] = []
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(path))
    except RuntimeError as err:
        raise Seg3dError(f"cannot list DICOM series in {path}: {err}", case=case) from err
    if len(series) == 0:
        raise Seg3dError(
            f"no DICOM series in {path}; a {kind} must be a NIfTI file or a folder of one DICOM series", case=case
        )
    if len(series) > 1:
        raise Seg3dError(
            f"{len(series)} DICOM series in {path}; point at a folder holding exactly one series "
            "(e.g. sort the files into one folder per SeriesInstanceUID)",
            case=case,
        )
    files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        # GDCM applies RescaleSlope/RescaleIntercept per file: the values come back in HU.
        image = reader.Execute()
    except RuntimeError as err:
        raise Seg3dError(f"cannot read DICOM series {path}: {str(err).strip()}", case=case) from err
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
        return array, np.eye(4), notes  # _as_3d rejects it with the shape in the message
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    notes.extend(_slice_gaps(reader, len(files), direction[:, 2], path, kind))
    return array, LPS_TO_RAS @ affine_lps, notes


def _slice_gaps(reader, n: int, normal: np.ndarray, path: Path, kind: str) -> list[str]:
    """ITK takes the slice spacing from the first two slices; a missing slice elsewhere would stretch the
    anatomy silently, so compare every gap."""
    positions = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return []
        try:
            positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
        except ValueError:
            return []
    if n < 3:
        return []
    gaps = np.diff(np.asarray(positions) @ normal)
    if np.ptp(gaps) > max(AFFINE_TOL, 0.01 * abs(float(np.median(gaps)))):
        return [
            Note(
                f"{kind} {path.name}: slice gaps vary from {gaps.min():.3g} to {gaps.max():.3g} mm (missing slices?); "
                f"the series is read with a uniform {abs(float(gaps[0])):.3g} mm",
                "warning",
            )
        ]
    return []


def _as_3d(array: np.ndarray, path: Path, case: str | None, kind: str) -> tuple[np.ndarray, bool]:
    if array.ndim == 3:
        return array, False
    if array.ndim > 3 and all(n == 1 for n in array.shape[3:]):
        return array.reshape(array.shape[:3]), True
    what = "2D" if array.ndim < 3 else f"{array.ndim}D"
    raise Seg3dError(
        f"{kind} {path} is {what}, shape {tuple(array.shape)}; a CT {kind} must be one 3D volume "
        "(split time series or multi-channel files into one 3D file per volume)",
        case=case,
    )


def _check_affine(affine: np.ndarray, path: Path, case: str | None, kind: str) -> list[str]:
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(affine)) or np.any(spacing < 1e-6) or abs(np.linalg.det(linear)) < 1e-9:
        raise Seg3dError(
            f"{kind} {path} has a non-invertible affine (voxel sizes {np.round(spacing, 4).tolist()}); "
            "fix the header's pixdim/sform",
            case=case,
        )
    cosines = linear / spacing  # columns: unit direction of each voxel axis in world space
    if not np.allclose(cosines.T @ cosines, np.eye(3), atol=AFFINE_TOL):
        raise Seg3dError(
            f"{kind} {path} has a sheared affine (voxel axes not perpendicular); resample it onto an orthogonal "
            "grid first (e.g. a DICOM series with variable gantry tilt)",
            case=case,
        )
    if np.any(np.abs(cosines).max(axis=0) < 1 - AFFINE_TOL):
        tilt = float(np.degrees(np.arccos(np.clip(np.abs(cosines).max(axis=0).min(), -1.0, 1.0))))
        return [
            Note(
                f"{kind} {path.name}: oblique directions (gantry tilt?), up to {tilt:.1f} degrees off the nearest "
                f"axis ({''.join(nib.aff2axcodes(affine))}); used as stored",
                "info",
            )
        ]
    return []
