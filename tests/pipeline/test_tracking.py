"""Tracker against real MLflow stores: an embedded sqlite file and a real `mlflow server` on 127.0.0.1.

Everything is read back through MLflow's own client, so a test passes only if what training logged is what a user
sees in the UI, the REST API or `models:/NAME/VERSION`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from pipeline.errors import Seg3dError
from pipeline.metric_queue import PENDING_FILE, REJECTED_FILE
from pipeline.tracking import Tracker, flatten_params
from pipeline.tracking.store import download_artifacts
from tests.mlflow_server import MlflowServer, record_http

ROOT = Path(__file__).resolve().parents[2]

CONFIG = {
    "model": {"name": "attention_unet", "channels": [16, 32, 64], "strides": (2, 2)},
    "train": {"lr": 0.001, "epochs": 3, "amp": True, "optimizer": {"name": "adamw", "betas": (0.9, 0.999)}},
    "seed": 7,
}
FLAT_CONFIG = {
    "model.name": "attention_unet",
    "model.channels": "[16, 32, 64]",
    "model.strides": "[2, 2]",
    "train.lr": "0.001",
    "train.epochs": "3",
    "train.amp": "True",
    "train.optimizer.name": "adamw",
    "train.optimizer.betas": "[0.9, 0.999]",
    "seed": "7",
}


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    # One database for the module: creating MLflow's tables costs seconds; each test uses its own experiment.
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite_store') / 'mlflow.db'}"


def make_bundle(folder: Path) -> dict[str, bytes]:
    """A stand-in for a model bundle: weights, resolved config and metadata, as bundle.py writes them."""
    files = {
        "model.safetensors": bytes(range(256)) * 4,
        "config.yaml": b"model:\n  name: attention_unet\n",
        "metadata.json": json.dumps({"classes": ["background", "liver"]}).encode(),
    }
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def fresh_python(script: str, **env: str) -> str:
    """The last line `script` prints in a new interpreter, started as the user's shell would start it: without the
    MLFLOW_DISABLE_TELEMETRY that the test session set (plus `env`)."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"} | env
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def log_full_run(tracker: Tracker, tmp_path: Path) -> tuple[str, dict[str, bytes], str | None]:
    """The calls a training job makes, in its order; returns (run id, bundle files, registered version)."""
    run_id = tracker.start("unet-fold0", tags={"fold": "0", "dataset": "Task03_Liver"})
    tracker.log_params(CONFIG)
    for step in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "val/dice": 0.2 * step}, step=step)
    summary = tmp_path / "summary.txt"
    summary.write_text("dice 0.4\n")
    tracker.log_artifact(summary, "reports")
    files = make_bundle(tmp_path / "bundle")
    tracker.log_artifacts(tmp_path / "bundle", "bundle")
    tracker.log_table({"case": ["liver_0", "liver_1"], "dice": [0.81, 0.77]}, "tables/dice.json")
    tracker.set_tags({"best_epoch": 2})
    version = tracker.register_model("bundle", "seg3d-test-liver")
    tracker.end()
    return run_id, files, version


# ----------------------------------------------------------------------------------------------------------------
# Pure functions, and imports that change nothing


def test_flatten_params_dotted_keys_lists_as_strings_and_truncation():
    assert flatten_params(CONFIG) == FLAT_CONFIG
    long = flatten_params({"notes": "x" * (MAX_PARAM_VAL_LENGTH + 10)})["notes"]
    assert len(long) == MAX_PARAM_VAL_LENGTH
    assert long.endswith("...")


def test_importing_the_tracking_modules_changes_no_environment_variable_and_no_logger_level():
    # mlflow is imported first: what its own import configures is MLflow's business, what is measured is what seg3d
    # adds. DO_NOT_TRACK keeps MLflow's telemetry off without the variable that the old import used to set.
    script = """
        import json, logging, os
        import mlflow

        def levels():
            names = {"mlflow.store.db.utils", "alembic", *logging.root.manager.loggerDict}
            return {name: logging.getLogger(name).level for name in names}

        env, before = dict(os.environ), levels()
        import pipeline.metric_queue, pipeline.tracking, pipeline.tracking.store
        after = levels()
        print(json.dumps({
            "environment": sorted(k for k in env.keys() | os.environ.keys() if env.get(k) != os.environ.get(k)),
            "levels": sorted(name for name in before if before[name] != after[name]),
        }))
    """
    assert json.loads(fresh_python(script, DO_NOT_TRACK="true")) == {"environment": [], "levels": []}


