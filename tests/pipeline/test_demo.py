"""`seg3d demo` as a user runs it: the console script, real files, a real sqlite MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from pipeline.bundle import load_bundle
from pipeline.datalists import load_dataset
from pipeline.devices import cpu_has_native_bf16
from pipeline.metrics import dice_per_class
from pipeline.predict import Predictor

SEG3D = str(Path(sys.executable).with_name("seg3d"))
TINY = [
    "model.channels=[4, 8, 16]",
    "model.strides=[2, 2]",
    "data.patch_size=[32, 32, 16]",
    "data.target_spacing=[2.0, 2.0, 4.0]",
    "train.epochs=1",
    "train.iterations_per_epoch=2",
    "train.folds=2",
]


def _run_demo(tmp_path: Path, *args: str, timeout: int) -> tuple[subprocess.CompletedProcess, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [SEG3D, "demo", "--output", str(tmp_path / "demo"), "--tracking-uri", uri, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, uri


def _test_dice(uri: str, experiment: str = "seg3d-demo") -> dict[str, float]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    return {k: v for k, v in run.data.metrics.items() if k.startswith("test_dice_")}


def test_demo_runs_end_to_end_and_logs_test_dice(tmp_path):
    proc, uri = _run_demo(tmp_path, "--cases", "3", "--test-cases", "1", *TINY, timeout=600)
    out = proc.stdout
    assert "held-out test Dice (1 cases" in out and "pancreas_004" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert (tmp_path / "demo" / "overlays" / "pancreas_004.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "run" / "bundle" / "model.safetensors").exists()
    dice = _test_dice(uri)
    assert 0.0 <= dice["test_dice_pancreas"] <= 1.0
    assert set(dice) <= {"test_dice_pancreas", "test_dice_cancer"}


@pytest.mark.slow
@pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="the default demo trains 1000 iterations in fp32 on a CPU without AMX or AVX512-BF16: over 25 min on 2 "
    "AVX2 cores, past the whole suite's budget (`make demo` runs it; the short demo test above runs the same path)",
)
def test_the_default_demo_reaches_the_target_dice(tmp_path):
    """The README's `make demo` job, unchanged: a pancreas Dice of at least 0.7 on the held-out phantoms."""
    # 1000 training iterations: ~5 min where bf16 is native (AMX); the limit only stops a demo that hangs.
    proc, uri = _run_demo(tmp_path, timeout=1500)
    dice = _test_dice(uri)
    assert dice["test_dice_pancreas"] >= 0.7, proc.stdout[-2000:]

    # The same bundle in bf16 and in fp32 on the held-out phantoms: bf16 Dice within 0.005 of fp32.
    bundle = load_bundle(tmp_path / "demo" / "run" / "bundle")
    data = load_dataset(tmp_path / "demo" / "data")
    means = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor.from_bundle(bundle, precision=precision)
        per_case = []
        for case in data.test:
            pred = predictor.predict_file(case.image, case.case).labels
            per_case.append(dice_per_class(pred, np.asarray(nib.load(case.label).dataobj), 3)[0])
        means[precision] = float(np.mean(per_case))
    assert abs(means["bf16"] - means["fp32"]) <= 0.005, means
