"""The run manifest (pipeline/manifest.py): per case, written last; every output with its true size and SHA-256,
the model's hash over its files, the input's geometry as read, versions, device, precision and timings; no patient
name or id in it nor in anything else seg3d writes or prints, whatever the options."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.cli import main
from pipeline.imageio import read_volume
from pipeline.infer import run_inference
from tests.pipeline._ct_series import NAME, PATIENT_ID, phantom_hu, write_ct_series, zip_folder

LEAKS = [NAME, PATIENT_ID, "DOE^JANE", "SECRET", "987654321", "19600101"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_manifest_lists_every_output_with_its_checksum_and_the_input_as_read(bundle_dir, tmp_path, capsys):
    series = tmp_path / "in" / "case 1"
    write_ct_series(series, phantom_hu((40, 36, 8)))
    out = tmp_path / "out"
    argv = ["infer", "--model", str(bundle_dir), "--input", str(series), "--output", str(out), "--statistics"]
    assert main([*argv, "--preview", "--dicom-seg", "--dicom-rtstruct", "--save-probabilities", "--overlays"]) == 0
    console = capsys.readouterr()
    manifest = json.loads((out / "case 1_manifest.json").read_text())

    listed = {o["file"]: o for o in manifest["outputs"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"case 1_manifest.json", "statistics.csv"}
    assert {"case 1_rtstruct.dcm", "case 1_seg.dcm", "case 1_preview.png", "overlays/case 1.png"} <= set(listed)
    for name, entry in listed.items():
        assert entry["sha256"] == _sha(out / name) and entry["bytes"] == (out / name).stat().st_size, name

    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file())
    expected = hashlib.sha256(
        b"".join(f"{p.relative_to(bundle_dir).as_posix()}\0{_sha(p)}\n".encode() for p in files)
    ).hexdigest()
    assert manifest["model"] == {"name": "attention_unet", "folder": "bundle", "sha256": expected, "members": 0}
    volume = read_volume(series)
    geometry = manifest["input"]
    assert geometry["kind"] == "DICOM series" and geometry["slices"] == 8 and geometry["modality"] == "CT"
    assert geometry["shape"] == [40, 36, 8] and geometry["orientation"] == volume.axcodes
    np.testing.assert_allclose(geometry["affine_ras_mm"], volume.affine, atol=1e-5)
    np.testing.assert_allclose(geometry["spacing_mm"], [0.8, 0.8, 2.5], atol=1e-5)
    assert {"seg3d", "torch", "monai", "pydicom", "highdicom", "rt-utils"} <= set(manifest["versions"])
    assert manifest["device"] == "cpu" and manifest["precision"] in ("float32", "bfloat16")
    assert set(manifest["timings_s"]) == {"load", "preprocess", "network", "stitch", "invert", "write"}
    assert manifest["settings"] == {"tta": False, "postprocess": True, "overlap": 0.5, "engine": "torch"}

    text = json.dumps(manifest)
    assert str(tmp_path) not in text, "no input or output path: hospitals name folders after patients"
    # Only the DICOM SEG and RTSTRUCT carry the patient (DICOM asks them to reference the source's patient).
    for path in out.rglob("*"):
        if path.is_file() and path.suffix != ".dcm":
            data = path.read_bytes()
            assert not [v for v in LEAKS if v.encode() in data], path.name
    assert not [v for v in LEAKS if v in console.out + console.err]


def test_a_case_without_its_manifest_is_not_finished_and_runs_again(bundle_dir, tmp_path):
    series = tmp_path / "series"
    write_ct_series(series, phantom_hu())
    archive = zip_folder(series, tmp_path / "scan.zip")
    out = tmp_path / "out"
    first = run_inference(bundle_dir, archive, out, progress=False)
    assert first.done == ["scan"] and (out / "scan_manifest.json").is_file()
    assert run_inference(bundle_dir, archive, out, progress=False).skipped == ["scan"]
    (out / "scan_manifest.json").unlink()  # as if killed after the mask, before the manifest
    again = run_inference(bundle_dir, archive, out, progress=False)
    assert again.done == ["scan"] and (out / "scan_manifest.json").is_file()
    manifest = json.loads((out / "scan_manifest.json").read_text())
    assert manifest["case"] == "scan" and manifest["input"]["kind"] == "DICOM series"
