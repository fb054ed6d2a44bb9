"""`seg3d doctor` as the Docker HEALTHCHECK runs it: the real command, real folders, real MLflow stores and servers."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.doctor import FAIL, OK, WARN, run_checks

SEG3D = Path(sys.executable).with_name("seg3d")
# Far above the doctor's own bound (about 8 s for the tracking store) and far below MLflow's HTTP client, which would
# retry a dead server for minutes: a doctor that hangs fails here instead of stalling the suite.
HANG_S = 60


def _doctor(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
    }
    for name in ("MONAI_DATA_DIRECTORY", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return subprocess.run(
        [str(SEG3D), "doctor", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=HANG_S
    )


def _lines(stdout: str) -> dict[str, tuple[str, str]]:
    """check name -> (status word, detail)."""
    out = {}
    for line in stdout.splitlines():
        status, name, *detail = line.split(maxsplit=2)
        if status in ("ok", "warn", "FAIL"):
            out[name] = (status, detail[0] if detail else "")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_healthy_setup_names_the_installed_versions_and_exits_0(tmp_path):
    db = tmp_path / "store" / "mlflow.db"
    result = _doctor(tmp_path, "--output", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{db}")
    assert SEG3D.is_file()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result.stdout)
    assert lines["python"] == ("ok", f"{platform.python_version()} ({sys.executable})")
    for dist, shown in [("torch", "torch"), ("monai", "MONAI"), ("mlflow", "MLflow"), ("nibabel", "nibabel")]:
        assert lines[shown] == ("ok", version(dist))
    assert lines["SimpleITK"] == ("ok", version("SimpleITK"))
    assert lines["ONNX"][1] == f"onnx {version('onnx')}, onnxruntime {version('onnxruntime')}, " + (
        f"onnxscript {version('onnxscript')}"
    )
    assert lines["tracking"][0] == "ok" and str(db) in lines["tracking"][1]
    assert lines["output"][0] == "ok" and str(tmp_path / "out") in lines["output"][1]
    # The cache folders come from the environment variables, not from defaults.
    assert str(tmp_path / "torch_home") in lines["TORCH_HOME"][1]
    assert str(tmp_path / "mpl") in lines["MPLCONFIGDIR"][1]
    assert "precision" in lines and lines["precision"][1].startswith("`seg3d infer --precision auto` uses ")
    assert result.stdout.rstrip().endswith("warning(s)") and "FAILED" not in result.stdout
    assert not (tmp_path / "out").exists() and not db.exists()  # the doctor looks, it creates nothing


@pytest.mark.slow
def test_dead_tracking_server_fails_within_the_bound(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    result = _doctor(tmp_path, "--output", str(tmp_path), "--tracking-uri", uri)
    assert result.returncode == 1
    status, detail = _lines(result.stdout)["tracking"]
    assert status == "FAIL" and uri in detail and "does not answer" in detail
    assert "check(s) FAILED" in result.stdout


@pytest.mark.slow
def test_live_tracking_server_answers(mlflow_server, tmp_path):
    result = _doctor(tmp_path, "--output", str(tmp_path), "--tracking-uri", mlflow_server)
    assert result.returncode == 0, result.stdout
    assert _lines(result.stdout)["tracking"] == ("ok", f"{mlflow_server}: tracking server answers")


def test_output_under_a_regular_file_fails_with_exit_1(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "results"
    code = main(["doctor", "--output", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 1
    status, detail = _lines(capsys.readouterr().out)["output"]
    assert status == "FAIL" and f"{tmp_path / 'a_file'} is a file" in detail


@pytest.mark.slow
def test_existing_mlflow_store_answers_and_a_foreign_file_fails(tmp_path):
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "doctor-test", tmp_path)
    tracker.start("r", tags={})
    tracker.end()
    check = {c.name: c for c in run_checks(output=tmp_path, tracking_uri=uri).checks}["tracking"]
    assert (check.status, check.detail) == (OK, f"{uri}: MLflow database answers")

    (tmp_path / "notes.db").write_text("not a database, just notes\n" * 100)
    report = run_checks(output=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'notes.db'}")
    check = {c.name: c for c in report.checks}["tracking"]
    assert check.status == FAIL and "not a database" in check.detail and not report.ok


def test_unwritable_cache_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "a_file" / "mpl"))
    monkeypatch.setenv("MONAI_DATA_DIRECTORY", str(tmp_path / "monai"))
    report = run_checks(output=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    checks = {c.name: c for c in report.checks}
    assert checks["MPLCONFIGDIR"].status == WARN and "set MPLCONFIGDIR" in checks["MPLCONFIGDIR"].detail
    assert checks["MONAI_DATA_DIRECTORY"].status == OK
    assert report.ok  # warnings only: the health check passes
