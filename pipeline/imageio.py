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

from pipeline.errors import Seg3dError, one_line

# World coordinates: DICOM/ITK use LPS+, NIfTI/nibabel RAS+; the two differ by negating x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE_TOL = 1e-3  # mm and direction-cosine tolerance: above float32 header rounding, far below a voxel

# Everything nibabel, gzip and zlib raise for a file that is truncated, corrupt or not NIfTI at all; MemoryError for
# a corrupt header that declares far more voxels than the file holds.
_READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    OSError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    ValueError,
    MemoryError,
)
# What nibabel and numpy raise for a header whose qform/sform cannot be turned into a matrix (NaN, w^2 < 0).
_GEOMETRY_ERRORS = (HeaderDataError, ValueError, np.linalg.LinAlgError)


def _axcodes(affine: np.ndarray) -> str:
    """Axis codes for a message; '?' where an axis has none (a zero or NaN column)."""
    try:
        return "".join(c or "?" for c in nib.aff2axcodes(affine))
    except (np.linalg.LinAlgError, ValueError):
        return "???"


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

    def describe(self) -> str:
        """The voxel grid in words, for a message that compares two grids."""
        spacing = " x ".join(f"{s:.4g}" for s in self.spacing)
        origin = ", ".join(f"{o:.2f}" for o in self.affine[:3, 3])
        return f"shape {tuple(self.array.shape)}, spacing {spacing} mm, origin ({origin}) mm RAS, axes {self.axcodes}"


def c_ordered(array: np.ndarray, slab: int = 4):
    """A C-contiguous torch tensor of a 3D array. NIfTI data come Fortran-ordered, and reversing all three axes in one
    copy strides through memory by whole slices for every voxel; copying a few slices of the last axis at a time
    keeps the writes in cache."""
    import torch  # here: the rest of this module (check-data) does without it

    src = torch.from_numpy(array)
    if src.is_contiguous() or src.ndim != 3:
        return src.contiguous()
    out = torch.empty(src.shape, dtype=src.dtype)
    for start in range(0, src.shape[2], slab):
        out[:, :, start : start + slab] = src[:, :, start : start + slab]
    return out


def fortran_ordered(array: np.ndarray) -> np.ndarray:
    """The same 3D array in Fortran order, NIfTI's on-disk order, so that nibabel writes it without reordering
    every voxel on the fly."""
    if array.flags.f_contiguous or array.ndim != 3:
        return array
    return c_ordered(array.T).numpy().T


def read_volume(path: Path | str, case: str | None = None, kind: str = "image") -> Volume:
    """Read a NIfTI file or a DICOM series folder. `kind` is "image" (float32 HU) or "label" (file dtype kept,
    so that a non-integer label value is still visible to the integrity check)."""
    path = Path(path)
    if not path.exists():
        raise Seg3dError(f"{kind} not found: {path}; check the path in the datalist", case=case)
    if path.is_dir():
        from pipeline.dicomio import read_dicom_series

        array, affine, notes = read_dicom_series(path, case, kind)
    else:
        array, affine, notes = _read_nifti(path, case, kind)
    stored_shape = array.shape
    array, squeezed = _as_3d(array, path, case, kind)
    if squeezed:
        notes.append(Note(f"{kind} {path.name}: shape {stored_shape} squeezed to {array.shape} (a 4th axis of 1)"))
    if array.size == 0:
        raise Seg3dError(
            f"{kind} {path} has no voxels, shape {tuple(array.shape)}; the header's dim is wrong or the export "
            "failed: re-export it",
            case=case,
        )
    notes.extend(_check_affine(affine, path, case, kind))
    if kind == "image":
        _check_not_constant(array, path, case)
    return Volume(array=array, affine=affine, notes=notes)


def geometry_notes(path: Path | str, case: str | None = None, kind: str = "image") -> list[str]:
    """The geometry remarks read_volume would make (qform/sform disagreement, oblique directions), from the
    header alone (one DICOM file's orientation for a series): what inference reports before it reads the voxels.
    Empty where the header cannot be read; read_volume then says what is wrong."""
    path = Path(path)
    try:
        if path.is_dir():
            from pipeline.dicomio import dicom_orientation

            affine, notes = dicom_orientation(path), []
        else:
            img = nib.load(path)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                return []
            affine, notes = _nifti_geometry(img, path, case, kind)
        return notes + _check_affine(affine, path, case, kind)
    except (Seg3dError, *_READ_ERRORS, RuntimeError, np.linalg.LinAlgError):
        return []


