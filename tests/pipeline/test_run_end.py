"""The end of a run: the bundle holds the best epoch's weights, and the network that trained is left as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.bundle import load_checkpoint
from pipeline.train import train
from tests.pipeline._training import bundle_weights, phantom_data, tiny_cfg


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_data(tmp_path_factory.mktemp("train_data"))


@pytest.mark.slow
def test_the_bundle_holds_the_best_epoch_and_train_returns_the_last(phantom, tmp_path):
    """Validation after every epoch with early stop after one: the best epoch is the first, the last the second."""
    cfg = tiny_cfg("train.epochs=5", "train.iterations_per_epoch=2", "train.val_every=1", "train.early_stop=1")
    result = train(cfg, phantom, tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", progress=False)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["model"]
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert result.best_epoch + 1 < result.epochs, "the test needs a best epoch before the last"
    assert not all(torch.equal(best[k], last[k]) for k in best)
    bundle = bundle_weights(result.run_dir)
    assert all(torch.equal(bundle[k], best[k]) for k in bundle)
    returned = result.model.state_dict()
    assert returned.keys() == last.keys() and all(torch.equal(returned[k].cpu(), last[k]) for k in last)
    assert (result.rank, result.world) == (0, 1)
    assert sorted(result.train_cases + result.val_cases) == [f"pancreas_{i:03d}" for i in range(1, 5)]
