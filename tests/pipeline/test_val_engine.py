"""Validation inside training on an engine (pipeline/val_engine.py, train.val_backend): the engine runs the current
weights at every validation (exported once, refreshed after), gives PyTorch's probabilities and the same training
history, falls back to PyTorch in one line where it cannot, and `auto` keeps it only where it pays back."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from attention3d import create_model
from pipeline.bundle import load_checkpoint
from pipeline.config import InferenceConfig
from pipeline.engines import OnnxNetwork, OpenVinoNetwork
from pipeline.predict import Predictor
from pipeline.train import train
from pipeline.val_engine import ValidationEngine
from tests.pipeline._training import phantom_data, tiny_cfg
from tests.pipeline.test_grid import PRE

PATCH = (32, 32, 16)


def _predictor(precision: str = "fp32") -> Predictor:
    torch.manual_seed(0)
    model = create_model("attention_unet", in_channels=1, out_channels=3, channels=[4, 8, 16], strides=[2, 2])
    model.train()
    with torch.no_grad():  # batch norms with running statistics of their own, as after some training
        model(torch.randn(2, 1, *PATCH))
    model.eval()
    return Predictor(model, PRE, patch_size=PATCH, inference=InferenceConfig(sw_batch_size=2), precision=precision)


def _probabilities(predictor: Predictor, image: torch.Tensor) -> torch.Tensor:
    return torch.softmax(predictor.predict_preprocessed(image), dim=1)


def _train_step(predictor: Predictor) -> None:
    """One optimiser step and new batch-norm statistics: the weights a next validation must see."""
    model = predictor.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = model(torch.randn(2, 1, *PATCH)).square().mean()
    loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_every_validation_runs_the_current_weights_with_pytorchs_probabilities(backend):
    predictor = _predictor()
    image = torch.randn(1, 1, 48, 40, 24, generator=torch.Generator().manual_seed(1))
    said: list[str] = []
    engine = ValidationEngine(backend, device=torch.device("cpu"), notes=said.append)
    try:
        results = []
        for _ in range(2):
            with engine.use(predictor) as validating:
                assert isinstance(validating.engine, OpenVinoNetwork if backend == "openvino" else OnnxNetwork)
                ours = _probabilities(validating, image)
            assert predictor.engine is None  # training's predictor is PyTorch's again
            theirs = _probabilities(predictor, image)
            assert (ours - theirs).abs().max() <= 1e-3
            results.append(ours)
            _train_step(predictor)
        assert (results[0] - results[1]).abs().max() > 1e-2  # the second validation saw the new weights
        exports = [p for p in engine.folder.glob("*/model.onnx")]
        assert len(exports) == 1  # exported once; the second validation replaced the weights in that graph
        assert len(said) == 1 and said[0].startswith(f"validation: {backend} runs the windows (exported")
    finally:
        engine.close()
    assert engine.folder is None


def test_a_network_the_exporter_cannot_take_validates_in_pytorch_with_one_line():
    from tests.pipeline.test_engines import _Stateful

    model = _Stateful().eval()
    predictor = Predictor(model, PRE, patch_size=PATCH, inference=InferenceConfig(sw_batch_size=2), precision="fp32")
    said: list[str] = []
    engine = ValidationEngine("openvino", device=torch.device("cpu"), notes=said.append)
    image = torch.randn(1, 1, *PATCH)
    for _ in range(2):
        with engine.use(predictor) as validating:
            assert validating.engine is None
            validating.predict_preprocessed(image)
    assert len(said) == 1 and said[0].startswith("validation: openvino: ")
    assert said[0].endswith("this run's validations run in PyTorch")
    engine.close()


def test_auto_keeps_pytorch_where_an_engine_cannot_pay_back_its_refresh():
    """One batch of windows per validation saves less than any refresh costs: PyTorch stays, said with figures."""
    predictor = _predictor()
    said: list[str] = []
    engine = ValidationEngine("auto", device=torch.device("cpu"), notes=said.append)
    with engine.use(predictor) as validating:
        assert validating.engine is None  # the first validation is PyTorch's, and timed
        validating.predict_preprocessed(torch.randn(1, 1, *PATCH))
    assert len(said) == 1 and said[0].startswith("validation stays in PyTorch (1 batch at ")
    assert re.search(r"openvino \d+ ms per batch, refresh \d+\.\d s", said[0])
    assert engine.engine == "torch" and engine.folder is None
    with engine.use(predictor) as validating:
        assert validating.engine is None


def test_auto_says_its_figures_and_keeps_the_engine_they_favour():
    """A validation of many batches: whichever way the figures fall, the choice follows them and says them."""
    predictor = _predictor()
    said: list[str] = []
    engine = ValidationEngine("auto", device=torch.device("cpu"), notes=said.append)
    try:
        with engine.use(predictor) as validating:
            validating.predict_preprocessed(torch.randn(1, 1, 160, 160, 80))
        (line,) = said
        kept = re.match(r"validation: (\w+) runs the windows from now on \((\d+) batches, (\d+) -> (\d+) ms", line)
        if kept:
            assert engine.engine == kept[1] and int(kept[3]) > int(kept[4])
            with engine.use(predictor) as validating:
                assert validating.engine is not None
        else:
            assert line.startswith("validation stays in PyTorch") and engine.engine == "torch"
    finally:
        engine.close()


def test_on_a_gpu_validation_stays_in_pytorch_with_one_line():
    said: list[str] = []
    engine = ValidationEngine("openvino", device=torch.device("cuda"), notes=said.append)
    assert engine.engine == "torch" and said == [
        "train.val_backend openvino: the engines run on the CPU; validation runs in PyTorch on cuda"
    ]


@pytest.mark.slow
def test_training_with_an_openvino_validation_keeps_pytorchs_history(tmp_path, capsys):
    """The same seeded run validated by PyTorch and by OpenVINO: the same weights (validation draws nothing from
    training's random stream) and the same validation Dice, each epoch; the line says the engine ran."""
    data = phantom_data(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    histories = {}
    for backend in ("torch", "openvino"):
        cfg = tiny_cfg("train.val_every=1", f"train.val_backend={backend}", "train.precision=fp32")
        result = train(cfg, data, tmp_path / backend, tracking_uri=uri, progress=False)
        histories[backend] = load_checkpoint(Path(result.run_dir) / "checkpoints" / "last.pt")["history"]
    out = capsys.readouterr().out
    assert "validation: openvino runs the windows (exported" in out
    for torch_row, engine_row in zip(histories["torch"], histories["openvino"], strict=True):
        assert engine_row["train_loss"] == torch_row["train_loss"]
        assert np.isclose(engine_row["val_dice_mean"], torch_row["val_dice_mean"], atol=0.01)
        assert engine_row["val_time_s"] > 0
