"""Training without experiment tracking: `--tracking-uri none`, for a machine without MLflow (a GPU box that runs a
prepared check, an air-gapped workstation) or a run nobody will look up.

`open_tracker` is what training calls: MLflow's Tracker for any other URI, imported only then, and for `none` a
`NoTracker` that records nothing, so that `seg3d train` neither imports MLflow nor creates a store. Everything the run
writes to RUN_DIR (checkpoints, bundle, per-case CSV, plots) is written as with tracking; run.json keeps the `none`,
so `--resume` continues without tracking too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRACKING_OFF = "none"


def tracking_off(uri: str | None) -> bool:
    """True when `uri` (else $MLFLOW_TRACKING_URI, as resolve_tracking_uri reads it) is `none`, in any case."""
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    return chosen.strip().lower() == TRACKING_OFF


class NoTracker:
    """The Tracker's interface as training uses it, recording nothing; run_id stays None."""

    uri = TRACKING_OFF
    run_id: str | None = None

    def check(self) -> None:
        pass

    def start(self, run_name: str, tags: dict[str, str], run_id: str | None = None) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def logged_steps(self, key: str) -> set[int] | None:
        return None  # "cannot be asked": a resumed run sends nothing

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        pass

    def make_model(self, folder: Path, name: str) -> None:
        pass

    def log_table(self, columns: Mapping[str, list], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def register_model(self, artifact_path: str, name: str, *, alias: str | None = None) -> None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        pass


def open_tracker(uri: str | None, experiment: str, run_dir: Path):
    """A NoTracker for `none`; else pipeline.tracking.run's Tracker (which imports MLflow) for `uri`."""
    if tracking_off(uri):
        return NoTracker()
    from pipeline.tracking.run import Tracker

    return Tracker(uri, experiment, run_dir)
