"""Hostile names and references (issue 12, classes 1, 2, 7, 9 and 14): case ids and class names from datalists and
file names, model URIs that climb out of their run, inputs that collide, and small arguments that used to be
tracebacks. Each is refused in one line with exit code 2 before anything is written, and nothing outside (or inside)
the output folder changes; every test runs the real command line on real files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.datalists import load_dataset
from pipeline.errors import Seg3dError
from pipeline.infer import check_model_uri
from pipeline.names import check_case_id
from tests.pipeline._hostile import refused, small_ct, tree

HOSTILE_IDS = {
    "parent": "../../escaped",
    "absolute": "/tmp/seg3d-hostile-absolute",
    "nested": "a/b",
    "long": "c" * 300,
    "newline": "a\nb",
    "hidden": ".hidden",
    "dash": "-rf",
    "formula": "=HYPERLINK(1)",
    "empty-after-strip": " ",
}


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    return small_ct(tmp_path_factory.mktemp("ct") / "ct.nii.gz")


def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("name", list(HOSTILE_IDS))
def test_a_hostile_case_id_in_a_datalist_is_refused_and_nothing_is_written(name, ct_file, bundle_dir, tmp_path, capfd):
    work = tmp_path / "work"
    work.mkdir()
    datalist = _csv(work / "list.csv", [{"case": HOSTILE_IDS[name], "image": str(ct_file)}])
    before = tree(tmp_path)
    line = refused(
        ["infer", "--model", str(bundle_dir), "--input", str(datalist), "--output", str(work / "out")], capfd
    )
    assert "line 2" in line and ("not a safe name" in line or "must not be empty" in line), line
    assert len(line) < 600, "the message shows a shortened id, not the whole input"
    assert tree(tmp_path) == before, "nothing written, nothing changed"
    assert not Path("/tmp/seg3d-hostile-absolute.nii.gz").exists()


def test_training_on_a_dataset_with_a_hostile_case_id_leaves_no_run_folder(ct_file, tmp_path, capfd):
    label = tmp_path / "label.nii.gz"
    shutil.copy(ct_file, label)  # the file's content does not matter: the id is refused first
    data = _csv(tmp_path / "data.csv", [{"case": "../../run", "image": str(ct_file), "label": str(label)}])
    run = tmp_path / "run"
    argv = ["train", "--config", "configs/unet.yaml", "--data", str(data), "--output", str(run)]
    line = refused([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], capfd)
    assert "'../../run'" in line and "not a safe name" in line
    assert not run.exists() and not (tmp_path / "m.db").exists()


def test_a_file_name_with_a_newline_is_refused_by_infer_and_evaluate(ct_file, bundle_dir, tmp_path, capfd):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(ct_file, folder / "a\nb.nii.gz")
    out = tmp_path / "out"
    line = refused(["infer", "--model", str(bundle_dir), "--input", str(folder), "--output", str(out)], capfd)
    assert "'a\\nb'" in line and not out.exists()
    line = refused(["evaluate", "--pred", str(folder), "--ref", str(folder), "--output", str(out)], capfd)
    assert "'a\\nb'" in line and not out.exists()


def test_an_input_named_only_0000_would_write_a_hidden_file_and_is_refused(ct_file, bundle_dir, tmp_path, capfd):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(ct_file, folder / "_0000.nii.gz")
    line = refused(
        ["infer", "--model", str(bundle_dir), "--input", str(folder), "--output", str(tmp_path / "o")], capfd
    )
    assert "empty case id" in line and not (tmp_path / "o").exists()


def test_inputs_that_share_a_case_id_are_refused_by_name(ct_file, bundle_dir, tmp_path, capfd):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.nii.gz", "a_0000.nii.gz", "b.nii.gz"):
        shutil.copy(ct_file, folder / name)
    (folder / "a.nii").write_bytes(b"")  # the clash is found from the names, before any file is read
    out = tmp_path / "out"
    line = refused(["infer", "--model", str(bundle_dir), "--input", str(folder), "--output", str(out)], capfd)
    assert "3 files in" in line and "'a.nii'" in line and "'a.nii.gz'" in line and "'a_0000.nii.gz'" in line
    assert not out.exists()


def test_a_symlink_in_the_output_folder_cannot_lead_writes_outside(ct_file, bundle_dir, tmp_path, capfd):
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "overlays").symlink_to(outside, target_is_directory=True)
    argv = ["infer", "--model", str(bundle_dir), "--input", str(ct_file), "--output", str(out), "--overlays"]
    line = refused(argv, capfd)
    assert "resolves outside --output" in line
    assert list(outside.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["overlays"]


@pytest.mark.parametrize(
    "uri",
    [
        "runs:/0123456789abcdef0123456789abcdef/bundle/../../..",
        "runs:/0123456789abcdef0123456789abcdef//etc/passwd",
        "runs:/0123456789abcdef0123456789abcdef/",
        "runs:/../bundle",
        "models:/seg3d/../../x",
        "models:/seg3d",
    ],
)
def test_a_model_uri_that_leaves_its_run_is_refused_before_any_download(uri, ct_file, tmp_path, capfd):
    argv = ["infer", "--model", uri, "--input", str(ct_file), "--output", str(tmp_path / "out")]
    line = refused([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], capfd)
    assert "model URI" in line and not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()
    with pytest.raises(Seg3dError):
        check_model_uri(uri)


def test_valid_model_uris_pass():
    for uri in ("runs:/0123456789abcdef0123456789abcdef/bundle", "models:/seg3d-unet/12", "models:/seg3d@champion"):
        assert check_model_uri(uri) == uri


@pytest.mark.parametrize("case", ["pancreas_001", "Case 12", "ünïcode_01", "a.b-c+d", "_x"])
def test_ordinary_case_ids_are_accepted(case):
    assert check_case_id(case, "test") == case


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"labels": {"0": "background", "1": "pancreas"}, "training": 5}, '"training" must be a list'),
        (
            {"labels": {"0": "background", "1": "pancreas"}, "training": [{"image": 5, "label": "x"}]},
            "training entry 0",
        ),
        ({"labels": {"0": "background", "1": "pancreas"}, "training": [], "test": [7]}, "test entry 0"),
        ({"labels": ["background"], "training": []}, 'no "labels" mapping'),
        ({"labels": {"0": "background", "1": 5}, "training": []}, '"labels" must map values to names'),
        ({"labels": {"0": "background", "1": "../x"}, "training": []}, "class name '../x'"),
        ({"labels": {"0": "background", "999": "pancreas"}, "training": []}, "0..255"),
    ],
)
def test_type_errors_in_dataset_json_are_one_line(doc, words, tmp_path, capfd):
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    line = refused(["check-data", str(tmp_path)], capfd)
    assert words in line, line


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--cases", "2", "--test-cases", "-3"], "--test-cases must be 0..10000, got -3"),
        (["--cases", "2", "--seed", "-1"], "--seed must be a whole number from 0"),
        (["--cases", "0"], "--cases must be 1..10000, got 0"),
    ],
)
def test_synth_refuses_impossible_counts_and_seeds_and_writes_nothing(argv, words, tmp_path, capfd):
    line = refused(["synth", "--out", str(tmp_path / "d"), *argv], capfd)
    assert words in line and not (tmp_path / "d").exists()


@pytest.mark.parametrize("uri", ["mlruns", "file:///tmp/mlruns", "ftp://host/x", "sqlite://relative.db", "http//x"])
def test_doctor_and_train_refuse_the_same_tracking_uris(uri, tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    assert main(["doctor", "--tracking-uri", uri, "--output", str(tmp_path)]) == 1
    out = capfd.readouterr().out
    assert "FAIL  tracking" in out and "is not one seg3d can use" in out, out
    argv = ["train", "--config", "configs/unet.yaml", "--data", str(data), "--output", str(tmp_path / "run")]
    line = refused([*argv, "--tracking-uri", uri], capfd)
    assert "is not one seg3d can use" in line or "is not a dataset" in line, line
    assert not (tmp_path / "run").exists()


def test_overlays_of_a_one_slice_image_are_written(bundle_dir, tmp_path):
    image = small_ct(tmp_path / "slice.nii.gz", shape=(64, 64, 1), spacing=(2.0, 2.0, 4.0))
    out = tmp_path / "out"
    assert main(["infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out), "--overlays"]) == 0
    assert (out / "overlays" / "slice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_datalist_case_id_check_covers_every_loader(tmp_path):
    """The MSD, folder and CSV loaders all build cases through one check: a hostile id fails in each."""
    ct = small_ct(tmp_path / "src.nii.gz")
    folder = tmp_path / "folders"
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
        shutil.copy(ct, folder / sub / "bad name!.nii.gz")
    with pytest.raises(Seg3dError, match="not a safe name"):
        load_dataset(folder)
    msd = tmp_path / "msd"
    msd.mkdir()
    doc = {"labels": {"0": "background", "1": "pancreas"}, "training": [{"image": "x/../a;b.nii.gz", "label": "l"}]}
    (msd / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(Seg3dError, match="not a safe name"):
        load_dataset(msd)
    assert np.all([check_case_id(c, "t") == c for c in ("a", "b")])
