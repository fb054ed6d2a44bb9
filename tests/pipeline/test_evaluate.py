"""`seg3d evaluate` and its API on real NIfTI files. Expected values come from closed forms of hand-made
geometry, or from an independent surface and distance computation (numpy face neighbours and scipy's EDT),
never from the code under test."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.errors import Seg3dError
from pipeline.evaluate import CSV_COLUMNS, evaluate_folders
from pipeline.metrics import evaluate_case

SPACING = (0.8, 0.8, 2.5)
AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, -8.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])
SHAPE = (40, 40, 20)
VOXEL_ML = 0.8 * 0.8 * 2.5 / 1000
PANCREAS = {"pancreas": 1}
MSD = {"pancreas": 1, "cancer": 2}


def box(lo, size, shape=SHAPE, value=1) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, a + n) for a, n in zip(lo, size))] = value
    return mask


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def one(records: list[dict], label: str = "pancreas") -> dict:
    (record,) = [r for r in records if r["label"] == label]
    return record


def test_empty_structures_follow_the_decathlon_conventions_and_are_counted(tmp_path):
    shape = (20, 30, 10)
    diagonal = math.sqrt((20 * 0.8) ** 2 + (30 * 0.8) ** 2 + (10 * 2.5) ** 2)  # sqrt(1457) mm, the field of view
    empty = np.zeros(shape, dtype=np.uint8)
    organ = box((5, 5, 2), (4, 5, 3), shape)

    both = one(evaluate_case(empty, empty, SPACING, PANCREAS))
    assert {k: both[k] for k in ("dice", "nsd", "hd95_mm", "volume_diff_ml", "status")} == {
        "dice": 1.0, "nsd": 1.0, "hd95_mm": 0.0, "volume_diff_ml": 0.0, "status": "both_empty"
    }  # fmt: skip
    missed = one(evaluate_case(empty, organ, SPACING, PANCREAS))
    assert (missed["dice"], missed["nsd"], missed["status"]) == (0.0, 0.0, "missed")
    assert missed["hd95_mm"] == pytest.approx(diagonal, abs=1e-6)
    assert missed["volume_diff_ml"] == pytest.approx(-60 * VOXEL_ML, abs=1e-6)
    false_positive = one(evaluate_case(organ, empty, SPACING, PANCREAS))
    assert (false_positive["dice"], false_positive["nsd"], false_positive["status"]) == (0.0, 0.0, "false_positive")
    assert false_positive["hd95_mm"] == pytest.approx(diagonal, abs=1e-6)
    assert false_positive["volume_diff_ml"] == pytest.approx(60 * VOXEL_ML, abs=1e-6)

    # Through files: cancer is declared but absent from every reference, so it is reported (both_empty, or
    # false_positive where predicted); summary means cover every case, edge cases included.
    cases = {"a": (organ, organ), "b": (empty, organ), "c": (organ + box((1, 1, 1), (2, 2, 2), shape, 2), organ)}
    for case, (p, r) in cases.items():
        save(tmp_path / "pred" / f"{case}.nii.gz", p)
        save(tmp_path / "ref" / f"{case}_0000.nii.gz", r)
    report = evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels=MSD)
    assert [(r["case"], r["label"], r["status"]) for r in report.records] == [
        ("a", "pancreas", "both_present"), ("a", "cancer", "both_empty"),
        ("b", "pancreas", "missed"), ("b", "cancer", "both_empty"),
        ("c", "pancreas", "both_present"), ("c", "cancer", "false_positive"),
    ]  # fmt: skip
    summary = report.summary()
    assert summary["pancreas"]["dice"]["mean"] == pytest.approx(2 / 3, abs=1e-6)
    assert summary["pancreas"]["hd95_mm"]["median"] == 0.0
    assert summary["pancreas"]["hd95_mm"]["mean"] == pytest.approx(diagonal / 3, abs=1e-5)
    assert summary["pancreas"]["dice"]["std"] == pytest.approx(np.std([1, 0, 1], ddof=1), abs=1e-6)
    assert summary["cancer"]["status_counts"] == {"both_present": 0, "both_empty": 2, "missed": 0, "false_positive": 1}
    assert summary["cancer"]["cases"] == ["a", "b", "c"] and summary["cancer"]["n"] == 3


# -- input errors -----------------------------------------------------------------------------------------------


def test_geometry_mismatch_names_the_case_and_both_geometries(tmp_path):
    organ = box((10, 10, 5), (6, 6, 4))
    save(tmp_path / "pred" / "p01.nii.gz", organ, AFFINE + _origin_shift(1.0))
    save(tmp_path / "ref" / "p01.nii.gz", organ)
    with pytest.raises(Seg3dError, match=r"^p01: prediction and reference geometries differ") as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert "origin (-9.00, -8.00, -15.00)" in str(err.value) and "origin (-10.00, -8.00, -15.00)" in str(err.value)

    save(tmp_path / "pred" / "p01.nii.gz", organ[:, :, :-1])
    with pytest.raises(Seg3dError, match=r"^p01: .*shape \(40, 40, 19\).*shape \(40, 40, 20\)"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    save(tmp_path / "pred" / "p01.nii.gz", organ, AFFINE + _origin_shift(0.0005))  # header rounding: accepted
    assert len(evaluate_folders(tmp_path / "pred", tmp_path / "ref").records) == 2


def _origin_shift(mm: float) -> np.ndarray:
    shift = np.zeros((4, 4))
    shift[0, 3] = mm
    return shift


def test_undeclared_and_non_integer_label_values_name_the_case_and_values(tmp_path):
    ref = box((10, 10, 5), (6, 6, 4))
    with pytest.raises(Seg3dError, match=r"^k7: prediction holds label values 3, 9, which are neither"):
        evaluate_case(ref * 3 + box((1, 1, 1), (1, 1, 1), value=9), ref, SPACING, MSD, case="k7")
    with pytest.raises(Seg3dError, match=r"^k7: reference holds label values 0.5\b"):
        evaluate_case(ref, ref * 0.5, SPACING, MSD, case="k7")
    # A float64 mask holding whole numbers (as nibabel writes them) is fine.
    assert one(evaluate_case(ref.astype(np.float64), ref, SPACING, MSD))["dice"] == 1.0


def test_unmatched_case_ids_are_named_or_left_out_with_allow_missing(tmp_path):
    organ = box((10, 10, 5), (6, 6, 4))
    for case in ("a", "b"):
        save(tmp_path / "pred" / f"{case}.nii.gz", organ)
    for case in ("a", "c_0000"):
        save(tmp_path / "ref" / f"{case}.nii.gz", organ)
    with pytest.raises(Seg3dError) as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert "predictions without reference: b; references without prediction: c)" in str(err.value)
    report = evaluate_folders(tmp_path / "pred", tmp_path / "ref", allow_missing=True)
    assert report.cases == ["a"] and report.unmatched == {"pred_only": ["b"], "ref_only": ["c"]}
    # Two single files are paired as given, under the reference's case id.
    report = evaluate_folders(tmp_path / "pred" / "b.nii.gz", tmp_path / "ref" / "c_0000.nii.gz")
    assert report.cases == ["c"] and one(report.records)["dice"] == 1.0


# -- command line -----------------------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """Three cases: a perfect prediction, a 2-slice shift, a missed pancreas; no cancer anywhere."""
    ref = box((10, 10, 5), (12, 12, 6))
    preds = {"case1": ref, "case2": box((10, 10, 7), (12, 12, 6)), "case3": np.zeros(SHAPE, np.uint8)}
    for case, pred in preds.items():
        save(tmp_path / "pred" / f"{case}.nii.gz", pred)
        save(tmp_path / "ref" / f"{case}.nii.gz", ref)
    return tmp_path / "pred", tmp_path / "ref"


def run_cli(pred: Path, ref: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out), *extra])


def test_cli_writes_csv_json_and_a_summary_table(folders, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_cli(*folders, out) == 0
    stdout = capsys.readouterr().out
    assert "pancreas (3 cases: 2 both present, 0 both empty, 1 missed, 0 false positive)" in stdout
    assert "Dice" in stdout and "HD95 mm" in stdout and "NSD" in stdout

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS == ("case", "label", "dice", "hd95_mm", "nsd", "volume_diff_ml")
    assert len(rows) == 1 + 3 * 2
    dice = {(r[0], r[1]): float(r[2]) for r in rows[1:]}
    assert dice == {
        ("case1", "pancreas"): 1.0, ("case1", "cancer"): 1.0,
        ("case2", "pancreas"): pytest.approx(4 / 6, abs=1e-6), ("case2", "cancer"): 1.0,
        ("case3", "pancreas"): 0.0, ("case3", "cancer"): 1.0,
    }  # fmt: skip

    doc = json.loads((out / "metrics.json").read_text())
    pancreas = doc["summary"]["pancreas"]
    assert pancreas["cases"] == ["case1", "case2", "case3"]
    assert pancreas["dice"]["mean"] == pytest.approx((1 + 4 / 6 + 0) / 3, abs=1e-6)
    assert pancreas["dice"]["median"] == pytest.approx(4 / 6, abs=1e-6)
    diagonal = math.sqrt(32**2 + 32**2 + 50**2)
    assert pancreas["hd95_mm"]["mean"] == pytest.approx((0 + 5.0 + diagonal) / 3, abs=1e-5)
    assert pancreas["status_counts"]["missed"] == 1 and doc["summary"]["cancer"]["status_counts"]["both_empty"] == 3
    assert {r["status"] for r in doc["cases"]} == {"both_present", "both_empty", "missed"}
    assert doc["tolerance_mm"] == 2.0 and doc["labels"] == MSD


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(folders, tmp_path, capsys):
    out = tmp_path / "eval"
    pred, ref = folders
    save(pred / "case2.nii.gz", box((10, 10, 7), (12, 12, 6), value=4))
    assert run_cli(pred, ref, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seg3d evaluate: error: case2: prediction holds label values 4")
    assert not (out / "metrics.csv").exists() and not (out / "metrics.json").exists()

    assert run_cli(pred, ref, out, "--labels", "pancreas=1,cancer=2,vessel=4") == 0
    assert '"vessel"' in (out / "metrics.json").read_text()


def test_cli_refuses_to_overwrite_without_flag(folders, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_cli(*folders, out) == 0
    before = (out / "metrics.json").read_text()
    capsys.readouterr()
    assert run_cli(*folders, out, "--tolerance", "6") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seg3d evaluate: error: metrics.csv and metrics.json already in")
    assert (out / "metrics.json").read_text() == before
    assert run_cli(*folders, out, "--tolerance", "6", "--overwrite") == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["tolerance_mm"] == 6.0 and doc["cases"][2]["nsd"] == 1.0  # case2 pancreas: every distance <= 5 mm


# -- MLflow -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    # One database for the module: creating MLflow's tables costs seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite_store') / 'mlflow.db'}"


def test_mlflow_run_gets_the_means_files_and_table(folders, tmp_path, sqlite_uri, capsys):
    client = MlflowClient(tracking_uri=sqlite_uri)
    experiment = client.create_experiment("eval-test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment, run_name="training").info.run_id
    client.set_terminated(run_id, "KILLED")  # attaching the evaluation must not rewrite how training ended
    out = tmp_path / "eval"
    assert run_cli(*folders, out, "--mlflow-run", run_id, "--tracking-uri", sqlite_uri) == 0

    summary = json.loads((out / "metrics.json").read_text())["summary"]
    run = client.get_run(run_id)
    for label in ("pancreas", "cancer"):
        for metric in ("dice", "hd95_mm", "nsd", "volume_diff_ml"):
            assert run.data.metrics[f"eval_{metric}_{label}"] == pytest.approx(summary[label][metric]["mean"])
    assert run.data.metrics["eval_dice_pancreas"] == pytest.approx((1 + 4 / 6) / 3, abs=1e-6)
    assert run.info.status == "KILLED"
    files = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert files == {"eval/metrics.csv", "eval/metrics.json", "eval/metrics_table.json"}
    logged = Path(client.download_artifacts(run_id, "eval/metrics.csv", str(tmp_path / "dl")))
    assert logged.read_text() == (out / "metrics.csv").read_text()
    table = json.loads(Path(client.download_artifacts(run_id, "eval/metrics_table.json", str(tmp_path))).read_text())
    assert table["columns"] == [*CSV_COLUMNS, "status"] and len(table["data"]) == 6


def test_unknown_mlflow_run_is_one_line_and_writes_nothing(folders, tmp_path, sqlite_uri, capsys):
    out = tmp_path / "eval"
    assert run_cli(*folders, out, "--mlflow-run", "0" * 32, "--tracking-uri", sqlite_uri) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"seg3d evaluate: error: MLflow run {'0' * 32} does not exist")
    assert not (out / "metrics.csv").exists() and not (out / "metrics.json").exists()


# -- real data --------------------------------------------------------------------------------------------------


def test_real_pancreas_mask_against_itself_and_shifted_by_one_voxel(real_ct, tmp_path):
    mask_path = real_ct / "masks" / "pancreas.nii.gz"
    image = nib.load(mask_path)
    assert np.allclose(nib.affines.voxel_sizes(image.affine), 3.0)

    same = evaluate_folders(mask_path, mask_path)
    assert [(r["label"], r["dice"], r["hd95_mm"], r["nsd"], r["status"]) for r in same.records] == [
        ("pancreas", 1.0, 0.0, 1.0, "both_present"),
        ("cancer", 1.0, 0.0, 1.0, "both_empty"),
    ]
    mask = np.asarray(image.dataobj)
    assert not mask[-1].any()  # the roll below moves nothing across the border
    shifted = save(tmp_path / "shifted.nii.gz", np.roll(mask, 1, axis=0), image.affine)
    record = one(evaluate_folders(shifted, mask_path).records)
    # Every surface voxel is 0 or 3 mm (one voxel) from the other surface, and more than 5% are 3 mm away.
    assert record["hd95_mm"] == 3.0
    assert 0.5 < record["dice"] < 1.0 and record["volume_diff_ml"] == 0.0 and record["case"] == "pancreas"
