"""Reading CT volumes (NIfTI files and DICOM series folders) into one convention: the array in stored voxel
order (X, Y, Z) and a 4x4 voxel -> world affine in RAS+ millimetres, as nibabel and MONAI's NibabelReader
give it (with the spatial units a NIfTI header declares converted to mm, as ITK does). Everything a user can get
wrong in a file becomes a Seg3dError naming the case; things worth reporting that are not errors become notes.

A volume is read once, and remembers what it was read from (`SourceFile`: the file's identity and the NIfTI header
as read), so that outputs are written from what was read, and anything that must look at the input again can
first tell whether it is still the same file.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from pipeline.errors import Seg3dError, one_line
from pipeline.limits import check_nifti_size

# World coordinates: DICOM/ITK use LPS+, NIfTI/nibabel RAS+; the two differ by negating x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE_TOL = 1e-3  # mm and direction-cosine tolerance: above float32 header rounding, far below a voxel

# NIfTI xyzt_units (its low 3 bits) -> millimetres per unit, as ITK converts them; 0 (unknown), 2 (mm) and the
# codes NIfTI does not define are taken as mm, as nibabel and MONAI do.
MM_PER_UNIT = {1: 1000.0, 3: 0.001}
UNIT_NAMES = {1: "metres", 3: "micrometres"}

# Everything nibabel, gzip and zlib raise for a file that is truncated, corrupt or not NIfTI at all; MemoryError for
# a real volume too large for this machine (a header that declares more than its file holds is refused before
# anything is allocated: pipeline.limits).
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


def file_identity(files) -> tuple:
    """(device, inode, size, mtime_ns) of each file: a replaced file has another inode, a rewritten one another
    mtime_ns or size. None for a file that is gone."""
    out = []
    for name in files:
        try:
            st = os.stat(name)
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True)
class SourceFile:
    """What a volume was read from, as it was when read: the file (or a DICOM series' files), their identity, the
    same before and after the read, and the NIfTI header as read (its units, qform and sform with their codes), from
    which the outputs are written. `header` is None for a DICOM series: its geometry is the volume's affine."""

    path: Path
    files: tuple[str, ...]
    identity: tuple
    header: object | None = field(default=None, repr=False)

    def check_unchanged(self, case: str | None, kind: str = "image") -> None:
        """A Seg3dError if the input is no longer the file that was read (replaced, rewritten or gone)."""
        if file_identity(self.files) != self.identity:
            raise self.changed(case, kind)

    def changed(self, case: str | None, kind: str = "image") -> Seg3dError:
        return Seg3dError(
            f"{kind} {self.path} was replaced or rewritten after it was read, while this case ran; nothing was "
            "written for it: run the case again once the file is final",
            case=case,
        )


@dataclass
class Volume:
    array: np.ndarray  # (X, Y, Z) in stored voxel order; float32 for images, the file's dtype for labels
    affine: np.ndarray  # (4, 4) voxel -> world, RAS+ mm, float64
    notes: list[str] = field(default_factory=list)
    source: SourceFile | None = None  # what it was read from; None for a volume made in memory

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

        array, affine, notes, source = read_dicom_series(path, case, kind)
    else:
        array, affine, notes, source = _read_nifti(path, case, kind)
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
    return Volume(array=array, affine=affine, notes=notes, source=source)


def read_again(source: SourceFile, case: str | None, kind: str = "image") -> Volume:
    """The input of a volume read a second time (an overlay's background image), refused unless it is still the
    very file that was first read: same identity before this read and during it."""
    source.check_unchanged(case, kind)
    volume = read_volume(source.path, case=case, kind=kind)
    if volume.source is None or (volume.source.files, volume.source.identity) != (source.files, source.identity):
        raise source.changed(case, kind)
    return volume


def check_read_whole(source: SourceFile, case: str | None, kind: str) -> None:
    """After a read: the file (or every file of a series) kept its identity throughout, so the voxels and the
    header read belong to one and the same file."""
    if file_identity(source.files) != source.identity:
        raise Seg3dError(
            f"{kind} {source.path} changed while it was being read (replaced or rewritten); run the case again once "
            "the file is final",
            case=case,
        )


def to_ras(volume: Volume) -> Volume:
    """The same voxels reordered (flips and axis swaps, no resampling) so that the axes run closest to R, A, S:
    what nib.as_closest_canonical and MONAI's Orientation("RAS") do, so two files stored in different
    orientations can be compared voxel for voxel."""
    ornt = nib.orientations.io_orientation(volume.affine)
    array = nib.orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.array.shape)
    return Volume(array=np.ascontiguousarray(array), affine=affine, notes=list(volume.notes))


def _read_nifti(path: Path, case: str | None, kind: str) -> tuple[np.ndarray, np.ndarray, list[str], SourceFile]:
    identity = file_identity([path])
    if identity[0] is None:
        raise Seg3dError(f"{kind} {path} cannot be read (gone, or no permission); check the path", case=case)
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ImageFileError(f"{type(img).__name__} is not NIfTI")
        # What nibabel will read (the loaded header's vox_offset is reset to 0; the array proxy keeps the file's).
        shape, offset = img.dataobj.shape, int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
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
    # nibabel allocates what the header declares before it finds the data missing: check the file holds it first.
    check_nifti_size(
        path, shape=shape, itemsize=dtype.itemsize, offset=offset, file_size=identity[0][2], case=case, kind=kind
    )
    try:
        # nibabel reads lazily: the data must be read here, inside the try, for a truncated file to fail here.
        array = img.get_fdata(dtype=np.float32) if kind == "image" else np.asanyarray(img.dataobj)
    except _READ_ERRORS as err:
        raise _unreadable(path, case, kind, err) from None
    source = SourceFile(path=path, files=(str(path),), identity=identity, header=img.header.copy())
    check_read_whole(source, case, kind)
    return array, affine, notes, source


def _unreadable(path: Path, case: str | None, kind: str, err: BaseException) -> Seg3dError:
    return Seg3dError(
        f"cannot read {kind} {path} (truncated or not NIfTI?): {type(err).__name__}: {one_line(err, limit=1000)}; "
        "re-export or re-download it (a DICOM series is given as its folder)",
        case=case,
    )


def _nifti_geometry(img, path: Path, case: str | None, kind: str) -> tuple[np.ndarray, list[str]]:
    """The affine nibabel and MONAI use (sform if coded, else qform, else pixdim alone), in mm whatever spatial unit
    the header declares, and the notes on it."""
    notes: list[str] = []
    header = img.header
    unit = int(header["xyzt_units"]) & 0x07
    to_mm = np.diag([MM_PER_UNIT.get(unit, 1.0)] * 3 + [1.0])
    try:
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
        with np.errstate(invalid="ignore", over="ignore"):  # a NaN or huge entry is _check_affine's to report
            affine = to_mm @ np.asarray(header.get_best_affine(), dtype=np.float64)
            qform = None if qform is None else to_mm @ qform
            sform = None if sform is None else to_mm @ sform
    except _GEOMETRY_ERRORS as err:
        raise Seg3dError(
            f"{kind} {path} has an invalid qform/sform ({one_line(err, limit=1000)}); fix the header's geometry "
            "(e.g. re-convert the DICOM with dcm2niix)",
            case=case,
        ) from None
    if unit in MM_PER_UNIT:
        notes.append(
            Note(
                f"{kind} {path.name}: the header's spatial unit is {UNIT_NAMES[unit]} (xyzt_units); its geometry was "
                f"converted to mm (x {MM_PER_UNIT[unit]:g}), and outputs keep the header's unit"
            )
        )
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
