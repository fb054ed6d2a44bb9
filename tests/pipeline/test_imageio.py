"""read_volume on real files: NIfTI written here with nibabel, and the real DICOM series of ../shared/data."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import Seg3dError
from pipeline.imageio import read_volume, to_ras


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
