"""`seg3d train --tracking-uri none`: a run without MLflow, in a process where MLflow cannot even be imported (as on a
GPU machine that carries only the wheels seg3d train needs, benchmarks/gpu/fetch_wheels.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.bundle import load_bundle
from pipeline.tracking.off import NoTracker, open_tracker, tracking_off
from tests.pipeline._training import TINY, phantom_data

ROOT = Path(__file__).resolve().parents[2]

# The command line a user types, in a fresh interpreter whose `import mlflow` fails; prints what it imported.
SCRIPT = """
    import json, sys
    sys.modules["mlflow"] = None  # Python's documented way to make an import fail
    from pipeline.cli import main

    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "mlflow": sys.modules.get("mlflow") is not None}))
"""


def seg3d_without_mlflow(args: list[str], cwd: Path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stdout


@pytest.mark.slow
def test_train_with_tracking_none_needs_no_mlflow_and_resumes_without_it(tmp_path):
    data = phantom_data(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(data), "--output", str(run)]
    overrides = [*TINY, "train.epochs=1", "train.iterations_per_epoch=2", "train.val_every=1"]
    result, out = seg3d_without_mlflow([*args, "--tracking-uri", "NONE", *overrides], cwd=tmp_path)
    assert result == {"code": 0, "mlflow": False}
    assert "not tracked" in out
    assert json.loads((run / "run.json").read_text())["tracking_uri"] == "none"
    assert json.loads((run / "run.json").read_text())["run_id"] is None
    assert not list(tmp_path.glob("*.db")), "no MLflow store may be created"
    bundle = load_bundle(run / "bundle")
    assert bundle.config.model.name == "attention_unet"
    assert (run / "per_case_dice.csv").read_text().startswith("case,")
    assert (run / "checkpoints" / "last.pt").exists()

    # --resume reads `none` from run.json: again no MLflow, no store.
    result, _ = seg3d_without_mlflow(["train", "--data", str(data), "--output", str(run), "--resume"], cwd=tmp_path)
    assert result == {"code": 0, "mlflow": False}
    assert not list(tmp_path.glob("*.db"))


def test_none_is_off_in_any_case_and_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_off("none") and tracking_off(" None ")
    assert not tracking_off(None) and not tracking_off("sqlite:///none.db") and not tracking_off("http://none:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")
    assert tracking_off(None) and isinstance(open_tracker(None, "x", tmp_path), NoTracker)
    assert not tracking_off("sqlite:///m.db"), "an explicit URI wins over the environment"