@pytest.mark.parametrize(("given", "expected"), [(None, "true"), ("false", "false")])
def test_the_seg3d_command_turns_mlflow_telemetry_off_unless_the_user_chose(given, expected):
    # The entry point, not an import, sets the process-wide default, before any command can import mlflow.
    script = """
        import os
        from pipeline.cli import main

        try:
            main(["--help"])
        except SystemExit:
            pass
        print(os.environ.get("MLFLOW_DISABLE_TELEMETRY"))
    """
    env = {} if given is None else {"MLFLOW_DISABLE_TELEMETRY": given}
    assert fresh_python(script, **env) == expected


# ----------------------------------------------------------------------------------------------------------------
# Embedded sqlite store


def test_sqlite_run_round_trip(sqlite_uri, tmp_path, capfd):
    tracker = Tracker(sqlite_uri, "sqlite-round-trip", tmp_path / "run")
    tracker.check()
    run_id, files, version = log_full_run(tracker, tmp_path)

    client = MlflowClient(tracking_uri=sqlite_uri, registry_uri=sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unet-fold0"
    assert {k: run.data.params[k] for k in FLAT_CONFIG} == FLAT_CONFIG
    assert run.data.tags["fold"] == "0" and run.data.tags["best_epoch"] == "2"
    assert [m.value for m in sorted(client.get_metric_history(run_id, "val/dice"), key=lambda m: m.step)] == (
        pytest.approx([0.0, 0.2, 0.4])
    )
    assert steps(client, run_id, "train/loss") == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"reports", "bundle", "tables"}
    table = json.loads(Path(client.download_artifacts(run_id, "tables/dice.json", str(tmp_path / "t"))).read_text())
    assert table["columns"] == ["case", "dice"]
    assert table["data"] == [["liver_0", 0.81], ["liver_1", 0.77]]
    # Artifacts sit beside the database, not in whatever directory the test ran from.
    assert Path(run.info.artifact_uri).is_relative_to(Path(sqlite_uri[len("sqlite:///") :]).parent)

    assert version == "1"
    assert read_folder(download_artifacts("models:/seg3d-test-liver/1", tmp_path / "dl", sqlite_uri)) == files
    assert not (tmp_path / "run" / PENDING_FILE).exists()
    assert "Creating initial MLflow database tables" not in capfd.readouterr().err


