"""The bad-input suite: every input a user can get wrong, made for real on disk, through the real CLI entry
(`pipeline.cli.main`), as `seg3d check-data`, `infer`, `evaluate` and `train` meet it. Each must answer with one
line that names the case and the problem and exit with code 2: no traceback, and no output file for that case.
Two real-scan oddities (oblique directions, qform and sform disagreeing) are processed with one warning that says
which geometry was used. docs/reliability.md is the table of these rows with the lines seg3d prints.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.bundle import METADATA
from pipeline.cli import main
from tests.conftest import REAL_CT

SHAPE = (40, 36, 12)
AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, -8.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])


def ct() -> np.ndarray:
    """A small CT in HU: air around a soft-tissue body."""
    rng = np.random.default_rng(0)
    image = np.full(SHAPE, -1000, dtype=np.int16)
    image[5:-5, 5:-5, :] = 40 + rng.integers(-20, 20, (SHAPE[0] - 10, SHAPE[1] - 10, SHAPE[2]), dtype=np.int16)
    return image


def organ() -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[12:20, 10:18, 3:8] = 1
    label[14:16, 12:14, 4:6] = 2
    return label


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def dataset(root: Path, image=None, label=None, image_affine=AFFINE, label_affine=AFFINE) -> Path:
    """root/images/bad.nii.gz and root/labels/bad.nii.gz: a one-case dataset in the folder layout."""
    save(root / "images" / "bad.nii.gz", ct() if image is None else image, image_affine)
    save(root / "labels" / "bad.nii.gz", organ() if label is None else label, label_affine)
    return root / "images" / "bad.nii.gz"


def rotated(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    affine = AFFINE.copy()
    affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) @ AFFINE[:3, :3]
    return affine


# -- the bad inputs: each builder writes root/images/bad* and root/labels/bad.nii.gz, returns the image path -----


def truncated(root: Path) -> Path:
    image = dataset(root)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return image


def not_nifti(root: Path) -> Path:
    image = dataset(root)
    image.write_text("case_id,age\n17,54\n")  # a CSV saved under the image's name
    return image


def nan_inf(root: Path) -> Path:
    image = ct().astype(np.float32)
    image[5, 5, 5], image[6, 6, 6] = np.nan, np.inf
    return dataset(root, image=image)


def sheared(root: Path) -> Path:
    affine = AFFINE.copy()
    affine[0, 2] = 0.6  # the z axis leans into x: voxel axes not perpendicular
    return dataset(root, image_affine=affine)


def qform_sform(root: Path) -> Path:
    image = dataset(root)
    img = nib.Nifti1Image(ct(), None)
    img.set_sform(AFFINE, code=1)
    qform = AFFINE.copy()
    qform[0, 3] += 5.0
    img.set_qform(qform, code=1)
    nib.save(img, image)
    return image


def label_moved(root: Path) -> Path:
    affine = AFFINE.copy()
    affine[2, 3] += 5.0  # the label's origin 5 mm above the image's: same shape, another place
    return dataset(root, label_affine=affine)


def dicom(root: Path, edit: Callable[[Path], None]) -> Path:
    """Six slices of the real series as the case's image folder, then `edit` on the folder."""
    if not REAL_CT.is_dir():
        pytest.skip(f"real CT data not found at {REAL_CT}")
    folder = root / "images" / "bad"
    folder.mkdir(parents=True)
    for path in sorted((REAL_CT / "dicom_series").glob("*.dcm"))[:6]:
        shutil.copy(path, folder / path.name)
    save(root / "labels" / "bad.nii.gz", organ())  # unread: the image fails first
    edit(folder)
    return folder


def two_series(folder: Path) -> None:
    import pydicom

    other = pydicom.uid.generate_uid()
    for path in sorted(folder.iterdir())[3:]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = other
        ds.save_as(path)


def empty_case_folder(root: Path) -> Path:
    folder = root / "images" / "bad"
    folder.mkdir(parents=True)
    save(root / "labels" / "bad.nii.gz", organ())
    return folder


@dataclass(frozen=True)
class Row:
    make: Callable[[Path], Path]
    commands: tuple[str, ...]
    expect: tuple[str, ...]  # substrings of the one line, after "<case>: "


