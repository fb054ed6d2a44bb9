from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from attention3d import create_model
from pipeline.bundle import (
    METADATA,
    WEIGHTS,
    load_bundle,
    load_checkpoint,
    rng_state,
    save_bundle,
    save_checkpoint,
    set_rng_state,
)
from pipeline.config import load_config
from pipeline.errors import Seg3dError
from pipeline.transforms import Preprocessing

PRE = Preprocessing(
    target_spacing=(1.5, 1.5, 3.0),
    intensity_mode="foreground",
    clip=(-50.0, 250.0),
    mean=100.0,
    std=40.0,
    foreground_crop=True,
    body_threshold_hu=-500.0,
    label_names=["background", "pancreas", "cancer"],
    label_values=[0, 1, 2],
    exhaustive=True,
)


def _model(name="attention_unet", channels=(4, 8, 16)):
    torch.manual_seed(0)
    return create_model(name, channels=channels, strides=(2, 2), out_channels=3)


def _cfg(name="attention_unet"):
    return load_config(None, [f"model.name={name}", "model.channels=[4, 8, 16]", "model.strides=[2, 2]"])


def test_checkpoint_round_trip_restores_rng_exactly(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002  (MONAI's transforms draw from the global state, so it is saved)
    random.seed(3)
    state = {"model": _model().state_dict(), "epoch": 4, "rng": rng_state(), "history": [{"epoch": 0, "loss": 1.0}]}
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    assert loaded["epoch"] == 4 and loaded["history"] == [{"epoch": 0, "loss": 1.0}]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_malicious_pickle_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload(), "epoch": 1}, f)
    with pytest.raises(Seg3dError, match=r"evil\.pt cannot be loaded safely"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": _model().state_dict(), "epoch": 1}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Seg3dError, match=r"last\.pt cannot be loaded safely.*truncated"):
        load_checkpoint(path)


def test_bundle_round_trip_gives_the_same_network(tmp_path):
    model = _model().eval()
    folder = save_bundle(tmp_path / "bundle", model, _cfg(), PRE, {"best_epoch": 3})
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["model.safetensors", "config.yaml", "preprocessing.json", "metadata.json"]
    )
    bundle = load_bundle(folder)
    x = torch.randn(1, 1, 24, 24, 12)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), model(x))
    assert bundle.preprocessing == PRE
    meta = json.loads((folder / METADATA).read_text())
    assert meta["model"] == "attention_unet" and meta["best_epoch"] == 3
    assert set(meta["versions"]) >= {"seg3d", "torch", "monai"} and meta["labels"] == {
        "background": 0,
        "pancreas": 1,
        "cancer": 2,
    }
    # Saving again replaces the bundle as a whole and leaves no temporary folders.
    save_bundle(tmp_path / "bundle", _model(channels=(4, 8, 16)), _cfg(), PRE)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_bundle_weights_never_unpickle(tmp_path):
    """The weights file is safetensors: a pickle renamed to model.safetensors is rejected, not executed."""
    folder = save_bundle(tmp_path / "bundle", _model(), _cfg(), PRE)
    with open(folder / WEIGHTS, "wb") as f:
        pickle.dump(_Payload(), f)
    with pytest.raises(Seg3dError, match=r"model\.safetensors cannot be read"):
        load_bundle(folder)


@pytest.mark.parametrize("defect", ["truncated", "other_variant", "wrong_shape", "format", "missing"])
def test_corrupt_bundles_are_refused_with_the_file_named(tmp_path, defect):
    folder = save_bundle(tmp_path / "bundle", _model(), _cfg(), PRE)
    meta = json.loads((folder / METADATA).read_text())
    if defect == "truncated":
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
        match = r"model\.safetensors cannot be read"
    elif defect == "other_variant":
        other = save_bundle(tmp_path / "danet", _model("danet"), _cfg("danet"), PRE)
        (folder / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
        match = r"weights in .*model\.safetensors do not fit the model.*another model variant"
    elif defect == "wrong_shape":
        other = save_bundle(tmp_path / "wide", _model(channels=(8, 16, 32)), _cfg(), PRE)
        (folder / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
        match = r"has shape .* the model expects"
    elif defect == "format":
        meta["bundle_format"] = 99
        (folder / METADATA).write_text(json.dumps(meta))
        match = "has format 99, this seg3d reads format 1"
    else:
        (folder / "preprocessing.json").unlink()
        match = "has no preprocessing.json"
    with pytest.raises(Seg3dError, match=match):
        load_bundle(folder)
