"""`seg3d study` end to end through the console script, on a tiny phantom study (2 variants, 2 folds, a few
iterations): child runs under one parent in a real sqlite store, out-of-fold files for every case, the report, the
champion bundle and its alias, infer on the champion; SIGKILL inside a job and between jobs; shards; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import yaml

from pipeline.synthetic import synthesize

SEG3D = str(Path(sys.executable).with_name("seg3d"))
TIMEOUT_S = 900
STUDY = {
    "name": "tiny",
    "experiment": "tiny-study",
    "training": {
        "model": {"channels": [4, 8, 16], "strides": [2, 2]},
        "data": {"target_spacing": [2.0, 2.0, 4.0], "num_workers": 0},
        "train": {"val_every": 1, "threads": 2},
        "inference": {"sw_batch_size": 2},
    },
    "variants": ["unet", "attention_unet"],
    "baseline": "unet",
    "folds": 2,
    "seeds": [0],
    "budget": {"epochs": 1, "iterations_per_epoch": 3, "batch_size": 2, "patch_size": [32, 32, 16]},
    "ensembles": {"pairs": True, "top": 2, "postprocess": [True, False]},
    "registered_model": "tiny-champion",
}
JOBS = ["unet-f0-s0", "attention_unet-f0-s0", "unet-f1-s0", "attention_unet-f1-s0"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study_data")
    synthesize(out, cases=4, seed=7, test_cases=1)
    return out


@pytest.fixture(scope="module")
def study_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("study_cfg") / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    return path


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEG3D_FAULT", "MLFLOW_TRACKING_URI", "RANK"))}
    env.pop("WORLD_SIZE", None)
    if fault:
        env["SEG3D_FAULT"] = fault
    return env


def study(config: Path, data: Path, out: Path, uri: str, *extra: str, fault: str | None = None):
    return subprocess.run(
        [
            SEG3D,
            "study",
            "--config",
            str(config),
            "--data",
            str(data),
            "--output",
            str(out),
            "--tracking-uri",
            uri,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(fault),
    )


def _runs(uri: str, experiment: str = "tiny-study"):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, phantom, study_config):
    root = tmp_path_factory.mktemp("study_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = root / "study"
    done = study(study_config, phantom, out, uri)
    assert done.returncode == 0, done.stderr
    return out, uri, done


def test_a_study_runs_every_job_as_a_child_run_of_one_parent(finished):
    out, uri, _ = finished
    _, runs = _runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["seg3d.job"] for r in children) == sorted(JOBS)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)
    # Every job validated on the study's fold, so every case is out-of-fold exactly once per variant.
    split = json.loads((out / "split.json").read_text())
    assert sorted(c for fold in split["val"] for c in fold) == [f"pancreas_{i:03d}" for i in range(1, 5)]
    for job in JOBS:
        fold = int(job.split("-f")[1][0])
        files = sorted(p.stem for p in (out / "jobs" / job / "oof").glob("*.npz"))
        assert files == sorted(split["val"][fold])
        run_split = json.loads((out / "jobs" / job / "run" / "split.json").read_text())
        assert run_split["val"] == split["val"][fold]


def test_out_of_fold_files_hold_probabilities_in_the_case_grid(finished, phantom):
    out, _, _ = finished
    split = json.loads((out / "split.json").read_text())
    case = split["val"][0][0]
    label = nib.load(phantom / "labelsTr" / f"{case}.nii.gz")
    with np.load(out / "jobs" / "unet-f0-s0" / "oof" / f"{case}.npz") as f:
        probs, affine = f["probabilities"], f["affine"]
    assert probs.dtype == np.float16 and probs.shape == (3, *label.shape)
    np.testing.assert_allclose(affine, label.affine, atol=1e-4)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)


def test_the_report_has_every_table_and_figure_and_is_logged_to_the_parent(finished):
    out, uri, _ = finished
    report = out / "report"
    text = (report / "report.md").read_text()
    for name in ("unet", "attention_unet", "unet+attention_unet"):
        assert name in text
    for png in ("dice_per_case.png", "dice_vs_cost.png", "decoy_confusion.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client, runs = _runs(uri)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged and "report/dice_per_case.png" in logged
    assert "seg3d.winner" in parent.data.tags


def test_the_champion_is_registered_with_its_alias_and_infer_runs_it(finished, phantom, tmp_path):
    out, uri, _ = finished
    champion = json.loads((out / "champion.json").read_text())
    members = champion["winner"]["members"]
    assert sorted(champion["members"]) == sorted(f"{v}-f{f}-s0" for v in members for f in (0, 1))
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("tiny-champion", "champion")
    assert str(version.version) == champion["version"]
    image = phantom / "imagesTs" / "pancreas_005.nii.gz"
    mask = tmp_path / "mask.nii.gz"
    done = subprocess.run(
        [
            SEG3D,
            "infer",
            "--model",
            "models:/tiny-champion@champion",
            "--tracking-uri",
            uri,
            "--input",
            str(image),
            "--output",
            str(mask),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr
    written, source = nib.load(mask), nib.load(image)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)


def test_a_rerun_of_a_finished_study_trains_nothing_and_registers_nothing(finished, phantom, study_config):
    out, uri, _ = finished
    before = {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/done.json")}
    again = study(study_config, phantom, out, uri)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("jobs/*/done.json")} == before
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_model_versions("name='tiny-champion'")) == 1
    _, runs = _runs(uri)
    assert len(runs) == 1 + len(JOBS)


def _summary(out: Path) -> list[dict]:
    rows = (out / "report" / "per_case.csv").read_text().splitlines()
    return sorted(rows)


def test_sigkill_inside_a_job_and_between_jobs_then_rerun_finishes_every_job_once(
    tmp_path, phantom, study_config, finished
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "study"
    inside = study(study_config, phantom, out, uri, fault="train.step:2")
    assert inside.returncode == -9
    between = study(study_config, phantom, out, uri, fault="study.job_done:2")
    assert between.returncode == -9
    assert len(list(out.glob("jobs/*/done.json"))) == 2
    last = study(study_config, phantom, out, uri)
    assert last.returncode == 0, last.stderr
    _, runs = _runs(uri)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["seg3d.job"] for r in children) == sorted(JOBS)  # one run per job, none twice
    assert len(runs) - len(children) == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    # The same jobs, seeds and split give the same numbers as the uninterrupted study.
    assert _summary(out) == _summary(finished[0])


def test_shards_partition_the_jobs_and_give_the_unsharded_report(tmp_path, phantom, study_config, finished):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "study"
    first = study(study_config, phantom, out, uri, "--shard", "0/2")
    assert first.returncode == 0, first.stderr
    assert sorted(p.parent.name for p in out.glob("jobs/*/done.json")) == sorted(JOBS[0::2])
    assert not (out / "report").exists()
    second = study(study_config, phantom, out, uri, "--shard", "1/2")
    assert second.returncode == 0, second.stderr
    assert sorted(p.parent.name for p in out.glob("jobs/*/done.json")) == sorted(JOBS)
    assert _summary(out) == _summary(finished[0])


def test_report_only_names_the_missing_jobs(tmp_path, phantom, study_config):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "study"
    assert study(study_config, phantom, out, uri, "--shard", "0/4").returncode == 0
    only = study(study_config, phantom, out, uri, "--report-only")
    assert only.returncode == 0, only.stderr
    text = (out / "report" / "report.md").read_text()
    for job in JOBS[1:]:
        assert job in text
    assert not (out / "champion").exists()


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("variants=[unet, not_a_model]", "unknown variant"),
        ("baseline=danet", "baseline 'danet' is not among the variants"),
        ("folds=5", "fewer than the study's 5 folds"),
        ("variants=[unet, {name: danet, overrides: {train.epochs: 9}}]", "may not override 'train.epochs'"),
    ],
)
def test_bad_study_input_is_one_line_and_writes_nothing(tmp_path, phantom, study_config, override, expect):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "study"
    done = study(study_config, phantom, out, uri, override)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in done.stderr
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_a_folder_holding_another_study_is_refused(finished, phantom, study_config, tmp_path):
    out, uri, _ = finished
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    done = study(study_config, phantom, out, uri, "budget.iterations_per_epoch=4")
    assert done.returncode == 2
    assert "holds a different study" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