def to_ras(volume: Volume) -> Volume:
    """The same voxels reordered (flips and axis swaps, no resampling) so that the axes run closest to R, A, S:
    what nib.as_closest_canonical and MONAI's Orientation("RAS") do, so two files stored in different
    orientations can be compared voxel for voxel."""
    ornt = nib.orientations.io_orientation(volume.affine)
    array = nib.orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.array.shape)
    return Volume(array=np.ascontiguousarray(array), affine=affine, notes=list(volume.notes))


def _read_nifti(path: Path, case: str | None, kind: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ImageFileError(f"{type(img).__name__} is not NIfTI")
    except _READ_ERRORS as err:
        raise _unreadable(path, case, kind, err) from None
    affine, notes = _nifti_geometry(img, path, case, kind)
    dtype = img.header.get_data_dtype()
    if dtype.names is not None or dtype.kind not in "biuf":
        what = "RGB" if dtype.names is not None else {"c": "complex"}.get(dtype.kind, str(dtype))
        raise Seg3dError(
            f"{kind} {path} stores {what} voxels; a CT {kind} holds one real number per voxel: export the "
            "grey-scale volume",
            case=case,
        )
    try:
        # nibabel reads lazily: the data must be read here, inside the try, for a truncated file to fail here.
        array = img.get_fdata(dtype=np.float32) if kind == "image" else np.asanyarray(img.dataobj)
    except _READ_ERRORS as err:
        raise _unreadable(path, case, kind, err) from None
    return array, affine, notes


def _unreadable(path: Path, case: str | None, kind: str, err: BaseException) -> Seg3dError:
    return Seg3dError(
        f"cannot read {kind} {path} (truncated or not NIfTI?): {type(err).__name__}: {one_line(err, limit=1000)}; "
        "re-export or re-download it (a DICOM series is given as its folder)",
        case=case,
    )


def _nifti_geometry(img, path: Path, case: str | None, kind: str) -> tuple[np.ndarray, list[str]]:
    """The affine nibabel and MONAI use (sform if coded, else qform, else pixdim alone) and the notes on it."""
    notes: list[str] = []
    header = img.header
    try:
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except _GEOMETRY_ERRORS as err:
        raise Seg3dError(
            f"{kind} {path} has an invalid qform/sform ({one_line(err, limit=1000)}); fix the header's geometry "
            "(e.g. re-convert the DICOM with dcm2niix)",
            case=case,
        ) from None
    if qcode and scode and not np.allclose(qform, sform, atol=AFFINE_TOL):
        q_axes, s_axes = _axcodes(qform), _axcodes(sform)
        if np.isfinite(qform).all() and np.isfinite(sform).all():
            by = f"by up to {float(np.abs(qform - sform).max()):.3g} (mm or direction cosine)"
        else:
            by = "one of them is not finite"
        notes.append(
            Note(
                f"{kind} {path.name}: qform ({q_axes}) and sform ({s_axes}) disagree, {by}; the sform was used, "
                "as nibabel and MONAI do, while ITK-based tools use the qform: make sure the sform is the "
                "intended one",
                "warning",
            )
        )
    elif not qcode and not scode:
        notes.append(
            Note(f"{kind} {path.name}: neither qform nor sform is set; voxel sizes only, no position", "warning")
        )
    return affine, notes


def _as_3d(array: np.ndarray, path: Path, case: str | None, kind: str) -> tuple[np.ndarray, bool]:
    if array.ndim == 3:
        return array, False
    if array.ndim > 3 and all(n == 1 for n in array.shape[3:]):
        return array.reshape(array.shape[:3]), True
    what = f"{array.ndim}D"
    raise Seg3dError(
        f"{kind} {path} is {what}, shape {tuple(array.shape)}; a CT {kind} must be one 3D volume "
        "(split time series or multi-channel files into one 3D file per volume)",
        case=case,
    )


def _check_affine(affine: np.ndarray, path: Path, case: str | None, kind: str) -> list[str]:
    linear = affine[:3, :3]
    with np.errstate(invalid="ignore", over="ignore"):
        spacing = np.linalg.norm(linear, axis=0)
        singular = not np.all(np.isfinite(affine)) or np.any(spacing < 1e-6) or not np.all(np.isfinite(spacing))
        if not singular:
            singular = not abs(np.linalg.det(linear / spacing)) > 1e-6  # on unit columns: scale-free
    if singular:
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
                f"axis ({_axcodes(affine)}); used as stored: the output keeps these directions",
                "info",
            )
        ]
    return []


def _check_not_constant(array: np.ndarray, path: Path, case: str | None) -> None:
    """A CT holds air, tissue and bone: one value in every voxel is a blank export, not a scan. (NaN compares
    unequal, so an image with NaN is left to the NaN check, which counts them.)"""
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise Seg3dError(
            f"image {path} holds one value, {float(lo):g}, in every voxel; it is blank (a failed export or a "
            "placeholder), not a CT: export the scan again",
            case=case,
        )
