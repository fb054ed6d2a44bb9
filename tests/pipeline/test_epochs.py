"""The epoch loop: early stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bundle import load_checkpoint
from pipeline.train import train
from tests.pipeline._training import phantom_data, tiny_cfg


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_data(tmp_path_factory.mktemp("train_data"))


def test_early_stop_ends_training_when_validation_stops_improving(phantom, tmp_path):
    """With a learning rate too small to change anything, the second validation cannot beat the first."""
    cfg = tiny_cfg("train.epochs=5", "train.iterations_per_epoch=1", "train.early_stop=1", "train.lr=1e-12")
    result = train(cfg, phantom, tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", progress=False)
    assert result.epochs == 2 and result.best_epoch == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["stopped_early"] is True
