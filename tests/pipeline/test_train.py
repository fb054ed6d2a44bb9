"""Training end to end on real phantom files with a real MLflow store: tiny networks, a few iterations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.bundle import load_bundle, load_checkpoint
from pipeline.config import load_config
from pipeline.errors import Seg3dError
from pipeline.predict import Predictor
from pipeline.tracking.store import download_artifacts
from pipeline.train import train
from tests.pipeline._training import TINY, bundle_weights, mlflow_client, phantom_data, tiny_cfg


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_data(tmp_path_factory.mktemp("train_data"))


@pytest.mark.slow
def test_training_writes_checkpoints_bundle_and_a_complete_mlflow_run(phantom, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(tiny_cfg("train.val_every=1"), phantom, tmp_path / "run", tracking_uri=uri, progress=False)
    run_dir = result.run_dir

    # Checkpoints: full training state, loadable without unpickling objects.
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and set(last) >= {"model", "optimizer", "scheduler", "scaler", "rng", "history"}
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["epoch"] == result.best_epoch + 1
    split = json.loads((run_dir / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [f"pancreas_{i:03d}" for i in range(1, 5)] and split["val"]

    # The bundle rebuilds the network and predicts in the input's own geometry.
    bundle = load_bundle(result.bundle)
    assert bundle.label_names == ["background", "pancreas", "cancer"]
    test_image = phantom / "imagesTs" / "pancreas_005.nii.gz"
    pred = Predictor.from_bundle(bundle).predict_file(test_image)
    stored = nib.load(test_image)
    assert pred.labels.shape == stored.shape and np.allclose(pred.affine, stored.affine)

    # MLflow: params, per-epoch metrics, tags, artifacts, registry.
    client = mlflow_client(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "attention_unet" and params["train.epochs"] == "2"
    assert params["dataset.cases"] == "4" and len(params["dataset.datalist_hash"]) == 16
    assert "dataset.median_spacing_mm" in params and "preprocessing.mean" in params
    for key in ("train_loss", "lr", "val_dice_pancreas", "val_dice_mean", "epoch_time_s", "iterations_per_s"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [0, 1], key
    tags = run.data.tags
    assert tags["variant"] == "attention_unet" and tags["torch"] == torch.__version__
    assert tags["git_commit"] and tags["device"].startswith("cpu") and "monai" in tags
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"per_case_dice.csv", "per_case_dice.json", "training_curves.png", "config.yaml", "bundle"} <= names
    assert any(n.startswith("overlay_") and n.endswith(".png") for n in names)
    assert {a.path for a in client.list_artifacts(result.run_id, "bundle")} >= {"bundle/model.safetensors"}
    assert result.registered_version == "1"
    local = download_artifacts("models:/seg3d-attention_unet/1", tmp_path / "dl", tracking_uri=uri)
    assert torch.equal(load_bundle(local).model.head.weight, bundle.model.head.weight)


@pytest.mark.slow
def test_training_is_reproducible_on_cpu(phantom, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a = train(tiny_cfg(), phantom, tmp_path / "a", tracking_uri=uri, progress=False)
    b = train(tiny_cfg(), phantom, tmp_path / "b", tracking_uri=uri, progress=False)
    wa, wb = bundle_weights(a.run_dir), bundle_weights(b.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    c = train(tiny_cfg("train.seed=1"), phantom, tmp_path / "c", tracking_uri=uri, progress=False)
    assert not all(torch.equal(wa[k], bundle_weights(c.run_dir)[k]) for k in wa), "the seed changes nothing"


@pytest.mark.slow
def test_resume_after_kill_finishes_the_same_run_with_every_epoch_once(phantom, tmp_path):
    """kill -9 the CLI after its first epoch; --resume finishes the same MLflow run with epochs 0, 1, 2 exactly once
    and the same weights as an uninterrupted run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*TINY, "train.epochs=3", "train.iterations_per_epoch=4"]
    exe = Path(sys.executable).with_name("seg3d")
    run_dir = tmp_path / "killed"
    base = [str(exe), "train", "--data", str(phantom), "--output", str(run_dir), "--tracking-uri", uri]
    proc = subprocess.Popen([*base, "--config", str(_write_cfg(tmp_path)), *overrides], stdout=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert load_checkpoint(last)["epoch"] < 3

    resumed = subprocess.run([*base, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    client = mlflow_client(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [0, 1, 2]
    assert load_checkpoint(last)["epoch"] == 3

    reference = train(load_config(_write_cfg(tmp_path), overrides), phantom, tmp_path / "ref", tracking_uri=uri)
    wk, wr = bundle_weights(run_dir), bundle_weights(reference.run_dir)
    assert all(torch.equal(wk[k], wr[k]) for k in wk), "a resumed run must end where an uninterrupted one does"


def _write_cfg(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("model:\n  name: attention_unet\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, extra, outputs",
    [
        ("danet", [], ["logits", "pam2", "cam2"]),
        ("encnet", [], ["logits", "se2"]),
        ("emanet", ["model.deep_supervision=1"], ["logits", "ds1"]),
    ],
)
def test_variants_with_auxiliary_outputs_train(phantom, tmp_path, name, extra, outputs):
    result = train(
        tiny_cfg("train.epochs=1", "train.iterations_per_epoch=2", *extra, name=name),
        phantom,
        tmp_path / "run",
        tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        progress=False,
    )
    assert np.isfinite(result.history[0]["train_loss"])
    assert load_bundle(result.bundle).model.output_names == outputs


@pytest.mark.slow
def test_training_against_a_real_mlflow_server(phantom, tmp_path, mlflow_server):
    result = train(
        tiny_cfg("train.epochs=1", "registered_model=seg3d-server-test", "experiment=train-server-test"),
        phantom,
        tmp_path / "run",
        tracking_uri=mlflow_server,
        progress=False,
    )
    client = mlflow_client(mlflow_server)  # the REST client, over HTTP
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == [0]
    assert "val_dice_mean" in run.data.metrics
    assert "per_case_dice.csv" in {a.path for a in client.list_artifacts(result.run_id)}
    version = client.get_model_version("seg3d-server-test", result.registered_version)
    assert version.run_id == result.run_id
    local = download_artifacts(f"models:/seg3d-server-test/{version.version}", tmp_path / "dl", mlflow_server)
    assert load_bundle(local).config.model.name == "attention_unet"


def _torch_settings() -> tuple[int, bool, bool]:
    return torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark


def test_train_leaves_the_process_torch_settings_as_it_found_them(phantom, tmp_path):
    """Training sets train.threads (2) and, by MONAI's set_determinism, cuDNN deterministic with its benchmark off;
    none of it may outlive train(), whether it returns or raises (here: fp16 refused on the CPU after set-up
    started)."""
    before = _torch_settings()
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    try:
        torch.set_num_threads(1)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        mine = _torch_settings()
        cfg = tiny_cfg("train.epochs=1", "train.iterations_per_epoch=1")
        train(cfg, phantom, tmp_path / "run", tracking_uri=uri, progress=False)
        assert _torch_settings() == mine == (1, False, True)
        with pytest.raises(Seg3dError, match="fp16 needs a CUDA device"):
            train(tiny_cfg("train.device=cpu", "train.precision=fp16"), phantom, tmp_path / "fp16", tracking_uri=uri)
        assert _torch_settings() == mine
    finally:
        torch.set_num_threads(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]
