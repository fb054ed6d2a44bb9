"""Fault injection: real `seg3d` processes killed with SIGKILL at chosen points (pipeline/faults.py), a real MLflow
server stopped and started again mid-run, a second training started on a busy folder. Every time: what is on disk
loads, a rerun finishes the job, and nothing is lost or logged twice."""

from __future__ import annotations

import hashlib
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

from attention3d import create_model
from pipeline.bundle import load_bundle, load_checkpoint, save_bundle
from pipeline.config import load_config
from pipeline.synthetic import CaseSpec, make_phantom, synthesize, to_nifti
from tests.mlflow_server import MlflowServer
from tests.pipeline.conftest import PRE

SEG3D = str(Path(sys.executable).with_name("seg3d"))
EPOCHS = 3
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "attention_unet.yaml"
TRAIN = [
    "--config",
    str(CONFIG),
    "model.name=attention_unet",
    "model.channels=[4, 8, 16]",
    "model.strides=[2, 2]",
    "data.patch_size=[32, 32, 16]",
    "data.target_spacing=[2.0, 2.0, 4.0]",
    "data.num_workers=0",
    f"train.epochs={EPOCHS}",
    "train.iterations_per_epoch=3",
    "train.val_every=1",
    "train.folds=2",
    "train.threads=2",
    "inference.sw_batch_size=2",
]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault_data")
    synthesize(out, cases=4, seed=5, test_cases=0)
    return out


