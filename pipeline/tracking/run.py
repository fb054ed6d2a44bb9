"""Experiment tracking with MLflow: the Tracker, one training job's run from start to end.

Training must never die because a tracking server hiccups, and no number may vanish quietly either. So every call
after `Tracker.start` is best effort: a failure becomes a warning on the "seg3d.tracking" logger, and metrics that
could not be sent wait in a MetricQueue (RUN_DIR/mlflow_pending.jsonl, pipeline/metric_queue.py) until a later call
(or `end`) gets through. What can be checked before any compute (is the server there, is the sqlite folder
writable) is checked by `Tracker.check` and raises `Seg3dError`, so a typo in --tracking-uri costs seconds, not an
epoch. Where the store is and on what terms MLflow is called (bounded HTTP, quiet set-up) is
pipeline/tracking/store.py; the package pipeline.tracking is the only one of the project that imports mlflow.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from pipeline.errors import Seg3dError, one_line
from pipeline.metric_queue import MetricQueue
from pipeline.tracking.store import bounded_http, check_store, quiet_store_setup, resolve_tracking_uri, sqlite_path

log = logging.getLogger("seg3d.tracking")

END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params and tags
_SERVER_REFUSED = (400, 404)  # the server answered and said no: re-sending the same request cannot help


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts as MLflow params: dotted keys ("train.lr"), every value a string within MLflow's limit.

    MLflow params are flat strings; flattening keeps each setting searchable in the UI (`params.train.lr > 0.01`).
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = str(list(value)) if isinstance(value, (list, tuple)) else str(value)
        flat[name] = _truncate(text, MAX_PARAM_VAL_LENGTH)
    return flat


class Tracker:
    """One MLflow run of a training job.

    Every call after start() is best effort: a failure logs a warning and training goes on. Metrics that could not
    be sent wait in a MetricQueue in RUN_DIR (mlflow_pending.jsonl) and are re-sent, in order and with their
    original timestamps (so a re-send is idempotent), at the next successful call and at end(). Metrics the server
    refuses outright (bad key, deleted run) would block that queue forever; they go to RUN_DIR/mlflow_rejected.jsonl
    with a warning instead.

    Used as a context manager, the run ends FAILED on an exception, KILLED on Ctrl-C and FINISHED otherwise.
    """

    def __init__(self, uri: str | None, experiment: str, run_dir: Path):
        self.uri = resolve_tracking_uri(uri)
        self.experiment = experiment
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._ended = False
        self._attached = False
        self._mlflow_client: mlflow.MlflowClient | None = None
        self._queue = MetricQueue(
            self.run_dir, send=self._send_metrics, refused=_refused, destination=f"MLflow at {self.uri}"
        )

    @property
    def _client(self) -> mlflow.MlflowClient:
        # Made on first use: for sqlite, MLflow creates the database (and its folders) right away, which must not
        # happen before check() has had its say.
        if self._mlflow_client is None:
            with quiet_store_setup():
                self._mlflow_client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._mlflow_client

    @property
    def pending_file(self) -> Path:
        return self._queue.pending_file

    @property
    def rejected_file(self) -> Path:
        return self._queue.rejected_file

    # ----------------------------------------------------------------------------------------------------------
    # Before any compute: errors here are the user's to fix, so they raise.

    def check(self) -> None:
        """Fail within seconds, before training starts, when the tracking store cannot be reached or written."""
        check_store(self.uri)

    def start(self, run_name: str, tags: dict[str, str], run_id: str | None = None) -> str:
        """Start a new run in the experiment (created if missing), or resume `run_id`; returns the run id.

        A resumed run keeps its id, so its metric history continues where it stopped and its status goes back to
        RUNNING. Metrics left in RUN_DIR/mlflow_pending.jsonl by an earlier, interrupted process are sent now.
        """
        if self.run_id is not None:
            raise RuntimeError(f"this Tracker already started run {self.run_id}; create one Tracker per run")
        try:
            with bounded_http():
                if run_id is None:
                    run = self._client.create_run(
                        self._experiment_id(), run_name=run_name, tags=resolve_tags(_as_tag_values(tags))
                    )
                else:
                    run = self._resume(run_id)
                    if tags:
                        self._send_tags(run_id, tags)
        except Seg3dError:
            raise
        except Exception as e:
            raise Seg3dError(
                f"could not start an MLflow run in experiment {self.experiment!r} at {self.uri} ({one_line(e)}); check"
                " --tracking-uri, or omit it to use the embedded sqlite store"
            ) from e
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self._ended = False
        self._queue.flush()
        return self.run_id

    def _experiment_id(self) -> str:
        experiment = self._client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise Seg3dError(
                    f"MLflow experiment {self.experiment!r} at {self.uri} is deleted; restore it with `mlflow"
                    f" experiments restore --experiment-id {experiment.experiment_id}`, or choose another experiment"
                    " name"
                )
            return experiment.experiment_id
        try:
            return self._client.create_experiment(self.experiment, artifact_location=self._artifact_location())
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it a moment ago
                raise
            return self._client.get_experiment_by_name(self.experiment).experiment_id

    def _artifact_location(self) -> str | None:
        # MLflow would put sqlite-store artifacts under ./mlruns of whatever the working directory is; keep them
        # beside the database instead (the layout `mlflow server` uses), so the store is one movable folder.
        db = sqlite_path(self.uri)
        if db is None or not db.is_absolute():
            return None
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.experiment).strip("_") or "experiment"
        return str(db.parent / "mlartifacts" / slug)

    def _resume(self, run_id: str, set_running: bool = True):
        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise Seg3dError(
                    f"MLflow run {run_id} does not exist at {self.uri}; check the run id and --tracking-uri"
                ) from None
            raise
        if run.info.lifecycle_stage == "deleted":
            raise Seg3dError(
                f"MLflow run {run_id} at {self.uri} is deleted; restore it with `mlflow runs restore --run-id"
                f" {run_id}`, or start a new run"
            )
        if set_running:
            self._client.update_run(run_id, status="RUNNING")
        return run

    def attach(self, run_id: str) -> str:
        """Log into an existing run without touching its status (evaluation results added to a finished
        training run must leave it FINISHED, and a FAILED one FAILED); end() then only sends what is pending."""
        if self.run_id is not None:
            raise RuntimeError(f"this Tracker already started run {self.run_id}; create one Tracker per run")
        try:
            with bounded_http():
                run = self._resume(run_id, set_running=False)
        except Seg3dError:
            raise
        except Exception as e:
            raise Seg3dError(
                f"could not open MLflow run {run_id} at {self.uri} ({one_line(e)}); check --tracking-uri"
            ) from e
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._ended, self._attached = False, True
        self._queue.flush()
        return self.run_id

    # ----------------------------------------------------------------------------------------------------------
    # During training: best effort.

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as flat params; values an earlier attempt of a resumed run already holds are kept.

        MLflow refuses to change a logged param, and one refusal would drop the whole batch, so only new keys are
        sent and changed values are reported.
        """
        run_id = self._require_run()
        flat = flatten_params(params)

        def send() -> None:
            existing = self._client.get_run(run_id).data.params
            changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
            new = [Param(k, v) for k, v in flat.items() if k not in existing]
            for i in range(0, len(new), _PARAMS_PER_BATCH):
                self._client.log_batch(run_id, params=new[i : i + _PARAMS_PER_BATCH])
            if changed:
                log.warning(
                    "MLflow run %s already holds other values for params %s; MLflow keeps the first value and the new"
                    " ones are not logged",
                    run_id,
                    ", ".join(changed),
                )

        self._attempt("log_params", send)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics at `step`; if MLflow cannot take them now, they wait in the pending file, in order."""
        run_id = self._require_run()
        timestamp = int(time.time() * 1000)
        records = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                log.warning("metric %r = %r at step %d is not a number; not logged to MLflow", key, value, step)
                continue
            records.append({"run_id": run_id, "key": key, "value": number, "step": int(step), "timestamp": timestamp})
        if records:
            self._queue.flush(records)

    def logged_steps(self, key: str) -> set[int] | None:
        """The steps of metric `key` the store already holds for this run (None when it cannot be asked), so a
        resumed job can send exactly the epochs a crash kept from the store."""
        try:
            with bounded_http():
                history = self._client.get_metric_history(self._require_run(), key)
        except Exception as e:
            log.warning("could not read the metric history of %r from %s (%s)", key, self.uri, one_line(e))
            return None
        return {int(m.step) for m in history}

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        run_id = self._require_run()
        self._attempt(
            f"log_artifact of {path} (the file stays there)",
            lambda: self._client.log_artifact(run_id, str(path), artifact_path),
        )

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        run_id = self._require_run()
        self._attempt(
            f"log_artifacts of {folder} (the folder stays there)",
            lambda: self._client.log_artifacts(run_id, str(folder), artifact_path),
        )

    def make_model(self, folder: Path, name: str) -> None:
        """Make the bundle `folder` an MLflow pyfunc model in place (pipeline/tracking/pyfunc.py), before it is
        logged; a failure (a full disk) is a warning: the folder is still a seg3d bundle."""
        from pipeline.tracking.pyfunc import write_mlmodel

        try:
            write_mlmodel(folder, name=name)
        except OSError as e:
            log.warning("could not write the MLflow model files into %s (%s); logged as a seg3d bundle", folder, e)

    def log_table(self, columns: Mapping[str, list], artifact_file: str) -> None:
        """Log a table (column name -> values) as a JSON artifact that the MLflow UI shows as a table."""
        run_id = self._require_run()

        def send() -> None:
            with warnings.catch_warnings():  # MLflow's own pandas usage warns about pandas 4; not the user's concern
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                self._client.log_table(run_id, dict(columns), artifact_file)

        self._attempt(f"log_table {artifact_file}", send)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        run_id = self._require_run()
        self._attempt("set_tags", lambda: self._send_tags(run_id, tags))

    def register_model(self, artifact_path: str, name: str, *, alias: str | None = None) -> str | None:
        """Register the run's artifact folder `artifact_path` (a model bundle or ensemble) as a new version of model
        `name`; with `alias` (e.g. "champion"), the new version takes that alias (MLflow's aliases, not the deprecated
        stages; a version that held it loses it), so `models:/NAME@ALIAS` downloads it.

        The bundle is a plain folder of safetensors + config, not an MLflow-flavoured model, and MLflow 3's
        `mlflow.register_model("runs:/...")` only finds logged models; so the version is created directly from the
        folder's artifact URI, which makes `models:/NAME/VERSION` download exactly that folder. Returns the version,
        or None (with a warning) when the registry could not be reached.
        """
        run_id = self._require_run()
        version: list[str] = []

        def send() -> None:
            run = self._client.get_run(run_id)
            try:
                with quiet_store_setup():  # MLflow makes the registry's store on its first registry call
                    self._client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"
            # OSS registries create file-backed versions READY at once; waiting would only print an INFO line.
            model_version = self._client.create_model_version(name, source=source, run_id=run_id, await_creation_for=0)
            version.append(str(model_version.version))

        self._attempt(f"register_model {name!r} from {artifact_path!r}", send)
        if version and alias is not None:  # the version exists either way; a failed alias is its own warning
            self._attempt(
                f"set_registered_model_alias {alias!r} on version {version[0]} of {name!r}",
                lambda: self._client.set_registered_model_alias(name, alias, version[0]),
            )
        return version[0] if version else None

    def end(self, status: str = "FINISHED") -> None:
        """Send what is pending, then close the run with `status`; a second call does nothing."""
        if status not in END_STATUSES:
            raise ValueError(f"unknown MLflow run status {status!r}; use one of {', '.join(END_STATUSES)}")
        if self.run_id is None or self._ended:
            return
        self._ended = True
        if not self._queue.flush():
            log.warning(
                "run %s ends with metrics still in %s; they are sent when the run is resumed from this run folder",
                self.run_id,
                self.pending_file,
            )
        run_id = self.run_id
        if self._attached:
            return  # attached to someone else's run: its status is not ours to set
        self._attempt(f"end of run {run_id} as {status}", lambda: self._client.set_terminated(run_id, status))

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    # ----------------------------------------------------------------------------------------------------------
    # Internals

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("Tracker.start() must be called before logging")
        return self.run_id

    def _attempt(self, what: str, call: Callable[[], None]) -> bool:
        """Run one MLflow call; a failure becomes a warning, a success is the moment to send what is pending."""
        try:
            with bounded_http():
                call()
        except Exception as e:
            log.warning("MLflow %s failed at %s (%s); training goes on", what, self.uri, one_line(e))
            return False
        if self._queue.waiting():
            self._queue.flush()
        return True

    def _send_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, v) for k, v in _as_tag_values(tags).items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[i : i + _PARAMS_PER_BATCH])

    def _send_metrics(self, run_id: str, records: list[dict]) -> None:
        """The MetricQueue's sender: one log_batch of queue records, under the bounded HTTP settings."""
        metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in records]
        with bounded_http():
            self._client.log_batch(run_id, metrics=metrics)


def _as_tag_values(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refused(error: Exception) -> bool:
    """True when the server answered and rejected the request (bad key, deleted run): retrying cannot help."""
    return isinstance(error, MlflowException) and error.get_http_status_code() in _SERVER_REFUSED
