"""`seg3d infer --statistics` (pipeline/statistics.py): volumes, HU and bounding boxes against numbers computed
independently (by hand on a box, by SimpleITK's label statistics, from the files on disk with nibabel), the JSON and
CSV beside the mask, and one table for a batch."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from pipeline.infer import run_inference
from pipeline.statistics import COLUMNS, structure_statistics, write_batch_table, write_case_statistics
from tests.pipeline._ct_series import phantom_hu


def test_a_box_gives_its_volume_hu_and_extent_by_hand():
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 100.0]
    image = np.full((10, 12, 8), -1000.0, np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[2:6, 3:8, 1:4] = 1  # 4 x 5 x 3 = 60 voxels of 2 x 3 x 4 mm = 24 mm3
    image[2:6, 3:8, 1:4] = np.arange(60, dtype=np.float32).reshape(4, 5, 3)  # HU 0 .. 59
    rows = structure_statistics(image, labels, affine, names=["background", "liver", "spleen"], values=[0, 5, 9])
    liver, spleen = rows
    assert liver["structure"] == "liver" and liver["label"] == 5 and liver["voxels"] == 60
    assert liver["volume_ml"] == pytest.approx(60 * 24 / 1000)
    assert liver["hu_mean"] == pytest.approx(29.5) and liver["hu_median"] == pytest.approx(29.5)
    assert liver["hu_std"] == pytest.approx(np.sqrt((60**2 - 1) / 12), abs=0.01)  # of 0..59, over the voxels
    assert (liver["hu_min"], liver["hu_max"]) == (0.0, 59.0)
    # Voxel centres: x = -10 + 2 i for i in 2..5, y = 5 + 3 j for j in 3..7, z = 100 + 4 k for k in 1..3.
    assert [liver[f"bbox_min_{a}_mm"] for a in "xyz"] == [-6.0, 14.0, 104.0]
    assert [liver[f"bbox_max_{a}_mm"] for a in "xyz"] == [0.0, 26.0, 112.0]
    assert [liver[f"extent_{a}_mm"] for a in "xyz"] == [6.0, 12.0, 8.0]
    assert spleen["voxels"] == 0 and spleen["volume_ml"] == 0
    assert spleen["hu_mean"] is None and spleen["bbox_min_x_mm"] is None


def test_an_oblique_grid_bounds_the_voxel_centres_in_patient_coordinates():
    theta = np.radians(30)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.8, 2.5])
    affine[:3, 3] = [3.0, -7.0, 11.0]
    labels = np.zeros((20, 20, 6), np.uint8)
    labels[4:9, 10:15, 2:5] = 1
    rows = structure_statistics(np.zeros(labels.shape), labels, affine, names=["bg", "a"], values=[0, 1])
    corners = np.array([[i, j, k, 1] for i in (4, 8) for j in (10, 14) for k in (2, 4)], float) @ affine.T
    np.testing.assert_allclose([rows[0][f"bbox_min_{a}_mm"] for a in "xyz"], corners[:, :3].min(0), atol=0.01)
    np.testing.assert_allclose([rows[0][f"bbox_max_{a}_mm"] for a in "xyz"], corners[:, :3].max(0), atol=0.01)
    assert rows[0]["volume_ml"] == pytest.approx(75 * 0.8 * 0.8 * 2.5 / 1000)


def test_statistics_agree_with_simpleitk_label_statistics():
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    image = rng.normal(40, 30, size=(30, 28, 12)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[5:20, 4:18, 2:9] = 1
    labels[rng.random(image.shape) < 0.05] = 2
    spacing = (0.7, 0.9, 3.0)
    rows = structure_statistics(
        image, labels, np.diag([*spacing, 1.0]), names=["bg", "organ", "speckle"], values=[0, 1, 2]
    )
    itk_image = sitk.GetImageFromArray(image.transpose(2, 1, 0))  # ITK arrays are (z, y, x)
    itk_labels = sitk.GetImageFromArray(labels.transpose(2, 1, 0))
    itk_image.SetSpacing(spacing)
    itk_labels.CopyInformation(itk_image)
    stats = sitk.LabelStatisticsImageFilter()
    stats.Execute(itk_image, itk_labels)
    for row, value in zip(rows, (1, 2)):
        n = stats.GetCount(value)
        assert row["voxels"] == n
        assert row["hu_mean"] == pytest.approx(stats.GetMean(value), abs=0.01)
        assert row["hu_std"] == pytest.approx(stats.GetSigma(value) * np.sqrt((n - 1) / n), abs=0.01)  # ITK: n - 1
        assert (row["hu_min"], row["hu_max"]) == pytest.approx(
            (stats.GetMinimum(value), stats.GetMaximum(value)), abs=0.01
        )
        x0, x1, y0, y1, z0, z1 = stats.GetBoundingBox(value)
        assert [row[f"bbox_min_{a}_mm"] for a in "xyz"] == pytest.approx([x0 * 0.7, y0 * 0.9, z0 * 3.0], abs=0.01)
        assert [row[f"bbox_max_{a}_mm"] for a in "xyz"] == pytest.approx([x1 * 0.7, y1 * 0.9, z1 * 3.0], abs=0.01)
        assert row["volume_ml"] == pytest.approx(n * 0.7 * 0.9 * 3.0 / 1000, abs=1e-4)


def test_json_csv_and_the_batch_table_hold_the_same_rows(tmp_path):
    labels = np.zeros((6, 6, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    rows = structure_statistics(np.ones(labels.shape), labels, np.eye(4), names=["bg", "a", "b"], values=[0, 1, 2])
    for case in ("c1", "c2"):
        write_case_statistics(rows, case=case, json_path=tmp_path / f"{case}.json", csv_path=tmp_path / f"{case}.csv")
    document = json.loads((tmp_path / "c1.json").read_text())
    assert document["case"] == "c1" and document["structures"] == rows and document["units"]["volume"] == "ml"
    with open(tmp_path / "c1.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and [r["structure"] for r in table] == ["a", "b"]
    assert float(table[0]["volume_ml"]) == rows[0]["volume_ml"] and table[1]["hu_mean"] == ""
    cases = write_batch_table(
        [tmp_path / "c1.json", tmp_path / "missing.json", tmp_path / "c2.json"], tmp_path / "all.csv"
    )
    with open(tmp_path / "all.csv", newline="") as f:
        batch = list(csv.DictReader(f))
    assert cases == 2 and [(r["case"], r["structure"]) for r in batch] == [
        ("c1", "a"),
        ("c1", "b"),
        ("c2", "a"),
        ("c2", "b"),
    ]


def test_infer_statistics_of_a_batch_match_the_files_written(bundle_dir, tmp_path):
    """Two CTs: each case's JSON equals numbers computed from the CT and the mask read back from disk with nibabel,
    and statistics.csv holds both cases."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    for seed, name in enumerate(("a", "b")):
        nib.save(nib.Nifti1Image(phantom_hu(seed=seed), affine), inputs / f"{name}.nii.gz")
    out = tmp_path / "out"
    summary = run_inference(bundle_dir, inputs, out, statistics=True, postprocess=False, progress=False)
    assert summary.done == ["a", "b"]
    voxel_ml = 0.8 * 0.9 * 2.5 / 1000
    found = 0
    for name in ("a", "b"):
        hu = np.asarray(nib.load(inputs / f"{name}.nii.gz").dataobj).astype(np.float64)
        mask = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        document = json.loads((out / f"{name}_statistics.json").read_text())
        assert [r["structure"] for r in document["structures"]] == ["pancreas", "cancer"]
        for row in document["structures"]:
            inside = mask == row["label"]
            found += int(inside.any())
            assert row["voxels"] == int(inside.sum())
            assert row["volume_ml"] == pytest.approx(inside.sum() * voxel_ml, abs=1e-3)
            if inside.any():
                assert row["hu_mean"] == pytest.approx(hu[inside].mean(), abs=0.01)
                assert row["hu_median"] == pytest.approx(np.median(hu[inside]), abs=0.01)
                assert row["bbox_min_z_mm"] == pytest.approx(2.5 * np.argwhere(inside)[:, 2].min(), abs=0.01)
        assert (out / f"{name}_statistics.csv").is_file()
    assert found > 0, "the untrained model marks something: there are numbers to compare"
    with open(out / "statistics.csv", newline="") as f:
        batch = list(csv.DictReader(f))
    assert [(r["case"], r["structure"]) for r in batch] == [(c, s) for c in "ab" for s in ("pancreas", "cancer")]