ROWS = {
    "truncated .nii.gz": Row(truncated, ("check-data", "infer"), ("cannot read image", "truncated or not NIfTI")),
    "not NIfTI": Row(not_nifti, ("check-data", "infer"), ("cannot read image", "not a gzip file")),
    "2D image": Row(lambda r: dataset(r, image=ct()[:, :, 0]), ("check-data", "infer"), ("is 2D, shape (40, 36)",)),
    "4D, 3 volumes": Row(
        lambda r: dataset(r, image=np.stack([ct()] * 3, -1)), ("check-data", "infer"), ("is 4D", "(40, 36, 12, 3)")
    ),
    "NaN/Inf voxels": Row(nan_inf, ("check-data", "infer"), ("NaN", "Inf")),
    "constant image": Row(
        lambda r: dataset(r, image=np.full(SHAPE, -1000, np.int16)),
        ("check-data", "infer"),
        ("holds one value, -1000, in every voxel",),
    ),
    "no body (air and noise only)": Row(
        lambda r: dataset(r, image=np.where(ct() > 0, -950, -1000).astype(np.int16)),
        ("infer",),
        ("no voxel above -500 HU", "is this a CT in HU?"),
    ),
    "undeclared label values": Row(
        lambda r: dataset(r, label=organ() * 3),
        ("check-data", "evaluate", "train"),
        ("label values 3, 6",),
    ),
    "label shape": Row(
        lambda r: dataset(r, label=organ()[:, :, :10]),
        ("check-data", "evaluate"),
        ("differ", "shape (40, 36, 10)"),
    ),
    "label affine": Row(
        label_moved,
        ("check-data", "evaluate"),
        ("differ", "origin (-10"),
    ),
    "sheared directions": Row(sheared, ("check-data", "infer"), ("sheared affine", "resample it onto an orthogonal")),
    "DICOM, two series": Row(
        lambda r: dicom(r, two_series), ("check-data", "infer"), ("2 DICOM series", "exactly one series")
    ),
    "DICOM, missing slice": Row(
        lambda r: dicom(r, lambda f: (f / "slice_003.dcm").unlink()),
        ("check-data", "infer"),
        ("uneven slice gaps, 2 to 4 mm", "missing slice"),
    ),
    "empty case folder": Row(empty_case_folder, ("check-data",), ("no DICOM series in",)),
}


def _run(argv: list[str], capfd) -> tuple[int, list[str], list[str]]:
    """Exit code, stdout and stderr lines; captured at the file descriptors, so that what a library writes straight
    to the process's stderr (ITK's warnings) counts too."""
    code = main(argv)
    captured = capfd.readouterr()
    out, err = captured.out.strip().splitlines(), captured.err.strip().splitlines()
    assert "Traceback" not in captured.out + captured.err
    return code, out, err


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text("model:\n  name: attention_unet\ntrain:\n  epochs: 1\n")
    return path


CASES = [(name, command) for name, row in ROWS.items() for command in row.commands]


