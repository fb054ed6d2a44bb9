"""Property test of the volume loader (`pipeline.imageio.read_volume`, what check-data, train and infer read every
image and label with): random NIfTI headers and data, written byte for byte to disk, either load as one 3D volume
with a finite, invertible affine, or are refused with a Seg3dError. Any other exception is a crash a user would see
as a traceback.

The files are assembled from a raw header (not through nibabel's writer, which refuses or repairs many of these
headers): random dim (ndim 1-5, zero and singleton sizes, a negative size now and then), datatype codes nibabel
reads (integers, floats, complex, RGB, binary, unknown codes), pixdim with 0, negative and NaN entries, qform
quaternions and sform rows with NaN, singular and sheared matrices, random qform/sform codes, scl_slope/scl_inter
with 0, NaN and Inf, data with NaN, data shorter than the header promises (a truncated file), and any xyzt_units
code (metres and micrometres must come out in mm).

Header bombs (`test_a_header_bomb_is_refused_before_anything_is_allocated`): NIfTI-1 and NIfTI-2 headers declaring
millions to 1e12 voxels over a few hundred bytes of data, gzip and plain, with odd vox_offsets: each is a one-line
Seg3dError (the declared size over what the file can hold, or over the 2**31-voxel limit), and the read allocates no
more than 64 MiB (tracemalloc's peak: nibabel's buffers and numpy's arrays are traced). Honest small files are checked
against the absolute voxel limit with that limit lowered to 4096 voxels (monkeypatched), so that both sides of the
limit run in milliseconds.
"""

from __future__ import annotations

import gzip
import tempfile
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipeline import limits  # noqa: E402
from pipeline.errors import Seg3dError  # noqa: E402
from pipeline.imageio import MM_PER_UNIT, Volume, read_volume  # noqa: E402

# NIfTI datatype code -> numpy dtype of the bytes written; 1 (binary) and 0/9999 have none nibabel can read.
DATATYPES = {
    2: np.uint8,
    4: np.int16,
    8: np.int32,
    16: np.float32,
    32: np.complex64,
    64: np.float64,
    128: np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]),
    256: np.int8,
    512: np.uint16,
    768: np.uint32,
    1024: np.int64,
    1280: np.uint64,
    1792: np.complex128,
    2304: np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")]),
    1: np.uint8,  # binary: declared, but stored here as bytes
    0: np.uint8,  # "none"
    9999: np.uint8,  # not a datatype at all
}
SPECIAL = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-12, 1e30]
finite = st.floats(-5.0, 5.0, allow_nan=False, width=32)
odd = st.one_of(finite, st.sampled_from(SPECIAL))


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rz @ ry @ rx


FIELDS = (
    "ndim",
    "size",
    "datatype",
    "qfac",
    "pixdim",
    "qform_code",
    "sform_code",
    "quatern",
    "sform",
    "slope",
    "inter",
    "offset",
    "units",
)


def _either(draw, defects: set[str], name: str, usual, wild):
    """A value a scanner would write, or an odd one for the (at most three) fields this example gets wrong: so both
    the accepting and the refusing path are exercised."""
    return draw(wild if name in defects else usual)


@st.composite
def sform_rows(draw, defects: set[str]) -> np.ndarray:
    usual, wild = st.sampled_from(["diagonal", "rotated"]), st.sampled_from(["singular", "sheared", "nan", "random"])
    kind = _either(draw, defects, "sform", usual, wild)
    spacing = np.array(draw(st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3)))
    linear = np.diag(spacing * np.array(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))))
    if kind == "rotated":
        linear = _rotation(draw(st.lists(st.floats(-np.pi, np.pi), min_size=3, max_size=3))) @ linear
    elif kind == "singular":
        linear[:, draw(st.integers(0, 2))] = 0.0
    elif kind == "sheared":
        linear[draw(st.integers(0, 2)), 2] += draw(st.floats(0.05, 2.0))
    elif kind == "nan":
        linear[draw(st.integers(0, 2)), draw(st.integers(0, 2))] = draw(st.sampled_from(SPECIAL[2:5]))
    elif kind == "random":
        linear = np.array(draw(st.lists(odd, min_size=9, max_size=9))).reshape(3, 3)
    offset = np.array(draw(_coordinates(defects)))
    return np.hstack([linear, offset[:, None]])


def _coordinates(defects: set[str]):
    mm = st.floats(-300, 300)
    return st.lists(st.one_of(mm, st.sampled_from(SPECIAL)) if "offset" in defects else mm, min_size=3, max_size=3)


