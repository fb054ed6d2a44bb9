"""`--precision int8` (pipeline/quantize.py): the network quantized on the run's first cases and used only where its
masks agree with fp32 PyTorch within Dice 0.005 there; the check's outcome cached with the quantized network; a
failed check refused in one line before any output is written, at once on the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import quantize
from pipeline.bundle import load_bundle
from pipeline.errors import Seg3dError
from pipeline.predict import Predictor

SEG3D = str(Path(sys.executable).with_name("seg3d"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SEG3D_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "engines"


def test_mask_agreement_is_the_dice_of_the_argmax_masks_per_present_class():
    reference = torch.zeros(1, 3, 4, 4, 4)
    reference[0, 1, :2] = 5  # pancreas: 32 voxels; no cancer anywhere
    candidate = reference.clone()
    candidate[0, 1, 1] = 0  # 16 of them lost
    assert quantize.mask_agreement(reference, candidate, ["background", "pancreas", "cancer"]) == {
        "pancreas": round(2 * 16 / (32 + 16), 5)
    }


def test_calibration_windows_cover_the_image_and_pad_a_small_one():
    image = torch.arange(40 * 30 * 20, dtype=torch.float32).reshape(1, 1, 40, 30, 20)
    windows = quantize.calibration_windows([image], (16, 16, 8), 8)
    assert len(windows) == 8 and all(w.shape == (1, 1, 16, 16, 8) and w.dtype == np.float32 for w in windows)
    assert windows[0][0, 0, 0, 0, 0] == 0 and windows[-1][0, 0, -1, -1, -1] == image[0, 0, -1, -1, -1]
    small = quantize.calibration_windows([torch.ones(1, 1, 10, 10, 4)], (16, 16, 8), 2)
    assert small[0].shape == (1, 1, 16, 16, 8) and small[0].sum() == 10 * 10 * 4


def test_int8_needs_an_engine_not_pytorch(bundle_dir):
    with pytest.raises(Seg3dError, match="--precision int8 runs on an engine's int8 kernels; add --backend"):
        Predictor.from_bundle(load_bundle(bundle_dir), precision="int8", backend="torch")


def test_a_failed_check_is_refused_in_one_line_with_no_output_and_at_once_on_the_next_run(bundle_dir, real_ct, cache):
    """The untrained bundle's near-tied logits flip under int8 (pancreas Dice about 0.86 against fp32)."""
    out = cache.parent.parent / "out.nii.gz"
    command = [SEG3D, "infer", "--model", str(bundle_dir), "--input", str(real_ct / "ct_small.nii.gz")]
    command += ["--output", str(out), "--precision", "int8", "--backend", "auto"]
    env = {**os.environ, "SEG3D_CACHE": str(cache.parent)}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 2, first.stderr[-2000:]
    (line,) = first.stderr.strip().splitlines()
    assert line.startswith("seg3d infer: error: --precision int8: the int8 network's") and "below 0.995" in line
    assert not out.exists() and not list(out.parent.glob(".*out*"))
    (record,) = cache.glob("*-int8-auto.json")
    check = json.loads(record.read_text())
    assert check["passed"] is False and min(check["dice"].values()) < 0.995 and check["cases"] == 1
    assert (cache / record.name.split("-")[0] / "model-int8.onnx").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 2 and f"(cached in {record}; delete it to check again)" in second.stderr
    assert not out.exists()


def test_a_passed_check_runs_int8_convolutions_and_the_next_predictor_reads_it_from_the_cache(
    bundle_dir, real_ct, cache, monkeypatch
):
    """The bar lowered for this untrained network (a trained one is checked at 0.995): what is tested is that the
    engine then runs int8 kernels, the masks are int8's, and the check and the network are reused, not redone."""
    monkeypatch.setattr(quantize, "MAX_DICE_LOSS", 0.3)
    ct = real_ct / "ct_small.nii.gz"
    said: list[str] = []
    predictor = Predictor.from_bundle(load_bundle(bundle_dir), precision="int8", backend="openvino")
    check = predictor.prepare_int8([("ct_small", ct)], notes=said.append)
    assert check["passed"] and check["engine"] == "openvino" and predictor.engine_name == "openvino"
    assert said[-1].startswith("int8: openvino runs the quantized network") and "(cached)" not in said[-1]
    runtime = predictor.engine.compiled.get_runtime_model()
    convs = [op for op in runtime.get_ordered_ops() if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    assert convs and {op.get_rt_info()["runtimePrecision"].astype(str) for op in convs} <= {"i8", "u8"}

    int8 = predictor.predict_file(ct).labels
    fp32 = Predictor.from_bundle(load_bundle(bundle_dir), precision="fp32").predict_file(ct).labels
    agreement = 2 * ((int8 == 1) & (fp32 == 1)).sum() / ((int8 == 1).sum() + (fp32 == 1).sum())
    assert 0.7 <= agreement < 1.0, "int8's own mask, near fp32's but not fp32's"

    int8_file = next(cache.glob("*/model-int8.onnx"))
    written = int8_file.stat().st_mtime_ns
    again = Predictor.from_bundle(load_bundle(bundle_dir), precision="int8", backend="openvino")
    said.clear()
    assert again.prepare_int8([("never-read", Path("/nonexistent.nii.gz"))], notes=said.append) == check
    assert said[-1].endswith("(cached)") and int8_file.stat().st_mtime_ns == written
    np.testing.assert_array_equal(again.predict_file(ct).labels, int8)


def test_predicting_before_calibration_is_a_programming_error(bundle_dir, cache):
    predictor = Predictor.from_bundle(load_bundle(bundle_dir), precision="int8", backend="onnxruntime")
    with pytest.raises(RuntimeError, match="prepare_int8"):
        predictor.predict_preprocessed(torch.zeros(1, 1, 32, 32, 16))
