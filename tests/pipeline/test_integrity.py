"""`seg3d check-data` on real files: phantom datasets, NIfTI with planted defects written here, and the real CT and
DICOM series of ../shared/data/real_ct."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.datalists import load_dataset, parse_labels
from pipeline.integrity import check_dataset
from tests.pipeline._datasets import AFFINE, ct, errors, organ, phantom_dataset, write_case


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_dataset(tmp_path_factory.mktemp("phantom"))


def test_check_data_passes_on_a_phantom_with_lps_and_las_cases(phantom, capsys):
    assert main(["check-data", str(phantom)]) == 0
    out = capsys.readouterr().out
    assert "pancreas_002: image stored LPS; reoriented to RAS" in out
    assert "pancreas_004: image stored LAS; reoriented to RAS" in out
    assert "ERROR" not in out and "usable: 0 errors" in out
    dataset = load_dataset(phantom)
    report = check_dataset(dataset)
    assert [i.case for i in report.infos] == ["pancreas_001", "pancreas_002", "pancreas_003", "pancreas_004"]
    for case, info in zip(dataset.cases + dataset.test, report.infos):
        stored = np.asarray(nib.load(case.label).dataobj)  # counts are the file's, whatever its orientation
        assert info.label_voxels == {n: int((stored == v).sum()) for n, v in dataset.labels.items()}
        assert info.shape_ras[2] == min(info.shape_ras) and info.spacing_ras[0] == info.spacing_ras[1]
        assert 0 < info.foreground_sample.size <= 10_000 and 60 < float(np.median(info.foreground_sample)) < 130
    summary = report.summary()
    assert summary["cases"] == 4 and summary["errors"] == 0
    assert summary["label_voxels"]["pancreas"] == sum(i.label_voxels["pancreas"] for i in report.infos)
    assert len(check_dataset(load_dataset(phantom), include_test=False).infos) == 3


def test_label_stored_in_another_orientation_is_not_an_error(tmp_path):
    """Same grid after reorientation to RAS: compare in RAS, never the stored arrays."""
    write_case(tmp_path, "c1")
    las = nib.Nifti1Image(organ(), AFFINE).as_reoriented([[0, -1], [1, 1], [2, 1]])  # flip x: stored LAS
    assert "".join(nib.aff2axcodes(las.affine)) == "LAS"
    nib.save(las, tmp_path / "labels" / "c1.nii.gz")
    report = check_dataset(load_dataset(tmp_path))
    assert report.ok, report.format()
    expected = {
        name: int((organ() == value).sum()) for name, value in (("background", 0), ("pancreas", 1), ("cancer", 2))
    }
    assert report.infos[0].label_voxels == expected and expected["cancer"] == 8


def _truncated(root):
    write_case(root, "bad")
    path = root / "images" / "bad.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _text(root):
    write_case(root, "bad")
    (root / "images" / "bad.nii.gz").write_text("this is not an image\n")


def _affine_with(**kw):
    affine = AFFINE.copy()
    if "origin" in kw:
        affine[:3, 3] += kw["origin"]
    if "spacing" in kw:
        affine[:3, :3] = np.diag(kw["spacing"])
    if "flip_y" in kw:
        affine[1, 1] *= -1
    return affine


def _oblique():
    angle = np.radians(10)
    affine = AFFINE.copy()
    affine[:3, :3] = (
        np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]) @ (AFFINE[:3, :3])
    )
    return affine


def _sheared():
    affine = AFFINE.copy()
    affine[0, 2] = 0.6
    return affine


def _qform_sform(root):
    write_case(root, "bad")
    img = nib.load(root / "images" / "bad.nii.gz")
    img = nib.Nifti1Image(np.asarray(img.dataobj), None, img.header)
    img.set_sform(AFFINE, code=1)
    img.set_qform(_affine_with(origin=[5.0, 0, 0]), code=1)
    nib.save(img, root / "images" / "bad.nii.gz")


def _nan(root):
    image = ct().astype(np.float32)
    image[5, 5, 5] = np.nan
    image[6, 6, 6] = np.inf
    write_case(root, "bad", image=image)


NORMALISED = (ct().astype(np.float32) + 1000) / 1000 - 0.5

# name -> (plant the defect in case "bad" under root, expected substrings of one finding, its level, usable?)
DEFECTS = {
    "truncated": (_truncated, ["cannot read image", "truncated or not NIfTI"], "error", False),
    "text file": (_text, ["cannot read image", "truncated or not NIfTI"], "error", False),
    "2D image": (lambda r: write_case(r, "bad", image=ct()[:, :, 0]), ["is 2D"], "error", False),
    "4D image": (
        lambda r: write_case(r, "bad", image=np.stack([ct()] * 3, -1)),
        ["is 4D", "(24, 20, 12, 3)"],
        "error",
        False,
    ),
    "4D singleton": (lambda r: write_case(r, "bad", image=ct()[..., None]), ["squeezed"], "info", True),
    "NaN": (_nan, ["1 NaN and 1 Inf voxels"], "error", False),
    "normalised": (lambda r: write_case(r, "bad", image=NORMALISED), ["look normalised, not HU"], "error", False),
    "beyond HU": (
        lambda r: write_case(r, "bad", image=ct().astype(np.float32) * 40),
        ["no CT stores as HU"],
        "error",
        False,
    ),
    # a tight crop: fat (-250) but no air: usable, said as a warning
    "no air": (
        lambda r: write_case(r, "bad", image=ct() // 4),
        ["no air below -900 HU (range -250..14)"],
        "warning",
        True,
    ),
    # raw scanner values (no rescale applied: air stored as 24, water as 1024) and an MR-like image: never negative
    "raw scanner units": (
        lambda r: write_case(r, "bad", image=ct() + 1024),
        ["intensities 24..1083 hold no negative value", "raw scanner values", "RescaleSlope + RescaleIntercept"],
        "error",
        False,
    ),
    "MR-like": (
        lambda r: write_case(r, "bad", image=((ct() + 1000) * 1.5).astype(np.int16)),
        ["intensities 0..1588 hold no negative value", "not a CT (MR?)"],
        "error",
        False,
    ),
    "undeclared": (
        lambda r: write_case(r, "bad", label=organ() * 3),
        ["label values 3, 6 are not declared (background=0, pancreas=1, cancer=2)", "--labels NAME=VALUE"],
        "error",
        False,
    ),
    "non-integer": (lambda r: write_case(r, "bad", label=organ() * 0.5), ["non-integer voxels"], "error", False),
    "no foreground": (lambda r: write_case(r, "bad", label=organ() * 0), ["no foreground"], "warning", True),
    "shape": (
        lambda r: write_case(r, "bad", label=organ()[:, :, :10]),
        ["grids differ (shape)", "image shape (24, 20, 12)", "label shape (24, 20, 10)"],
        "error",
        False,
    ),
    "spacing": (
        lambda r: write_case(r, "bad", label_affine=_affine_with(spacing=[0.8, 0.8, 3.0])),
        ["grids differ (spacing)", "spacing 0.8 x 0.8 x 2.5 mm", "spacing 0.8 x 0.8 x 3 mm"],
        "error",
        False,
    ),
    "origin": (
        lambda r: write_case(r, "bad", label_affine=_affine_with(origin=[0, 0, 5.0])),
        ["grids differ (origin)", "origin (-10.00, -8.00, -15.00)", "origin (-10.00, -8.00, -10.00)"],
        "error",
        False,
    ),
    "direction": (
        lambda r: write_case(r, "bad", label_affine=_affine_with(flip_y=True)),
        ["grids differ (direction, origin)", "axes RAS", "axes RPS"],
        "error",
        False,
    ),
    "qform/sform": (_qform_sform, ["qform", "disagree", "sform was used"], "warning", True),
    "oblique": (
        lambda r: write_case(r, "bad", image_affine=_oblique(), label_affine=_oblique()),
        ["oblique directions (gantry tilt?)", "10.0 degrees", "used as stored"],
        "info",
        True,
    ),
    "sheared": (
        lambda r: write_case(r, "bad", image_affine=_sheared(), label_affine=_sheared()),
        ["sheared affine"],
        "error",
        False,
    ),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_planted_defect_is_reported_with_its_case(tmp_path, defect):
    plant, expected, level, usable = DEFECTS[defect]
    write_case(tmp_path, "good")
    plant(tmp_path)
    report = check_dataset(load_dataset(tmp_path))
    matching = [f for f in report.findings if all(e in f.message for e in expected)]
    assert matching, report.format()
    assert all(f.case == "bad" and f.level == level for f in matching), report.format()
    assert report.ok is usable, report.format()
    assert not [f for f in report.findings if f.case == "good" and f.level != "info"], report.format()
    tag = {"error": "ERROR", "warning": "WARN", "info": "INFO"}[level]
    assert f"{tag:<5}  bad: " in report.format()


def test_several_defects_are_all_reported(tmp_path):
    """One pass finds everything: four broken cases, one with two defects, and a good one."""
    write_case(tmp_path, "good")
    write_case(tmp_path, "nan_and_undeclared", image=_nan_image(), label=organ() * 3)
    write_case(tmp_path, "shape", label=organ()[:, :, :10])
    write_case(tmp_path, "normalised", image=NORMALISED)
    _truncated_case(tmp_path, "truncated")
    csv = tmp_path / "list.csv"
    cases = ["good", "nan_and_undeclared", "shape", "normalised", "truncated"]
    rows = [f"{c},images/{c}.nii.gz,labels/{c}.nii.gz" for c in cases] + ["missing,images/missing.nii.gz,"]
    csv.write_text("case,image,label\n" + "\n".join(rows) + "\n")
    report = check_dataset(load_dataset(csv))
    assert not report.ok
    assert errors(report, "good") == []
    assert len(errors(report, "nan_and_undeclared")) == 2
    assert any("NaN" in m for m in errors(report, "nan_and_undeclared"))
    assert any("not declared" in m for m in errors(report, "nan_and_undeclared"))
    assert any("grids differ (shape)" in m for m in errors(report, "shape"))
    assert any("normalised" in m for m in errors(report, "normalised"))
    assert any("truncated" in m for m in errors(report, "truncated"))
    assert any("image not found" in m for m in errors(report, "missing"))
    assert report.summary()["errors"] == 6 and report.summary()["cases"] == 6
    text = report.format()
    for c in [*cases[1:], "missing"]:
        assert f"ERROR  {c}: " in text
    assert text.rstrip().endswith("NOT usable: 6 errors, 0 warnings, 0 notes")
    assert main(["check-data", str(csv)]) == 2
    assert main(["check-data", str(csv), "--no-test"]) == 2  # "missing" has no label: a test case


def _nan_image():
    image = ct().astype(np.float32)
    image[5, 5, 5] = np.nan
    return image


def _truncated_case(root, case):
    write_case(root, case)
    path = root / "images" / f"{case}.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_cli_bad_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["check-data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("seg3d check-data: error: dataset not found:")
    assert main(["check-data", str(tmp_path), "--labels", "pancreas"]) == 2
    assert capsys.readouterr().err.startswith("seg3d check-data: error: bad label selection 'pancreas'")


# ---------------------------------------------------------------------------------------------------------
# Real scanner data


def test_real_ct_with_float64_mask_passes(real_ct, tmp_path, capsys):
    csv = tmp_path / "real.csv"
    csv.write_text(f"case,image,label\nct,{real_ct / 'ct.nii.gz'},{real_ct / 'masks' / 'pancreas.nii.gz'}\n")
    report = check_dataset(load_dataset(csv))
    assert report.ok and report.findings == [], report.format()
    info = report.infos[0]
    assert info.shape_ras == (122, 101, 112) and info.spacing_ras == (3.0, 3.0, 3.0) and info.orientation == "RAS"
    assert info.label_voxels["pancreas"] == 818 and info.foreground_sample.size == 818
    assert info.hu_range == (-1207.0, 3382.0)
    assert main(["check-data", str(csv)]) == 0


def test_real_dicom_series_with_las_label_passes_with_a_selection(real_ct, tmp_path):
    csv = tmp_path / "dicom.csv"
    csv.write_text(f"case,image,label\ndcm,{real_ct / 'dicom_series'},{real_ct / 'dicom_series_labels.nii.gz'}\n")
    report = check_dataset(load_dataset(csv, labels=parse_labels("pancreas=7")))
    assert report.ok, report.format()
    assert [f.level for f in report.findings] == ["info"]  # stored LPS, reoriented
    info = report.infos[0]
    assert info.orientation == "LPS" and info.shape_ras == (512, 512, 20)
    assert info.label_voxels == {"background": 512 * 512 * 20 - 1327, "pancreas": 1327}
    assert 0 < float(np.median(info.foreground_sample)) < 250
    # Without the selection, TotalSegmentator's ids are undeclared values: an error that says what to do.
    declared = check_dataset(load_dataset(csv))
    assert not declared.ok and "pass --labels NAME=VALUE" in errors(declared, "dcm")[0]
