"""What only a CUDA device shows: mixed-precision training steps, a checkpoint that moves between GPU and CPU, and
where the sliding window keeps its full-volume sums. All marked `gpu` (skipped where no CUDA device is present).

benchmarks/gpu/check.sh runs these on the GPU machine with only the carried wheels (benchmarks/gpu/wheels.txt): no
MLflow there, so training runs with `tracking_uri="none"` (pipeline/tracking/off.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bundle import load_bundle, load_checkpoint
from pipeline.predict import Predictor
from pipeline.train import train
from tests.pipeline._training import TINY, phantom_data, tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_data(tmp_path_factory.mktemp("gpu_data"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda(phantom, tmp_path, precision):
    cfg = tiny_cfg("train.epochs=1", "train.device=cuda", f"train.precision={precision}")
    result = train(cfg, phantom, tmp_path / "run", tracking_uri="none", progress=False)
    assert np.isfinite(result.history[0]["train_loss"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert bool(state["scaler"]) == (precision == "fp16"), "the grad scaler runs for fp16 only"
    weights = list(result.model.parameters())
    assert all(p.is_cuda and p.dtype == torch.float32 for p in weights), "autocast keeps float32 master weights"


# One `seg3d train` in a process of its own, killed (SIGKILL, pipeline/faults.py) right after its first checkpoint, as
# a power cut would: the next process resumes from that checkpoint.
TRAIN = """
    import sys
    from pipeline.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _train_killed_after_one_epoch(args: list[str], *, cuda: bool) -> None:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env |= {"SEG3D_FAULT": "epoch.checkpointed:1"} | ({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TRAIN), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -9, proc.stderr[-3000:]


def _saved_on(path: Path) -> str:
    """The device the checkpoint's weights were on when saved (torch.load without map_location restores it)."""
    state = torch.load(path, weights_only=True)
    return next(iter(state["model"].values())).device.type


@pytest.mark.gpu
def test_a_checkpoint_saved_on_the_gpu_resumes_on_the_cpu_and_back(phantom, tmp_path):
    """train.device=auto: epoch 1 on the GPU, epoch 2 on the CPU (CUDA hidden), epoch 3 on the GPU again, each
    resumed from the checkpoint the previous device wrote (model, optimizer moments, scheduler, RNG)."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    config = ["--config", str(ROOT / "configs" / "demo.yaml"), *TINY, "train.epochs=3", "train.precision=fp32"]
    common = ["train", "--data", str(phantom), "--output", str(run), "--tracking-uri", "none"]
    _train_killed_after_one_epoch([*common, *config, "train.device=auto"], cuda=True)
    assert load_checkpoint(last)["epoch"] == 1 and _saved_on(last) == "cuda"
    _train_killed_after_one_epoch([*common, "--resume"], cuda=False)
    assert load_checkpoint(last)["epoch"] == 2 and _saved_on(last) == "cpu"

    result = train(None, phantom, run, tracking_uri="none", resume=True, progress=False)
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert next(result.model.parameters()).is_cuda and _saved_on(last) == "cuda"
    assert load_bundle(result.bundle).config.train.epochs == 3


@pytest.mark.gpu
def test_the_window_sums_stay_on_the_gpu_when_they_fit_and_go_to_host_memory_when_not(bundle_dir, monkeypatch):
    predictor = Predictor.from_bundle(load_bundle(bundle_dir), device="cuda", precision="fp32", postprocess=False)
    image = torch.randn(1, 1, 70, 50, 30, generator=torch.Generator().manual_seed(0))
    on_gpu = predictor.predict_preprocessed(image)
    assert on_gpu.is_cuda

    # Sums of a CT that would fill more than half of the free memory: host memory, decided without allocating it.
    free, _ = torch.cuda.mem_get_info()
    side = int((free / 20) ** (1 / 3)) + 1  # 4 channels and the weight map in float32: more than all free memory
    assert predictor._accumulator_device((side, side, side), 4).type == "cpu"

    # The same windows summed in host memory give the same logits: a device whose free memory is nearly gone.
    total = torch.cuda.mem_get_info()[1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, total))
    on_host = predictor.predict_preprocessed(image)
    assert on_host.device.type == "cpu"
    torch.testing.assert_close(on_host, on_gpu.cpu(), rtol=1e-4, atol=1e-4)