def _env(fault: str | None = None, folder: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEG3D_FAULT", "MLFLOW_TRACKING_URI"))}
    if fault:
        env["SEG3D_FAULT"] = fault
    if folder:
        env["SEG3D_FAULT_DIR"] = str(folder)
    return env


def _train(phantom: Path, run_dir: Path, uri: str, *extra: str, fault: str | None = None, folder=None, **kw):
    command = [SEG3D, "train", "--data", str(phantom), "--output", str(run_dir), "--tracking-uri", uri, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(fault, folder), **kw)


def _steps(client: mlflow.MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _assert_finished_once(run_dir: Path, uri: str) -> None:
    """One FINISHED MLflow run holding every epoch exactly once, a last checkpoint at the end, a bundle that loads."""
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "a resumed training continues its run, it starts no other"
    for key in ("train_loss", "val_dice_pancreas"):
        assert _steps(client, run_id, key) == list(range(EPOCHS)), key
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == EPOCHS
    load_bundle(run_dir / "bundle")
    assert not (run_dir / "mlflow_pending.jsonl").exists(), "every metric reached the store"


# The points, one per state a kill can leave behind: inside the first epoch (no checkpoint yet) and a later one
# (optimizer steps), inside validation (after a case), in the middle of checkpoint writes (the temporary written
# and fsynced, not yet renamed), between a checkpoint and its MLflow metrics, and while writing the bundle. Each
# costs two seg3d processes (~30 s on 2 cores); other steps or epochs of the same kind leave the same states.
KILL_POINTS = [
    "train.step:2",
    "train.step:5",
    "validation.case:4",
    "write.last.pt:1",
    "write.best.pt:2",
    "epoch.checkpointed:2",
    "write.bundle:1",
]


@pytest.mark.slow
@pytest.mark.parametrize("fault", KILL_POINTS)
def test_training_killed_anywhere_resumes_to_one_complete_run(phantom, tmp_path, fault):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    killed = _train(phantom, run_dir, uri, *TRAIN, fault=fault)
    assert killed.returncode == -signal.SIGKILL, f"the fault point {fault} was not reached:\n{killed.stderr[-2000:]}"
    for ckpt in (run_dir / "checkpoints").glob("*.pt"):
        assert load_checkpoint(ckpt)["epoch"] <= EPOCHS  # whatever is on disk loads (weights_only)

    resumed = _train(phantom, run_dir, uri, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_finished_once(run_dir, uri)
    leftovers = [p.name for p in run_dir.rglob(".*") if p.name != ".lock"]
    assert not leftovers, f"temporaries of the killed writes remain: {leftovers}"


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"training ended before reaching {path.name}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path.name} not reached in {timeout_s} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_mlflow_server_down_mid_training_loses_no_metric(phantom, tmp_path):
    """The server is killed after epoch 0's checkpoint and started again before epoch 2 logs: epochs 0 and 1 wait in
    the run's pending file and reach the server once it is back; the run ends FINISHED with every epoch once."""
    server = MlflowServer(tmp_path / "server")
    gates = tmp_path / "gates"
    gates.mkdir()
    try:
        uri = server.start()
        command = [SEG3D, "train", "--data", str(phantom), "--output", str(tmp_path / "run"), "--tracking-uri", uri]
        fault = "epoch.checkpointed:1:wait,epoch.checkpointed:3:wait"
        with subprocess.Popen(
            [*command, *TRAIN], env=_env(fault, gates), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ) as proc:
            _wait_for(gates / "epoch.checkpointed.1.reached", proc)
            server.stop(kill=True)
            (gates / "epoch.checkpointed.1.go").touch()
            _wait_for(gates / "epoch.checkpointed.3.reached", proc)
            pending = tmp_path / "run" / "mlflow_pending.jsonl"
            waiting = {json.loads(line)["step"] for line in pending.read_text().splitlines()}
            assert waiting == {0, 1}, "the metrics of the epochs logged while the server was down wait on disk"
            server.start()
            (gates / "epoch.checkpointed.3.go").touch()
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, stderr[-3000:]
        assert str(pending) in stderr, "the warning names the file that holds the waiting metrics"
        _assert_finished_once(tmp_path / "run", uri)
    finally:
        server.stop(kill=True)


@pytest.mark.slow
def test_a_second_training_on_a_busy_folder_is_refused_and_changes_nothing(phantom, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    gates = tmp_path / "gates"
    gates.mkdir()
    command = [SEG3D, "train", "--data", str(phantom), "--output", str(run_dir), "--tracking-uri", uri, *TRAIN]
    with subprocess.Popen(
        command, env=_env("epoch.checkpointed:1:wait", gates), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as first:
        _wait_for(gates / "epoch.checkpointed.1.reached", first)
        before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
        for extra in (TRAIN, ["--resume"]):
            second = _train(phantom, run_dir, uri, *extra)
            assert second.returncode == 2
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "in use by another training" in lines[0], second.stderr
        after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
        assert after == before, "the refused training wrote nothing"
        (gates / "epoch.checkpointed.1.go").touch()
        first.communicate(timeout=TIMEOUT_S)
    assert first.returncode == 0
    _assert_finished_once(run_dir, uri)


# -- batch inference ------------------------------------------------------------------------------------------------

SPEC = CaseSpec(shape=(64, 64, 20), spacing=(0.9, 0.9, 2.5), orientation="RAS", tumour=True, decoys=1)


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("batch")
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=attention_unet", *TRAIN[3:6]])
    model = create_model("attention_unet", channels=(4, 8, 16), strides=(2, 2), out_channels=3)
    bundle = save_bundle(root / "bundle", model, cfg, PRE)
    images = root / "images"
    images.mkdir()
    for i in range(4):
        image, _, affine = make_phantom(np.random.default_rng(i), SPEC)
        nib.save(to_nifti(image, affine, "RAS"), images / f"case{i}.nii.gz")
    return bundle, images


def _infer(bundle: Path, images: Path, out: Path, fault: str | None = None):
    command = [SEG3D, "infer", "--model", str(bundle), "--input", str(images), "--output", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(fault))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["infer.case:3", "write.case1.nii.gz:1"])
def test_batch_inference_killed_resumes_without_half_files_or_recomputing(batch, tmp_path, fault):
    """Killed while computing case 2 or while writing case 1's mask: every output on disk is whole, and the rerun
    computes only the cases without an output, leaves the finished ones untouched and no temporary behind."""
    bundle, images = batch
    out = tmp_path / "out"
    killed = _infer(bundle, images, out, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    outputs = [p for p in out.glob("*.nii.gz") if not p.name.startswith(".")]
    finished = {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in outputs}
    assert 0 < len(finished) < 4
    if fault.startswith("write."):
        assert list(out.glob(".case1.nii.gz.*")), "killed between writing the temporary and renaming it"
        assert not (out / "case1.nii.gz").exists()
    for path in finished:
        assert nib.load(path).get_fdata().shape == SPEC.shape  # whole, readable files only

    rerun = _infer(bundle, images, out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(finished)} skipped" in rerun.stdout + rerun.stderr
    expected = sorted(f"case{i}{end}" for i in range(4) for end in (".nii.gz", "_manifest.json"))
    assert sorted(p.name for p in out.iterdir()) == expected, "no temporaries left"
    for path, (mtime, sha) in finished.items():
        assert path.stat().st_mtime_ns == mtime and hashlib.sha256(path.read_bytes()).hexdigest() == sha


@pytest.fixture(scope="module")
def killed_run(phantom, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("finished")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    killed = _train(phantom, root / "run", uri, *TRAIN, fault="epoch.checkpointed:2")  # a run to resume
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    return root / "run", uri


@pytest.mark.slow
@pytest.mark.parametrize("defect", ["truncated", "other_variant", "wrong_shape"])
def test_a_corrupt_checkpoint_is_refused_on_resume_naming_the_file(killed_run, phantom, tmp_path, defect):
    import shutil

    from pipeline.bundle import save_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(killed_run[0], run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if defect == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        ckpt = load_checkpoint(last)
        other = (
            create_model("unet", channels=(4, 8, 16), strides=(2, 2), out_channels=3)
            if defect == "other_variant"
            else create_model("attention_unet", channels=(8, 16, 32), strides=(2, 2), out_channels=3)
        )
        save_checkpoint({**ckpt, "model": other.state_dict()}, last)
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    resumed = _train(phantom, run_dir, killed_run[1], "--resume")
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1 and str(last) in lines[0] and "Traceback" not in resumed.stderr, resumed.stderr
    expect = {"truncated": "cannot be loaded safely", "other_variant": "another model variant", "wrong_shape": "shape"}
    assert expect[defect] in lines[0]
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before, "a refused resume leaves the checkpoint as it was"
