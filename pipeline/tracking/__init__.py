"""Experiment tracking with MLflow: the only package of the project that imports mlflow.

- `run`: the Tracker, one job's MLflow run from start to end (best effort after the start: a failure is a warning,
  metrics wait in a pipeline.metric_queue.MetricQueue until MLflow takes them).
- `store`: which store, whether it answers before any compute, the terms of every MLflow call (bounded HTTP, no
  table-creation chatter), and downloads of `runs:/` and `models:/` artifacts.

Importing it changes nothing in the process (no environment variable, no logger level).
"""

from pipeline.tracking.run import END_STATUSES, Tracker, flatten_params
from pipeline.tracking.store import DEFAULT_TRACKING_URI, check_store, download_artifacts, resolve_tracking_uri

__all__ = [
    "DEFAULT_TRACKING_URI",
    "END_STATUSES",
    "Tracker",
    "check_store",
    "download_artifacts",
    "flatten_params",
    "resolve_tracking_uri",
]
