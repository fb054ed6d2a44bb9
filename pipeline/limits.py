"""Memory follows the file, not the header: what a header declares is checked against what the file can hold, and
against stated limits, before anything of that size is allocated.

A NIfTI header or a DICOM file states its own size (dim, Rows x Columns), and the readers allocate what it states
before they find out that the data are not there: a 66-byte gzip declaring 32767 x 32767 x 2 voxels made nibabel
allocate 4 GB before it failed. A voxel size that is wrong by 1000 (metres as millimetres, a broken pixdim) makes the
resampling to the model's spacing ask for terabytes. Each check here answers in one line with both numbers and the
fix, and runs where the size is first known: imageio (NIfTI), dicomio (DICOM series), transforms (resampling).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.errors import Seg3dError

# The largest volume any reader accepts. A 512 x 512 x 2000 CT (a whole body at 0.5 mm) is 5.2e8 voxels and a
# 1024 x 1024 x 1000 photon-counting CT 1.05e9: 2**31 leaves room for both, and refuses what no scanner writes
# (2**31 float32 voxels are 8 GiB before any copy).
MAX_VOXELS = 2**31
# The largest volume the resampling to the model's spacing may produce: a fine model spacing may enlarge a scan a
# few times, but a result larger than any scan we read comes from a wrong voxel size (metres read as millimetres,
# a broken pixdim), not from anatomy.
MAX_RESAMPLED_VOXELS = 2**31
# Deflate cannot expand a byte of its stream into more than 1032 bytes (RFC 1951: a 258-byte match costs at least
# 2 bits), so a gzip file holds at most 1032 times its size; a header declaring more is a lie (a "gzip bomb").
GZIP_MAX_RATIO = 1032
# The DICOM transfer syntaxes whose pixel data are stored as they are (implicit / explicit little, explicit big
# endian): there, each file must hold at least Rows x Columns x frames x samples x bytes.
UNCOMPRESSED_DICOM = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _n(value: int) -> str:
    """A count for a message: exact with separators below a billion, else in scientific notation."""
    return f"{value:,}" if value < 10**9 else f"{value:.3g}"


def _limit(value: int) -> str:
    """A limit for a message, with its power of two when it is one."""
    return _n(value) + (f" (2**{value.bit_length() - 1})" if value & (value - 1) == 0 else "")


def check_voxel_limit(voxels: int, *, what: str, case: str | None) -> None:
    """`what` names the thing and its shape, e.g. "image x.nii.gz, shape (512, 512, 90000)"."""
    if voxels > MAX_VOXELS:
        raise Seg3dError(
            f"{what} declares {_n(voxels)} voxels, over the limit of {_limit(MAX_VOXELS)} that seg3d reads: "
            "no CT is that large, the header is wrong; re-export the scan",
            case=case,
        )


def check_nifti_size(path: Path, *, shape: tuple[int, ...], itemsize: int, offset: int, file_size: int, case, kind):
    """Before nibabel reads the voxels: the declared size within MAX_VOXELS and within what the file can hold (an
    uncompressed file at least `offset` + voxels x `itemsize` bytes; a .gz at most GZIP_MAX_RATIO times its size;
    a .bz2 or .zst is counted by decompressing it, without keeping the bytes)."""
    voxels = math.prod(max(int(n), 0) for n in shape)
    what = f"{kind} {path}, shape {tuple(int(n) for n in shape)},"
    check_voxel_limit(voxels, what=what, case=case)
    need = int(offset) + voxels * int(itemsize)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        can_hold = file_size * GZIP_MAX_RATIO
        holds = f"a {file_size:,}-byte gzip file holds at most {_n(can_hold)} bytes (deflate: {GZIP_MAX_RATIO}:1)"
    elif suffix in (".bz2", ".zst"):
        can_hold = _decompressed_size(path, need)
        holds = f"the {suffix} file decompresses to {_n(can_hold)} bytes"
    else:
        can_hold, holds = file_size, f"the file is {_n(file_size)} bytes"
    if need > can_hold:
        raise Seg3dError(
            f"{kind} {path} declares {_n(voxels)} voxels, {_n(need)} bytes with its header, but {holds}: the "
            "header's dim is wrong or the file is cut short; re-export or re-download it",
            case=case,
        )


def _decompressed_size(path: Path, enough: int) -> int:
    """The decompressed length of a .bz2 or .zst file, counted in 1 MiB blocks that are dropped, up to `enough`."""
    from nibabel.openers import ImageOpener

    total = 0
    try:
        with ImageOpener(str(path)) as f:
            while total < enough:
                block = f.read(min(1 << 20, enough - total))
                if not block:
                    break
                total += len(block)
    except (OSError, EOFError, ValueError, ImportError, RuntimeError):
        pass  # a corrupt or unsupported stream holds what was decompressed before the error
    return total


def check_dicom_size(path: Path, *, files: list[str], case: str | None) -> None:
    """Before ITK reads a series (it allocates the whole volume first): Rows x Columns x frames x slices within
    MAX_VOXELS, from the first file's header; for uncompressed pixel data, every file at least one slice's bytes."""
    import pydicom

    try:
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        rows, cols = int(first.Rows), int(first.Columns)
        frames, samples = int(first.get("NumberOfFrames", 1) or 1), int(first.get("SamplesPerPixel", 1) or 1)
        bits = int(first.get("BitsAllocated", 16) or 16)
        syntax = str(getattr(first.file_meta, "TransferSyntaxUID", "") or "")
    except (AttributeError, TypeError, ValueError, OSError, pydicom.errors.InvalidDicomError):
        return  # not a readable image header: ITK's reader says what is wrong with it
    voxels = rows * cols * frames * samples * len(files)
    check_voxel_limit(
        voxels,
        what=f"DICOM series {path} ({len(files)} files of {rows} x {cols} x {frames} frames x {samples} samples)",
        case=case,
    )
    if syntax not in UNCOMPRESSED_DICOM:
        return
    need = rows * cols * frames * samples * max(bits, 1) // 8
    for name in files:
        size = Path(name).stat().st_size
        if size < need:
            raise Seg3dError(
                f"DICOM series {path}: {Path(name).name} declares {rows} x {cols} x {frames} frames of {bits}-bit "
                f"pixels ({_n(need)} bytes), but the file is {_n(size)} bytes: its Rows/Columns are wrong or it is "
                "cut short; export the series again",
                case=case,
            )


def check_resampled_size(*, shape, target_spacing, affine, case: str | None, kind: str = "image") -> None:
    """Before the resampling to the model's spacing allocates its output (`shape`, the grid MONAI's Spacingd computes
    lazily): at most MAX_RESAMPLED_VOXELS. `affine` is the image's before the resampling, for its voxel size."""
    voxels = math.prod(int(n) for n in shape)
    if voxels <= MAX_RESAMPLED_VOXELS:
        return
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    given = " x ".join(f"{s:.4g}" for s in spacing)
    target = " x ".join(f"{s:.4g}" for s in target_spacing)
    raise Seg3dError(
        f"{kind} resampled to the model's spacing {target} mm would be {' x '.join(_n(int(n)) for n in shape)} = "
        f"{_n(voxels)} voxels, over the limit of {_limit(MAX_RESAMPLED_VOXELS)}: its voxels measure {given} mm, where "
        "a CT's measure 0.3 to 5 mm: fix the header's voxel size (pixdim) or its units (xyzt_units)",
        case=case,
    )