@st.composite
def nifti_files(draw) -> tuple[bytes, tuple[int, ...], bool]:
    """(file bytes, declared shape, gzip?)"""
    defects = set(draw(st.lists(st.sampled_from(FIELDS), max_size=3)))
    ndim = _either(draw, defects, "ndim", st.sampled_from([3, 4]), st.integers(1, 5))
    usual_size = st.integers(1, 5) if ndim == 3 else st.just(1)  # a 4th axis of 1 is accepted (squeezed)
    wild_size = st.sampled_from([0, 1, 2, 3, -1])
    shape = tuple(
        _either(draw, defects, "size", usual_size, wild_size) if axis >= 3 or ndim == 3 else draw(st.integers(1, 5))
        for axis in range(ndim)
    )
    usual_codes = st.sampled_from([2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280])
    code = _either(draw, defects, "datatype", usual_codes, st.sampled_from(list(DATATYPES)))
    dtype = np.dtype(DATATYPES[code])

    header = nib.Nifti1Header()
    raw = header.structarr
    raw["dim"] = [ndim, *shape, *([1] * (7 - ndim))]
    raw["datatype"] = code
    raw["bitpix"] = dtype.itemsize * 8
    qfac = _either(draw, defects, "qfac", st.sampled_from([1.0, -1.0]), st.sampled_from([0.0, 2.0, float("nan")]))
    zooms = [_either(draw, defects, "pixdim", st.floats(0.3, 5.0), st.sampled_from(SPECIAL)) for _ in range(7)]
    raw["pixdim"] = [qfac, *zooms]
    raw["qform_code"] = _either(draw, defects, "qform_code", st.sampled_from([0, 1, 2]), st.integers(0, 5))
    raw["sform_code"] = _either(draw, defects, "sform_code", st.sampled_from([0, 1, 2]), st.integers(0, 5))
    rotation = _rotation(draw(st.lists(st.floats(-np.pi, np.pi), min_size=3, max_size=3)))
    quatern = nib.quaternions.mat2quat(rotation)
    proper = st.just(tuple(quatern[1:] * (1 if quatern[0] >= 0 else -1)))
    odd_quatern = st.lists(st.one_of(st.floats(-1.0, 1.0), st.sampled_from(SPECIAL)), min_size=3, max_size=3)
    raw["quatern_b"], raw["quatern_c"], raw["quatern_d"] = _either(draw, defects, "quatern", proper, odd_quatern)
    raw["qoffset_x"], raw["qoffset_y"], raw["qoffset_z"] = draw(_coordinates(defects))
    raw["srow_x"], raw["srow_y"], raw["srow_z"] = draw(sform_rows(defects))
    raw["scl_slope"] = _either(draw, defects, "slope", st.sampled_from([1.0, 0.5, 2.0]), st.sampled_from(SPECIAL))
    usual_inter = st.sampled_from([0.0, -1024.0, 3.5])
    raw["scl_inter"] = _either(draw, defects, "inter", usual_inter, st.sampled_from(SPECIAL))
    raw["vox_offset"] = 352
    raw["magic"] = b"n+1"
    # mm (2), mm + seconds (10), unknown (0); or any byte: metres (1), micrometres (3), codes NIfTI lacks (4-7)
    wild_units = st.one_of(st.sampled_from([1, 3, 9, 19, 4, 7]), st.integers(0, 255))
    raw["xyzt_units"] = _either(draw, defects, "units", st.sampled_from([0, 2, 10]), wild_units)

    count = int(np.prod([max(n, 0) for n in shape]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype.names:
        data = rng.integers(0, 256, (count, len(dtype.names)), dtype=np.uint8).view(dtype).ravel()
    else:
        data = (rng.normal(0, 500, count) * (1 + 1j if dtype.kind == "c" else 1)).astype(dtype)
        if dtype.kind in "fc" and count and draw(st.booleans()):
            data[rng.integers(0, count)] = np.nan
    payload = data.tobytes()
    if draw(st.integers(0, 9)) == 0:  # a truncated file
        payload = payload[: len(payload) // 2]
    blob = raw.tobytes() + b"\x00" * 4 + payload
    return blob, shape, draw(st.booleans())


def _reason(message: str) -> str:
    for words in (
        "bytes with its header, but",
        "over the limit",
        "cannot read",
        "is 1D",
        "is 2D",
        "is 4D",
        "is 5D",
        "no voxels",
        "non-invertible",
        "sheared",
        "invalid qform",
        "one value",
        "RGB",
        "complex",
    ):
        if words in message:
            return words
    return message[:60]


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same 150 files on every run and in CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(nifti_files(), st.sampled_from(["image", "label"]))
def test_any_nifti_loads_as_a_3d_volume_or_is_a_seg3d_error(nifti, kind):
    blob, shape, gz = nifti
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("x.nii.gz" if gz else "x.nii")
        path.write_bytes(gzip.compress(blob) if gz else blob)
        try:
            volume = read_volume(path, case="fuzz", kind=kind)
        except Seg3dError as err:
            assert str(err).startswith("fuzz: ") and "\n" not in str(err)
            event(f"refused: {_reason(str(err))}")
            return
        header = nib.load(path).header
        to_mm = MM_PER_UNIT.get(int(header["xyzt_units"]) & 7, 1.0)
        np.testing.assert_allclose(volume.affine, np.diag([to_mm] * 3 + [1]) @ header.get_best_affine(), rtol=1e-6)
    event("loaded" if to_mm == 1 else "loaded, converted to mm")
    assert isinstance(volume, Volume)
    assert len(shape) >= 3 and all(n == 1 for n in shape[3:]), f"{shape} loaded as {volume.array.shape}"
    assert volume.array.shape == shape[:3] and volume.array.ndim == 3
    assert volume.array.dtype.names is None and volume.array.dtype.kind in "biuf"
    if kind == "image":
        assert volume.array.dtype == np.float32
    affine = volume.affine
    assert affine.shape == (4, 4) and np.isfinite(affine).all()
    assert np.array_equal(affine[3], [0, 0, 0, 1]) and abs(np.linalg.det(affine[:3, :3])) > 0


# -- header bombs and the voxel limit --------------------------------------------------------------------------------

BOMB_PEAK = 64 << 20  # bytes a refused read may allocate; every bomb below declares at least 10 MB


@st.composite
def bomb_files(draw) -> tuple[bytes, bool, str]:
    """(file bytes, gzip?, "bomb" or "honest"): a header declaring far more voxels than the few hundred bytes after
    it (NIfTI-1 dims up to 32767, NIfTI-2 up to 2**40), or an honest small file holding what it declares."""
    honest = draw(st.booleans())
    version = draw(st.sampled_from([1, 2]))
    ndim = draw(st.sampled_from([3, 4]))
    if honest:
        shape = [draw(st.integers(2, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 24))] + [1] * (ndim - 3)
    else:
        big = st.sampled_from([1000, 4096, 30000, 32767] + ([2**20, 2**31, 2**40] if version == 2 else []))
        shape = [draw(st.integers(1, 8)) for _ in range(ndim)]
        for axis in draw(st.lists(st.integers(0, ndim - 1), min_size=2, max_size=3, unique=True)):
            shape[axis] = draw(big)
    code = draw(st.sampled_from([2, 4, 16, 64, 512]))
    header = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)()
    header.set_data_dtype(code)
    raw = header.structarr
    raw["dim"] = [ndim, *shape, *([1] * (7 - ndim))]
    raw["pixdim"] = [1.0, *draw(st.lists(st.floats(0.3, 5.0), min_size=3, max_size=3)), 1, 1, 1, 1]
    raw["sform_code"] = 1
    raw["srow_x"], raw["srow_y"], raw["srow_z"] = np.hstack([np.diag(raw["pixdim"][1:4]), np.zeros((3, 1))])
    raw["xyzt_units"] = draw(st.sampled_from([0, 1, 2, 3, 5, 10]))
    first = header.single_vox_offset  # 352 for NIfTI-1, 544 for NIfTI-2
    offset = first if honest else draw(st.sampled_from([first, first + 16, first + 4096, 2**30]))
    raw["vox_offset"] = offset
    if honest:
        values = np.arange(int(np.prod(shape))) % 1000 - 500  # not constant (a blank image is refused as such)
        payload = values.astype(header.get_data_dtype()).tobytes(order="F")
    else:
        payload = draw(st.sampled_from([b"", b"\x00" * 64, bytes(range(256)) * 4]))
    pad = b"\x00" * (min(offset, first + 4096) - len(raw.tobytes()))
    return raw.tobytes() + pad + payload, draw(st.booleans()), "honest" if honest else "bomb"


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(bomb_files())
def test_a_header_bomb_is_refused_before_anything_is_allocated(case):
    blob, gz, kind = case
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        if kind == "honest":
            patch.setattr(limits, "MAX_VOXELS", 4096)  # a bomb meets the real limit and the file-size check
        path = Path(folder) / ("x.nii.gz" if gz else "x.nii")
        path.write_bytes(gzip.compress(blob) if gz else blob)
        declared = int(np.prod(nib.load(path).header.get_data_shape(), dtype=object))
        tracemalloc.start()
        try:
            volume = read_volume(path, case="fuzz")
        except Seg3dError as err:
            assert str(err).startswith("fuzz: ") and "\n" not in str(err)
            assert "over the limit of " in str(err) or "bytes with its header, but" in str(err), str(err)
            event(f"{kind}: refused, {'over the limit' if 'over the limit' in str(err) else 'more than the file'}")
            volume = None
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peak < BOMB_PEAK, f"{kind} file of {len(blob)} bytes declaring {declared} voxels allocated {peak} bytes"
    if kind == "bomb" or declared > limits.MAX_VOXELS or (kind == "honest" and declared > 4096):
        assert volume is None, f"a {kind} file declaring {declared} voxels was read"
    else:
        assert volume is not None and volume.array.size == declared
        event("honest: loaded")
