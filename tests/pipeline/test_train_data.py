"""The training dataset's caches: memory and disk give the same patches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.train import train
from tests.pipeline._training import bundle_weights, phantom_data, tiny_cfg


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_data(tmp_path_factory.mktemp("train_data"))


@pytest.mark.slow
def test_disk_cache_trains_exactly_like_the_memory_cache(phantom, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    memory = train(tiny_cfg("train.epochs=1"), phantom, tmp_path / "mem", tracking_uri=uri, progress=False)
    disk = train(
        tiny_cfg("train.epochs=1", "data.cache=disk"), phantom, tmp_path / "disk", tracking_uri=uri, progress=False
    )
    cached = list((tmp_path / "disk" / "cache").glob("*/*.pt"))
    split = json.loads((tmp_path / "disk" / "split.json").read_text())
    assert len(cached) == len(split["train"]), "one preprocessed volume per training case on disk"
    wm, wd = bundle_weights(memory.run_dir), bundle_weights(disk.run_dir)
    assert all(torch.equal(wm[k], wd[k]) for k in wm)
