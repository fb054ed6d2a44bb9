"""A rank's set-up refuses a bad model option before the run folder is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import Seg3dError
from pipeline.train import train
from tests.pipeline._training import phantom_data, tiny_cfg


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_data(tmp_path_factory.mktemp("train_data"))


def test_a_bad_model_option_is_refused_before_the_run_folder_is_written(phantom, tmp_path):
    with pytest.raises(Seg3dError, match="skip must be one of"):
        train(tiny_cfg("model.skip=gates"), phantom, tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "run").exists()
