"""A command imports what it uses: `seg3d --help`, `seg3d infer` on NIfTI and `seg3d evaluate` run without MLflow and
SimpleITK in the process (each command in a fresh process, as a user starts it); a DICOM input and a `runs:/` model
do bring in what they need, which shows that the probe sees imports at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.synthetic import CaseSpec, make_phantom, to_nifti

HEAVY = ("mlflow", "SimpleITK", "matplotlib", "pandas", "sklearn", "scipy.signal", "scipy.stats", "torch", "monai")
PROBE = f"""
import json, sys
from pipeline.cli import main
code = main(sys.argv[1:])
print("IMPORTED " + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
sys.exit(code)
"""


def _imports(argv: list[str], cwd: Path) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORTED "))
    return set(json.loads(line.removeprefix("IMPORTED ")))


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    spec = CaseSpec(shape=(64, 64, 24), spacing=(2.0, 2.0, 4.0), orientation="LPS", tumour=False, decoys=2)
    image, label, affine = make_phantom(np.random.default_rng(3), spec)
    folder = tmp_path_factory.mktemp("startup")
    nib.save(to_nifti(image, affine, "LPS"), folder / "case.nii.gz")
    nib.save(to_nifti(label, affine, "LPS"), folder / "ref.nii.gz")
    return folder / "case.nii.gz"


def test_help_imports_no_heavy_library(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.replace("code = main(sys.argv[1:])", "code = 0"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    import_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORTED "))
    assert json.loads(import_line.removeprefix("IMPORTED ")) == []
    help_run = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "infer" in help_run.stdout


def test_infer_and_evaluate_on_nifti_import_neither_mlflow_nor_simpleitk(ct_file, bundle_dir, tmp_path):
    out = tmp_path / "pred.nii.gz"
    infer = _imports(["infer", "--model", str(bundle_dir), "--input", str(ct_file), "--output", str(out)], tmp_path)
    assert {"torch", "monai"} <= infer, "the probe sees what the command imported"
    assert not infer & {"mlflow", "SimpleITK", "matplotlib", "pandas", "sklearn", "scipy.signal", "scipy.stats"}, infer
    assert out.is_file()

    evaluate = _imports(
        [
            "evaluate",
            "--pred",
            str(out),
            "--ref",
            str(ct_file.with_name("ref.nii.gz")),
            "--output",
            str(tmp_path / "e"),
        ],
        tmp_path,
    )
    assert not evaluate & {"mlflow", "SimpleITK"}, evaluate
    assert (tmp_path / "e" / "metrics.json").is_file()


def test_a_dicom_series_brings_in_simpleitk_and_overlays_matplotlib(real_ct, bundle_dir, tmp_path):
    series, out = real_ct / "dicom_series", tmp_path / "o"
    imported = _imports(
        ["infer", "--model", str(bundle_dir), "--input", str(series), "--output", str(out), "--overlays"], tmp_path
    )
    assert {"SimpleITK", "matplotlib"} <= imported, imported
    assert "mlflow" not in imported
