"""Data-parallel training through the real torchrun: two gloo ranks on the CPU, a real sqlite MLflow store, real
phantom files; a worker killed with SIGKILL mid-epoch and the job restarted by torchrun itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.bundle import load_checkpoint
from pipeline.cli import main
from pipeline.distributed import TIMEOUT_ENV, Dist, timeout_from_env
from pipeline.errors import Seg3dError
from pipeline.synthetic import synthesize
from tests.pipeline._rank_report import digest

# 5 cases, 2 folds: fold 0 validates on 3 cases (which do not divide by 2 ranks) and trains on 2 (one per rank).
TINY = [
    "model.channels=[4, 8, 16]",
    "model.strides=[2, 2]",
    "data.patch_size=[32, 32, 16]",
    "data.target_spacing=[2.0, 2.0, 4.0]",
    "data.num_workers=0",
    "train.epochs=2",
    "train.iterations_per_epoch=2",
    "train.folds=2",
    "train.threads=1",
    "inference.sw_batch_size=2",
]
TIMEOUT_S = 420
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _reporting(report_dir: Path) -> list[str]:
    """torchrun's entry: `seg3d train` on every rank, each writing what its train() returned into `report_dir`."""
    return ["-m", "tests.pipeline._rank_report", str(report_dir)]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SEG3D_"))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a launcher in its own session, so that a timeout ends torchrun and every worker it started."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{command[:6]} did not end within {TIMEOUT_S} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def _train_args(data: Path, run_dir: Path, uri: str, experiment: str, config: Path) -> list[str]:
    return [
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--output",
        str(run_dir),
        "--tracking-uri",
        uri,
        *TINY,
        f"experiment={experiment}",
        f"registered_model={experiment}",
    ]