@pytest.mark.parametrize("name, command", CASES, ids=[f"{c}-{n.replace(' ', '_')}" for n, c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_output(name, command, tmp_path, bundle_dir, tiny_config, capfd):
    row = ROWS[name]
    data = tmp_path / "data"
    image = row.make(data)
    out = tmp_path / "out"
    if command == "check-data":
        code, lines, err = _run(["check-data", str(data)], capfd)
        assert code == 2 and err == [], err
        errors = [line for line in lines if line.startswith("ERROR")]
        assert len(errors) == 1 and errors[0].startswith("ERROR  bad: "), lines
        line = errors[0]
    elif command == "infer":
        code, _, err = _run(["infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out)], capfd)
        assert code == 2 and len(err) == 1, err
        line = err[0]
        assert line.startswith("seg3d infer: error: bad: "), line
        assert _files(out) == [], "a refused case left an output"
    elif command == "evaluate":
        ref = save(tmp_path / "ref" / "bad.nii.gz", organ())
        pred = data / "labels" / "bad.nii.gz"
        code, _, err = _run(["evaluate", "--pred", str(pred), "--ref", str(ref), "--output", str(out)], capfd)
        assert code == 2 and len(err) == 1, err
        line = err[0]
        assert line.startswith("seg3d evaluate: error: bad: "), line
        assert _files(out) == []
    else:
        run = tmp_path / "run"
        argv = ["train", "--config", str(tiny_config), "--data", str(data), "--output", str(run)]
        code, _, err = _run([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], capfd)
        assert code == 2 and len(err) == 1, err
        line = err[0]
        assert line.startswith("seg3d train: error: dataset ") and "first: bad: " in line, line
        assert not run.exists(), "a refused training left a run folder"
    for words in row.expect:
        assert words in line, line


def _one_line(argv: list[str], capfd, prefix: str) -> str:
    code, _, err = _run(argv, capfd)
    assert code == 2 and len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def test_empty_input_folder_and_empty_dataset_folder(tmp_path, bundle_dir, capfd):
    (tmp_path / "empty").mkdir()
    line = _one_line(
        ["infer", "--model", str(bundle_dir), "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")],
        capfd,
        "seg3d infer: error: input folder ",
    )
    assert "is empty or holds only folders" in line and _files(tmp_path / "out") == []
    line = _one_line(["check-data", str(tmp_path / "empty")], capfd, "seg3d check-data: error: ")
    assert "is not a dataset; DATASET may be an MSD dataset.json" in line


@pytest.mark.parametrize(
    "yaml_text, data, expect",
    [
        ("train:\n  epoch: 3\n", "data", "unknown key 'train.epoch'; valid keys here: epochs,"),
        ("train:\n  epochs: many\n", "data", "'train.epochs': Input should be a valid integer"),
        ("model:\n  name: attention_unet\n", "nope", "dataset not found: "),
    ],
    ids=["unknown-key", "wrong-type", "missing-dataset"],
)
def test_bad_config_is_one_line_before_any_run_folder(tmp_path, capfd, yaml_text, data, expect):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    dataset(tmp_path / "data")
    run = tmp_path / "run"
    argv = ["train", "--config", str(config), "--data", str(tmp_path / data), "--output", str(run)]
    line = _one_line([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], capfd, "seg3d train: error: ")
    assert expect in line, line
    assert not run.exists()


def test_bundle_of_another_format_is_one_line_and_no_output(tmp_path, bundle_dir, capfd):
    bundle = shutil.copytree(bundle_dir, tmp_path / "bundle")
    meta = json.loads((bundle / METADATA).read_text())
    meta["bundle_format"], meta["versions"]["seg3d"] = 2, "9.0.0"
    (bundle / METADATA).write_text(json.dumps(meta))
    image = dataset(tmp_path / "data")
    out = tmp_path / "out"
    line = _one_line(
        ["infer", "--model", str(bundle), "--input", str(image), "--output", str(out)], capfd, "seg3d infer: error: "
    )
    assert "has format 2, this seg3d reads format 1 (made by seg3d 9.0.0); use a matching seg3d version" in line
    assert _files(out) == []


@pytest.mark.parametrize(
    "make, expect, level, used",
    [
        (
            lambda r: dataset(r, image_affine=rotated(10), label_affine=rotated(10)),
            ("oblique directions (gantry tilt?), up to 10.0 degrees", "used as stored"),
            "INFO",
            rotated(10),
        ),
        (qform_sform, ("qform (RAS) and sform (RAS) disagree, by up to 5", "the sform was used"), "WARN", AFFINE),
    ],
    ids=["oblique", "qform-sform"],
)
def test_real_scan_geometry_is_processed_with_a_warning_naming_the_geometry_used(
    tmp_path, bundle_dir, capfd, make, expect, level, used
):
    image = make(tmp_path / "data")
    out = tmp_path / "pred.nii.gz"
    code, _, err = _run(["infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out)], capfd)
    assert code == 0 and len(err) == 1 and err[0].startswith("seg3d infer: warning: bad: image bad.nii.gz: "), err
    assert all(words in err[0] for words in expect), err[0]
    np.testing.assert_allclose(nib.load(out).affine, used, atol=1e-5)  # the output lies where the warning says

    code, lines, err = _run(["check-data", str(tmp_path / "data")], capfd)
    assert code == 0 and err == []
    image_notes = [line for line in lines if line.startswith(f"{level:<5}  bad: image bad.nii.gz: ")]
    assert len(image_notes) == 1 and all(words in image_notes[0] for words in expect), lines