def test_sqlite_resume_same_run_continues_history(sqlite_uri, tmp_path):
    client = MlflowClient(tracking_uri=sqlite_uri)
    first = Tracker(sqlite_uri, "sqlite-resume", tmp_path)
    run_id = first.start("resumable", tags={})
    first.log_params(CONFIG)
    for step in range(3):
        first.log_metrics({"loss": 1.0 - 0.1 * step}, step=step)
    first.end("KILLED")
    assert client.get_run(run_id).info.status == "KILLED"

    second = Tracker(sqlite_uri, "sqlite-resume", tmp_path)
    assert second.start("resumable", tags={"resumed": "yes"}, run_id=run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    second.log_params(CONFIG)  # same values again: accepted, not an error
    for step in range(3, 5):
        second.log_metrics({"loss": 1.0 - 0.1 * step}, step=step)
    second.end()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed"] == "yes"
    assert steps(client, run_id, "loss") == [0, 1, 2, 3, 4]


def test_start_unknown_run_or_deleted_experiment_is_a_user_error(sqlite_uri, tmp_path):
    with pytest.raises(Seg3dError, match=r"run 0123456789abcdef does not exist at .*check the run id"):
        Tracker(sqlite_uri, "sqlite-errors", tmp_path).start("r", tags={}, run_id="0123456789abcdef")
    client = MlflowClient(tracking_uri=sqlite_uri)
    client.delete_experiment(client.create_experiment("sqlite-deleted"))
    with pytest.raises(Seg3dError, match=r"'sqlite-deleted' .* is deleted; restore it"):
        Tracker(sqlite_uri, "sqlite-deleted", tmp_path).start("r", tags={})


def test_context_manager_ends_failed_or_killed(sqlite_uri, tmp_path):
    client = MlflowClient(tracking_uri=sqlite_uri)
    with pytest.raises(RuntimeError), Tracker(sqlite_uri, "sqlite-context", tmp_path) as tracker:
        failed = tracker.start("crashes", tags={})
        raise RuntimeError("out of memory")
    with pytest.raises(KeyboardInterrupt), Tracker(sqlite_uri, "sqlite-context", tmp_path) as tracker:
        killed = tracker.start("interrupted", tags={})
        raise KeyboardInterrupt
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(killed).info.status == "KILLED"


def test_refused_metric_is_kept_aside_and_does_not_block_the_rest(sqlite_uri, tmp_path, caplog):
    tracker = Tracker(sqlite_uri, "sqlite-refused", tmp_path)
    run_id = tracker.start("bad-key", tags={})
    with caplog.at_level(logging.WARNING, logger="seg3d.tracking"):
        tracker.log_metrics({"loss": 0.5, "../escape": 1.0}, step=0)  # MLflow refuses keys that leave the run
    tracker.log_metrics({"loss": 0.4}, step=1)
    tracker.end()

    assert steps(MlflowClient(tracking_uri=sqlite_uri), run_id, "loss") == [0, 1]
    rejected = [json.loads(line) for line in (tmp_path / REJECTED_FILE).read_text().splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in rejected] == [("../escape", 0, 1.0)]
    assert not (tmp_path / PENDING_FILE).exists()
    assert REJECTED_FILE in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Real tracking server


@pytest.mark.slow  # the first server test pays the server's start-up (~10 s)
def test_server_run_round_trip(mlflow_server, tmp_path, monkeypatch):
    tracker = Tracker(mlflow_server, "server-round-trip", tmp_path / "run")
    tracker.check()
    run_id, files, version = log_full_run(tracker, tmp_path)

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    assert {k: run.data.params[k] for k in FLAT_CONFIG} == FLAT_CONFIG
    assert steps(client, run_id, "val/dice") == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run_id, "bundle")} == {f"bundle/{name}" for name in files}
    assert [a.path for a in client.list_artifacts(run_id, "tables")] == ["tables/dice.json"]

    assert version == "1"
    model_version = client.get_model_version("seg3d-test-liver", version)
    assert model_version.run_id == run_id
    # MLflow's own call, as a user outside seg3d makes it: models:/ resolves through the process-wide URIs.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    model_uri = f"models:/seg3d-test-liver/{version}"
    downloaded = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "m"))
    assert read_folder(Path(downloaded)) == files


@pytest.mark.slow
def test_server_dies_mid_run_metrics_wait_and_arrive_once(tmp_path, caplog, monkeypatch):
    server = MlflowServer(tmp_path / "server")
    try:
        uri = server.start()
        run_dir = tmp_path / "run"
        tracker = Tracker(uri, "server-dies", run_dir)
        tracker.check()
        run_id = tracker.start("survivor", tags={})
        tracker.log_metrics({"loss": 1.0, "dice": 0.1}, step=0)

        server.stop(kill=True)
        sent = record_http(monkeypatch)
        with caplog.at_level(logging.WARNING, logger="seg3d.tracking"):
            for step in (1, 2):
                tracker.log_metrics({"loss": 1.0 / (step + 1), "dice": 0.1 * (step + 1)}, step=step)
        # One request per call, under the bounds (not MLflow's 7 retries and 120 s), and the server reported dead.
        assert [r.url for r in sent] == [f"{uri}/api/2.0/mlflow/runs/log-batch"] * 2
        assert all(r.retries <= 1 and 0 < r.timeout <= 10 for r in sent)
        assert f"MLflow at {uri} did not take metrics" in caplog.text and "Connection refused" in caplog.text
        pending = run_dir / PENDING_FILE
        assert str(pending) in caplog.text
        waiting = [json.loads(line) for line in pending.read_text().splitlines()]
        assert [(r["run_id"], r["key"], r["step"]) for r in waiting] == [
            (run_id, "loss", 1),
            (run_id, "dice", 1),
            (run_id, "loss", 2),
            (run_id, "dice", 2),
        ]

        server.start()  # same port, same backend store
        tracker.log_metrics({"loss": 0.25, "dice": 0.4}, step=3)
        assert not pending.exists()
        tracker.end()

        client = MlflowClient(tracking_uri=uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        for key in ("loss", "dice"):
            assert steps(client, run_id, key) == [0, 1, 2, 3]
        history = sorted(client.get_metric_history(run_id, "dice"), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    finally:
        server.stop(kill=True)
