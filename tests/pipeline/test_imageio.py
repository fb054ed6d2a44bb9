"""read_volume on real files: NIfTI written here with nibabel (units, header bombs, identity of what was read), and
the real DICOM series of ../shared/data."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import Seg3dError
from pipeline.imageio import read_again, read_volume, to_ras


def _ramp(shape) -> np.ndarray:
    """Not constant: a constant image is refused as blank (test_bad_input.py)."""
    return (np.arange(int(np.prod(shape))) % 1000).reshape(shape).astype(np.int16)


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine), path)
    return path


def test_nifti_round_trip_keeps_voxels_affine_and_label_dtype(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1000, (6, 5, 4)).astype(np.int16)
    affine = np.array([[-0.7, 0, 0, 10], [0, -0.7, 0, 20], [0, 0, 3, -30], [0, 0, 0, 1]])
    v = read_volume(_save(tmp_path / "x.nii.gz", image, affine), case="c1")
    assert v.array.dtype == np.float32 and v.array.shape == (6, 5, 4)
    np.testing.assert_array_equal(v.array, image)
    np.testing.assert_allclose(v.affine, affine, atol=1e-6)
    assert v.axcodes == "LPS" and v.notes == []
    label = read_volume(_save(tmp_path / "l.nii", (image > 0).astype(np.uint8)), kind="label")
    assert label.array.dtype == np.uint8


def test_to_ras_flips_voxels_without_moving_them_in_world(tmp_path):
    """Every voxel keeps its world position: affine @ index gives the same point before and after."""
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.array([[-1.0, 0, 0, 5], [0, 0, 2, -3], [0, -3, 0, 7], [0, 0, 0, 1]])  # L, S, P (axes swapped)
    v = read_volume(_save(tmp_path / "x.nii.gz", array, affine))
    r = to_ras(v)
    assert r.axcodes == "RAS" and r.array.shape == (2, 4, 3)
    for idx in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        world = (v.affine @ [*idx, 1])[:3]
        ras_idx = np.rint(np.linalg.solve(r.affine, [*world, 1])[:3]).astype(int)
        assert r.array[tuple(ras_idx)] == v.array[idx]


@pytest.mark.parametrize(
    "shape, ok",
    [((6, 5, 4, 1), True), ((6, 5, 4, 3), False), ((6, 5), False), ((6, 5, 4, 1, 2), False)],
)
def test_dimensions(tmp_path, shape, ok):
    path = _save(tmp_path / "x.nii.gz", _ramp(shape))
    if ok:
        v = read_volume(path, case="c1")
        assert v.array.shape == shape[:3]
        assert any("squeezed" in n for n in v.notes)
    else:
        with pytest.raises(Seg3dError, match=rf"^c1: image .* is {len(shape)}D, shape \({shape[0]}, "):
            read_volume(path, case="c1")


def test_truncated_text_and_missing_files_are_errors_with_the_case(tmp_path):
    good = _save(tmp_path / "good.nii.gz", np.ones((32, 32, 32), np.int16))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.nii.gz"
    text.write_text("not an image\n")
    for path in (cut, text):
        with pytest.raises(Seg3dError, match=r"^c7: cannot read image .*\(truncated or not NIfTI\?\)"):
            read_volume(path, case="c7")
    with pytest.raises(Seg3dError, match=r"^c7: label not found: .*missing\.nii\.gz"):
        read_volume(tmp_path / "missing.nii.gz", case="c7", kind="label")


def test_qform_sform_disagreement_is_a_note_and_the_sform_is_used(tmp_path):
    img = nib.Nifti1Image(_ramp((4, 4, 4)), None)
    sform = np.diag([1.0, 1.0, 2.0, 1.0])
    img.set_sform(sform, code=1)
    img.set_qform(np.diag([-1.0, 1.0, 2.0, 1.0]), code=1)
    nib.save(img, tmp_path / "x.nii.gz")
    v = read_volume(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(v.affine, sform)
    assert len(v.notes) == 1 and "disagree" in v.notes[0] and "sform was used" in v.notes[0]
    assert v.notes[0].level == "warning"


def test_oblique_is_a_note_and_shear_is_an_error(tmp_path):
    angle = np.radians(12)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([0.8, 0.8, 2.5])
    v = read_volume(_save(tmp_path / "o.nii.gz", _ramp((4, 4, 4)), oblique))
    assert len(v.notes) == 1 and "oblique directions" in v.notes[0] and "12.0 degrees" in v.notes[0]
    sheared = np.diag([0.8, 0.8, 2.5, 1.0])
    sheared[0, 2] = 0.5  # z axis leans into x
    with pytest.raises(Seg3dError, match="sheared affine"):
        read_volume(_save(tmp_path / "s.nii.gz", _ramp((4, 4, 4)), sheared), case="c1")
    header = nib.Nifti1Header()
    header.set_sform(np.diag([0.8, 0.8, 0.0, 1.0]), code=1)  # nibabel refuses such an affine, a header takes it
    nib.save(nib.Nifti1Image(_ramp((4, 4, 4)), None, header), tmp_path / "z.nii.gz")
    with pytest.raises(Seg3dError, match=r"^c1: image .* has a non-invertible affine"):
        read_volume(tmp_path / "z.nii.gz", case="c1")


# -- units: the spatial unit a NIfTI header declares becomes mm ------------------------------------------------------


@pytest.mark.parametrize("unit, to_mm", [("meter", 1000.0), ("micron", 0.001), ("mm", 1.0), ("unknown", 1.0)])
def test_declared_spatial_units_are_converted_to_mm(tmp_path, unit, to_mm):
    """A 0.0008 m voxel is 0.8 mm (ITK converts so too; nibabel and MONAI would give 0.0008 mm). The same scan
    written in metres, micrometres and mm reads as one volume in world mm."""
    mm = np.array([[-0.8, 0, 0, 100.0], [0, 0.8, 0, -50.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    affine = mm.copy()
    affine[:3] /= to_mm  # the same geometry in the header's unit
    img = nib.Nifti1Image(_ramp((5, 4, 3)), affine)
    img.header.set_xyzt_units(unit, "sec")
    v = read_volume(_save_img(img, tmp_path / "x.nii.gz"), case="c1")
    np.testing.assert_allclose(v.affine, mm, atol=1e-5)
    assert v.spacing == pytest.approx((0.8, 0.8, 2.5))
    converted = [n for n in v.notes if "spatial unit" in n]
    assert len(converted) == (to_mm != 1.0)
    if converted:
        assert f"converted to mm (x {to_mm:g})" in converted[0] and converted[0].level == "info"


def test_a_spatial_unit_code_nifti_does_not_define_is_taken_as_mm(tmp_path):
    img = nib.Nifti1Image(_ramp((5, 4, 3)), np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header["xyzt_units"] = 5 | 8  # 5: no spatial unit; 8: seconds
    v = read_volume(_save_img(img, tmp_path / "x.nii"))
    assert v.spacing == pytest.approx((0.8, 0.8, 2.5)) and v.notes == []


def _save_img(img, path):
    nib.save(img, path)
    return path


# -- the declared size against what the file holds, before anything is allocated -----------------------------------


def _header_only(shape, dtype=np.int16, offset=352) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header["vox_offset"] = offset
    return header.binaryblock + b"\x00" * 4 + b"\x00" * 64


def test_a_gzip_declaring_more_than_deflate_can_hold_is_refused_naming_both_sizes(tmp_path):
    """32767 x 32767 x 2 int16 in a 66-byte gzip: nibabel would allocate 4.3 GB before finding 416 bytes."""
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_header_only((32767, 32767, 2))))
    size = path.stat().st_size
    with pytest.raises(
        Seg3dError,
        match=rf"^c1: image .*bomb.nii.gz declares 2.15e\+09 voxels, 4.29e\+09 bytes with its header, but a "
        rf"{size}-byte gzip file holds at most {size * 1032:,} bytes \(deflate: 1032:1\): the header's dim is wrong",
    ):
        read_volume(path, case="c1")


def test_a_plain_nii_shorter_than_its_header_declares_is_refused_naming_both_sizes(tmp_path):
    path = tmp_path / "short.nii"
    path.write_bytes(_header_only((512, 512, 300)))
    with pytest.raises(
        Seg3dError,
        match=r"^c1: label .* declares 78,643,200 voxels, 157,286,752 bytes with its "
        r"header, but the file is 416 bytes",
    ):
        read_volume(path, case="c1", kind="label")


def test_a_header_beyond_the_voxel_limit_is_refused_and_the_limit_is_stated(tmp_path, monkeypatch):
    from pipeline import limits

    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(_header_only((32767, 32767, 8))))
    with pytest.raises(
        Seg3dError,
        match=r"^c1: image .*huge.nii.gz, shape \(32767, 32767, 8\), declares 8.59e\+09 "
        r"voxels, over the limit of 2.15e\+09 \(2\*\*31\)",
    ):
        read_volume(path, case="c1")
    # An honest file over a (lowered) limit is refused the same way: the limit is absolute, not only a lie detector.
    monkeypatch.setattr(limits, "MAX_VOXELS", 59)
    with pytest.raises(Seg3dError, match=r"shape \(5, 4, 3\), declares 60 voxels, over the limit of 59"):
        read_volume(_save(tmp_path / "x.nii.gz", _ramp((5, 4, 3))), case="c1")


# -- the input read once, and what it was read from ------------------------------------------------------------------


def test_a_volume_keeps_the_header_as_read_and_the_files_identity(tmp_path):
    path = _save(tmp_path / "x.nii.gz", _ramp((5, 4, 3)))
    v = read_volume(path, case="c1")
    assert v.source.path == path and v.source.files == (str(path),)
    assert v.source.identity[0][1:3] == (path.stat().st_ino, path.stat().st_size)
    assert v.source.header["sform_code"] == nib.load(path).header["sform_code"]
    v.source.check_unchanged("c1")  # nothing happened to it
    assert read_again(v.source, "c1").array.shape == (5, 4, 3)


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_an_input_replaced_or_rewritten_after_the_read_is_refused_when_looked_at_again(tmp_path, how):
    path = _save(tmp_path / "x.nii.gz", _ramp((5, 4, 3)))
    v = read_volume(path, case="c1")
    other = _save(tmp_path / "other.nii.gz", _ramp((5, 4, 3)), np.diag([2.0, 2.0, 2.0, 1.0]))
    if how == "replaced":
        other.replace(path)  # a new inode under the old name
    else:
        path.write_bytes(other.read_bytes())  # same inode, new bytes and mtime
    with pytest.raises(Seg3dError, match=r"^c1: image .*x.nii.gz was replaced or rewritten after it was read"):
        v.source.check_unchanged("c1")
    with pytest.raises(Seg3dError, match="was replaced or rewritten after it was read"):
        read_again(v.source, "c1")
