"""Privacy and safety: what seg3d writes (outputs, run folders, the MLflow store and its artifacts, the console)
names cases by their case id, never by the DICOM patient's name or id; and no code path unpickles a user's file.

The one file allowed to carry the patient's name and id is the DICOM SEG (`<case>_seg.dcm`): a DICOM
Segmentation must reference the same patient as its source series (highdicom copies the patient module).
"""

from __future__ import annotations

import gzip
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import ROOT
from tests.pipeline.conftest import TINY

NAME, PATIENT_ID = "DOE^JANE^SECRET", "PID-987654321"
# The name and id and the parts of them a log could carry, long enough not to turn up by chance in binary data;
# matched case-sensitively (MLflow's own schema has "secret" tables).
VARIANTS = [NAME, PATIENT_ID, "DOE^JANE", "JANE^SECRET", "SECRET", "987654321", "PID-9876", "Doe^Jane", "DOE JANE"]
CASE = "case_0001"


def _series(real_ct: Path, folder: Path) -> Path:
    """The real series as a PACS sends it: the patient's name and id set, the UIDs its anonymiser blanked put back."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for path in sorted((real_ct / "dicom_series").iterdir()):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = NAME, PATIENT_ID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(folder / path.name)
    return folder


def _contents(path: Path) -> list[bytes]:
    """The bytes of a file and, for compressed containers (.nii.gz, .npz), of what they hold."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        return [data, gzip.decompress(data)]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [data, *(z.read(n) for n in z.namelist())]
    return [data]


def _leaks(text_or_bytes: bytes | str) -> list[str]:
    blob = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    return [v for v in VARIANTS if v.encode() in blob or v.encode("utf-16-le") in blob]


def _scan(root: Path, skip: set[Path]) -> dict[str, list[str]]:
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p not in skip):
        hits = sorted({v for blob in _contents(path) for v in _leaks(blob)})
        if hits or any(v in path.name for v in VARIANTS):
            found[str(path.relative_to(root))] = hits or ["(in the file name)"]
    return found


@pytest.mark.slow
def test_inference_and_check_data_never_write_the_patients_name_or_id(real_ct, bundle_dir, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    series = _series(real_ct, inputs / "images" / CASE)
    (inputs / "labels").mkdir()
    shutil.copy(real_ct / "dicom_series_labels.nii.gz", inputs / "labels" / f"{CASE}.nii.gz")
    assert _leaks((series / "slice_001.dcm").read_bytes()), "the planted name is not where the grep looks"

    written = tmp_path / "written"
    out = written / "out"
    argv = ["infer", "--model", str(bundle_dir), "--input", str(series), "--output", str(out)]
    assert main([*argv, "--dicom-seg", "--save-probabilities", "--overlays"]) == 0
    assert main(["check-data", str(inputs), "--labels", "pancreas=7"]) == 0
    console = capsys.readouterr()

    seg = out / f"{CASE}_seg.dcm"
    assert NAME in _leaks(seg.read_bytes()), "the DICOM SEG references the patient (and shows the grep finds it)"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{CASE}.nii.gz", f"{CASE}_manifest.json", f"{CASE}_probabilities.npz", f"{CASE}_seg.dcm", "overlays"]
    ), "outputs are named by the case id"
    assert _scan(written, skip={seg}) == {}
    assert _leaks(console.out + console.err) == [] and CASE in console.out


@pytest.mark.slow
def test_training_run_and_mlflow_store_never_hold_the_patients_name_or_id(real_ct, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the working folder is scanned too
    data = tmp_path / "inputs"
    _series(real_ct, data / "images" / CASE)
    (data / "labels").mkdir()
    shutil.copy(real_ct / "dicom_series_labels.nii.gz", data / "labels" / f"{CASE}.nii.gz")
    shutil.copy(real_ct / "ct_small.nii.gz", data / "images" / "case_0002.nii.gz")
    shutil.copy(real_ct / "ct_small_labels.nii.gz", data / "labels" / "case_0002.nii.gz")

    written = tmp_path / "written"
    config = written / "tiny.yaml"
    config.parent.mkdir()
    config.write_text("model:\n  name: attention_unet\n")
    overrides = [
        *TINY,
        "data.target_spacing=[4.0, 4.0, 4.0]",
        "data.num_workers=0",
        "train.epochs=1",
        "train.iterations_per_epoch=2",
        "train.folds=2",
        "train.threads=2",
    ]
    uri = f"sqlite:///{written / 'mlflow.db'}"
    argv = ["train", "--config", str(config), "--data", str(data), "--output", str(written / "run")]
    assert main([*argv, "--labels", "pancreas=7", "--tracking-uri", uri, *overrides]) == 0
    console = capsys.readouterr()

    assert (written / "mlflow.db").is_file() and (written / "mlartifacts").is_dir()
    everything = b"".join(b for p in written.rglob("*") if p.is_file() for b in _contents(p))
    assert CASE.encode() in everything, "cases are named by their case id"
    assert _scan(written, skip=set()) == {}
    assert _scan(tmp_path, skip={p for p in data.rglob("*")}) == {}, "nothing written beside the run either"
    assert _leaks(console.out + console.err) == []


# Ways to unpickle a file: each one, anywhere in the packages, would run code from a user's or a download's file.
UNSAFE = {
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)"),
    "pickle.load / pickle.loads": re.compile(r"\b(c?pickle|dill|cloudpickle)\.loads?\("),
    "np.load with allow_pickle=True": re.compile(r"np\.load\([^)]*allow_pickle\s*=\s*True"),
    "joblib": re.compile(r"\bjoblib\b"),
    "torch.load with weights_only=False": re.compile(r"weights_only\s*=\s*False"),
}


def test_no_code_path_unpickles_a_users_file():
    sources = sorted(p for pkg in ("pipeline", "attention3d") for p in (ROOT / pkg).rglob("*.py"))
    assert len(sources) > 20
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {what}: {line.strip()}"
        for p in sources
        for i, line in enumerate(p.read_text().splitlines(), start=1)
        for what, pattern in UNSAFE.items()
        if pattern.search(line)
    ]
    assert offenders == []
    # The one torch.load there is must say weights_only=True (the pattern above would miss a changed call style).
    loads = [line for p in sources for line in p.read_text().splitlines() if "torch.load(" in line]
    assert loads and all("weights_only=True" in line for line in loads), loads
