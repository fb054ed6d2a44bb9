"""Training end to end on real phantom files with a real MLflow store: tiny networks, a few iterations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.bundle import load_bundle, load_checkpoint
from pipeline.config import load_config
from pipeline.errors import Seg3dError
from pipeline.predict import Predictor
from pipeline.synthetic import synthesize
from pipeline.tracking import download_artifacts
from pipeline.train import RunLock, SegLoss, kfold_split, train
from tests.mlflow_server import free_port

TINY = [
    "model.channels=[4, 8, 16]",
    "model.strides=[2, 2]",
    "data.patch_size=[32, 32, 16]",
    "data.target_spacing=[2.0, 2.0, 4.0]",
    "data.num_workers=0",
    "train.epochs=2",
    "train.iterations_per_epoch=3",
    "train.folds=2",
    "train.threads=2",
    "inference.sw_batch_size=2",
]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_data")
    synthesize(out, cases=4, seed=2, test_cases=1)
    return out


def _cfg(*extra: str, name: str = "attention_unet"):
    return load_config(None, [f"model.name={name}", *TINY, *extra])


def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "bundle" / "model.safetensors")


def test_kfold_split_is_a_seeded_partition():
    ids = [f"c{i}" for i in range(11)]
    folds = [kfold_split(ids, 5, k, seed=3) for k in range(5)]
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == len(ids), "each case validates once"
    for f in folds:
        assert set(f["train"]).isdisjoint(f["val"]) and set(f["train"]) | set(f["val"]) == set(ids)
    assert kfold_split(ids, 5, 2, seed=3) == folds[2]
    assert kfold_split(ids, 5, 2, seed=4)["val"] != folds[2]["val"]
    with pytest.raises(Seg3dError, match="cannot make 5 folds"):
        kfold_split(ids[:3], 5, 0, seed=0)


def test_loss_adds_each_auxiliary_with_its_weight():
    """The DANet loss is DiceCE(main) + w_pam DiceCE(pam) + w_cam DiceCE(cam); EncNet adds w_se SE-loss."""
    from monai.losses import DiceCELoss

    from attention3d import se_loss

    cfg = load_config(None, ["loss.pam=0.3", "loss.cam=0.7", "loss.se=0.25", "loss.deep_supervision=0.5"])
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    outs = [torch.randn(2, 3, 8, 8, 8) for _ in range(3)]
    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    got = SegLoss(cfg, ["logits", "pam4", "cam4"], 3)(outs, label)
    want = dice_ce(outs[0], label) + 0.3 * dice_ce(outs[1], label) + 0.7 * dice_ce(outs[2], label)
    torch.testing.assert_close(got, want)
    se = torch.randn(2, 3)
    got = SegLoss(cfg, ["logits", "ds1", "ds2", "se4"], 3)([*outs, se], label)
    want = dice_ce(outs[0], label) + 0.5 * dice_ce(outs[1], label) + 0.25 * dice_ce(outs[2], label)
    torch.testing.assert_close(got, want + 0.25 * se_loss(se, label, 3))


@pytest.mark.slow
def test_training_writes_checkpoints_bundle_and_a_complete_mlflow_run(phantom, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(_cfg("train.val_every=1"), phantom, tmp_path / "run", tracking_uri=uri, progress=False)
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
    client = _client(uri)
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
    a = train(_cfg(), phantom, tmp_path / "a", tracking_uri=uri, progress=False)
    b = train(_cfg(), phantom, tmp_path / "b", tracking_uri=uri, progress=False)
    wa, wb = _weights(a.run_dir), _weights(b.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    c = train(_cfg("train.seed=1"), phantom, tmp_path / "c", tracking_uri=uri, progress=False)
    assert not all(torch.equal(wa[k], _weights(c.run_dir)[k]) for k in wa), "the seed changes nothing"


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
    client = _client(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [0, 1, 2]
    assert load_checkpoint(last)["epoch"] == 3

    reference = train(load_config(_write_cfg(tmp_path), overrides), phantom, tmp_path / "ref", tracking_uri=uri)
    wk, wr = _weights(run_dir), _weights(reference.run_dir)
    assert all(torch.equal(wk[k], wr[k]) for k in wk), "a resumed run must end where an uninterrupted one does"


def _write_cfg(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("model:\n  name: attention_unet\n")
    return path


def test_a_second_training_on_the_same_folder_is_refused(phantom, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir), pytest.raises(Seg3dError, match="in use by another training"):
        train(_cfg(), phantom, run_dir, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    (run_dir / "config.yaml").write_text("model: {name: unet}\n")
    with pytest.raises(Seg3dError, match="already holds a training run; pass --resume"):
        train(_cfg(), phantom, run_dir, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml"], "nothing was overwritten"


def test_an_unreachable_server_fails_before_any_compute(phantom, tmp_path):
    start = time.monotonic()
    with pytest.raises(Seg3dError, match="does not answer"):
        train(_cfg(), phantom, tmp_path / "run", tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 15
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_dataset_with_errors_is_refused_naming_check_data(tmp_path):
    data = tmp_path / "data"
    synthesize(data, cases=2, seed=0, test_cases=1)
    label = data / "labelsTr" / "pancreas_002.nii.gz"
    img = nib.load(label)
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), label)
    with pytest.raises(Seg3dError, match=r"1 problem\(s\), first: pancreas_002: .*seg3d check-data"):
        train(_cfg(), data, tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "run").exists(), "a refused run leaves no folder behind"


def test_a_bad_model_option_is_refused_before_the_run_folder_is_written(phantom, tmp_path):
    with pytest.raises(Seg3dError, match="skip must be one of"):
        train(_cfg("model.skip=gates"), phantom, tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "run").exists()


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
        _cfg("train.epochs=1", "train.iterations_per_epoch=2", *extra, name=name),
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
        _cfg("train.epochs=1", "registered_model=seg3d-server-test", "experiment=train-server-test"),
        phantom,
        tmp_path / "run",
        tracking_uri=mlflow_server,
        progress=False,
    )
    client = _client(mlflow_server)  # the REST client, over HTTP
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == [0]
    assert "val_dice_mean" in run.data.metrics
    assert "per_case_dice.csv" in {a.path for a in client.list_artifacts(result.run_id)}
    version = client.get_model_version("seg3d-server-test", result.registered_version)
    assert version.run_id == result.run_id
    local = download_artifacts(f"models:/seg3d-server-test/{version.version}", tmp_path / "dl", mlflow_server)
    assert load_bundle(local).config.model.name == "attention_unet"


@pytest.mark.slow
def test_disk_cache_trains_exactly_like_the_memory_cache(phantom, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    memory = train(_cfg("train.epochs=1"), phantom, tmp_path / "mem", tracking_uri=uri, progress=False)
    disk = train(
        _cfg("train.epochs=1", "data.cache=disk"), phantom, tmp_path / "disk", tracking_uri=uri, progress=False
    )
    cached = list((tmp_path / "disk" / "cache").glob("*/*.pt"))
    split = json.loads((tmp_path / "disk" / "split.json").read_text())
    assert len(cached) == len(split["train"]), "one preprocessed volume per training case on disk"
    wm, wd = _weights(memory.run_dir), _weights(disk.run_dir)
    assert all(torch.equal(wm[k], wd[k]) for k in wm)


def test_early_stop_ends_training_when_validation_stops_improving(phantom, tmp_path):
    """With a learning rate too small to change anything, the second validation cannot beat the first."""
    cfg = _cfg("train.epochs=5", "train.iterations_per_epoch=1", "train.early_stop=1", "train.lr=1e-12")
    result = train(cfg, phantom, tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", progress=False)
    assert result.epochs == 2 and result.best_epoch == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["stopped_early"] is True


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda(phantom, tmp_path, precision):
    cfg = _cfg("train.epochs=1", "train.device=cuda", f"train.precision={precision}")
    result = train(cfg, phantom, tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", progress=False)
    assert np.isfinite(result.history[0]["train_loss"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert bool(state["scaler"]) == (precision == "fp16"), "the grad scaler runs for fp16 only"
