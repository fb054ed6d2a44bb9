"""Experiment tracking with MLflow: the only package of the project that imports mlflow.

- `run`: the Tracker, one job's MLflow run from start to end (best effort after the start: a failure is a warning,
  metrics wait in a pipeline.metric_queue.MetricQueue until MLflow takes them).
- `store`: which store, whether it answers before any compute, the terms of every MLflow call (bounded HTTP, no
  table-creation chatter), and downloads of `runs:/` and `models:/` artifacts.
- `off`: `--tracking-uri none`, training with a tracker that records nothing and imports no MLflow.

Importing it changes nothing in the process (no environment variable, no logger level), and imports MLflow only when
a name of `run` or `store` is first used (PEP 562), so that `pipeline.tracking.off` works where MLflow is absent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.tracking.run import END_STATUSES, Tracker, flatten_params
    from pipeline.tracking.store import DEFAULT_TRACKING_URI, check_store, download_artifacts, resolve_tracking_uri

_HOMES = {
    "END_STATUSES": "run",
    "Tracker": "run",
    "flatten_params": "run",
    "DEFAULT_TRACKING_URI": "store",
    "check_store": "store",
    "download_artifacts": "store",
    "resolve_tracking_uri": "store",
}

__all__ = [
    "DEFAULT_TRACKING_URI",
    "END_STATUSES",
    "Tracker",
    "check_store",
    "download_artifacts",
    "flatten_params",
    "resolve_tracking_uri",
]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'pipeline.tracking' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.tracking.{_HOMES[name]}"), name)