def _reports(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distributed")
    synthesize(root / "data", cases=5, seed=2, test_cases=1)
    config = root / "tiny.yaml"
    config.write_text("model:\n  name: attention_unet\n")
    return {"root": root, "data": root / "data", "config": config, "uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def uninterrupted(store) -> dict:
    """One uninterrupted 2-rank job, started through torchrun exactly as a user would."""
    root = store["root"]
    run_dir, reports = root / "ddp", root / "reports_ddp"
    args = _train_args(store["data"], run_dir, store["uri"], "ddp-plain", store["config"])
    done = _run([*TORCHRUN, *_reporting(reports), *args], _env())
    assert done.returncode == 0, done.stdout[-4000:]
    return {"run_dir": run_dir, "reports": reports, "stdout": done.stdout, "args": args}


def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _only_run(uri: str, experiment: str):
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one training job"
    return client, runs[0]


@pytest.mark.slow
def test_two_ranks_train_one_model_on_disjoint_cases_with_one_run_and_one_bundle(store, uninterrupted):
    run_dir = uninterrupted["run_dir"]
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["val"]) == 3 and len(split["train"]) == 2
    r0, r1 = _reports(uninterrupted["reports"])

    # Each rank trained and validated on its own cases, and together on all of them exactly once.
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert sorted(r0["train_cases"] + r1["train_cases"]) == sorted(split["train"])
    assert set(r0["train_cases"]).isdisjoint(r1["train_cases"]) and r0["train_cases"] and r1["train_cases"]
    assert sorted(r0["val_cases"] + r1["val_cases"]) == sorted(split["val"])
    assert sorted([len(r0["val_cases"]), len(r1["val_cases"])]) == [1, 2]

    # Different cases give different gradients; identical weights on both ranks mean DDP averaged them, and they
    # are the weights rank 0 checkpointed.
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and r0["epochs"] == r1["epochs"] == 2
    assert r0["state_sha256"] == r1["state_sha256"] == digest(last["model"])
    assert len(last["rng_ranks"]) == 2 and not torch.equal(last["rng_ranks"][0]["torch"], last["rng_ranks"][1]["torch"])

    # Validation Dice is the mean over the 3 validation cases, each counted once (no padding duplicates).
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")["best"]
    assert sorted(best["per_case"]) == sorted(split["val"])
    per_case = np.array([best["per_case"][c] for c in split["val"]], dtype=float)
    class_means = np.nanmean(per_case, axis=0)
    client, run = _only_run(store["uri"], "ddp-plain")
    pancreas = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_dice_pancreas")}
    assert pancreas[best["epoch"]] == pytest.approx(class_means[0], abs=1e-9)
    assert run.data.metrics["val_dice_mean"] == pytest.approx(float(np.nanmean(class_means)), abs=1e-9)

    # One MLflow run, FINISHED, every epoch logged once; one bundle, registered once.
    assert run.info.status == "FINISHED" and run.data.params["distributed.world_size"] == "2"
    assert run.data.tags["distributed"].startswith("2 ranks, gloo")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [0, 1]
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == run.info.run_id
    assert [p.parent.name for p in store["root"].glob("ddp/**/model.safetensors")] == ["bundle"]
    assert [str(v.version) for v in client.search_model_versions("name='ddp-plain'")] == ["1"]
    assert uninterrupted["stdout"].count("done: 2 epochs") == 1, "rank 0 reports, the others stay quiet"


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_restarts_from_the_checkpoint_and_ends_where_an_unbroken_job_does(
    store, uninterrupted, tmp_path
):
    """torchrun with --max-restarts 1, as `seg3d train --nproc 2 --max-restarts 1` starts it (see the next test);
    rank 1 SIGKILLs itself at global step 3 (second iteration of the second epoch, after the first epoch's
    checkpoint) on the first attempt only. torchrun restarts both ranks."""
    run_dir, reports = tmp_path / "killed", tmp_path / "reports"
    args = _train_args(store["data"], run_dir, store["uri"], "ddp-killed", store["config"])
    done = _run(
        [*TORCHRUN, "--max-restarts", "1", *_reporting(reports), *args],
        _env(SEG3D_FAULT="train.step:3", SEG3D_FAULT_RANK="1"),
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert "exitcode: -9" in done.stdout, "rank 1 was not killed: the restart path was not exercised"

    r0, r1 = _reports(reports)
    assert r0["attempt"] == r1["attempt"] == 1, "the job finished on torchrun's restart"
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and [h["epoch"] for h in last["history"]] == [0, 1]

    client, run = _only_run(store["uri"], "ddp-killed")
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_dice_mean", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1], key

    # Restarted from the epoch-1 checkpoint with each rank's RNG state: the weights of the unbroken job, bit for bit.
    unbroken = load_checkpoint(uninterrupted["run_dir"] / "checkpoints" / "last.pt")["model"]
    assert r0["state_sha256"] == r1["state_sha256"] == digest(unbroken)
    wk = load_file(run_dir / "bundle" / "model.safetensors")
    wu = load_file(uninterrupted["run_dir"] / "bundle" / "model.safetensors")
    assert all(torch.equal(wk[k], wu[k]) for k in wu)


@pytest.mark.slow
def test_a_user_error_on_rank_0_ends_every_rank_with_the_same_one_line_error(store, uninterrupted):
    """The run folder already holds a run and --resume is missing: rank 0 refuses, and rank 1 does not wait."""
    last = uninterrupted["run_dir"] / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns
    done = _run([*TORCHRUN, *_reporting(store["root"] / "reports_refused"), *uninterrupted["args"]], _env())
    assert done.returncode != 0
    line = f"seg3d train: error: {uninterrupted['run_dir']} already holds a training run; pass --resume"
    assert done.stdout.count(line) == 2, done.stdout[-3000:]
    assert last.stat().st_mtime_ns == before and not (store["root"] / "reports_refused").exists()


def test_ranks_split_items_disjointly_and_completely():
    items = [f"c{i}" for i in range(7)]
    shares = [Dist(rank=r, world=3).partition(items) for r in range(3)]
    assert sorted(c for share in shares for c in share) == items and [len(s) for s in shares] == [3, 2, 2]


def test_the_group_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_from_env().total_seconds() == 30 * 60
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert timeout_from_env().total_seconds() == 150
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(Seg3dError, match="positive number of minutes"):
        timeout_from_env()


def test_nproc_is_checked_before_anything_starts(store, tmp_path, capsys, monkeypatch):
    # --data names nothing, so that a launch that slipped through would fail at once rather than train.
    args = [
        "train",
        "--config",
        str(store["config"]),
        "--data",
        str(tmp_path / "none"),
        "--output",
        str(tmp_path / "r"),
    ]
    assert main([*args, "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip() == "seg3d train: error: --nproc must be at least 1, got 0"
    assert main([*args, "--nproc", "2", "--max-restarts", "-1"]) == 2
    assert "--max-restarts must be 0 or more" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main([*args, "--nproc", "2"]) == 2
    assert "would start torchrun again" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_nproc_starts_torchrun_with_the_training_arguments_unchanged(store, tmp_path, monkeypatch):
    """`seg3d train --nproc 2 --max-restarts 1` starts the torchrun command the killed-worker test starts, with
    `python -m pipeline.cli train` and the same training arguments on every rank."""
    import pipeline.distributed
    from pipeline.cli import build_parser

    started: list[list[str]] = []

    class Launched:  # records the torchrun command instead of starting it
        def __init__(self, command):
            started.append(command)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(pipeline.distributed.subprocess, "Popen", Launched)
    for key in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    args = _train_args(store["data"], tmp_path / "r", store["uri"], "ddp-relaunch", store["config"])
    assert main([*args, "--nproc", "2", "--max-restarts", "1"]) == 0
    [command] = started
    assert command[:8] == [*TORCHRUN, "--max-restarts", "1"] and command[8:11] == ["-m", "pipeline.cli", "train"]
    given, forwarded = vars(build_parser().parse_args(args)), vars(build_parser().parse_args(command[10:]))
    assert (given.pop("nproc"), given.pop("max_restarts")) == (None, None)
    assert (forwarded.pop("nproc"), forwarded.pop("max_restarts")) == (None, None)
    assert forwarded == given
    assert not (tmp_path / "r").exists()
