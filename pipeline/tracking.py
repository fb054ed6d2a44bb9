"""Experiment tracking with MLflow: the only module of the project that imports mlflow.

Training must never die because a tracking server hiccups, and no number may vanish quietly either. So every
call after `Tracker.start` is best effort: a failure becomes a warning on the "seg3d.tracking" logger, and metrics
that could not be sent wait in RUN_DIR/mlflow_pending.jsonl until a later call (or `end`) gets through. What can
be checked before any compute (is the server there, is the sqlite folder writable) is checked by `Tracker.check`
and raises `Seg3dError`, so a typo in --tracking-uri costs seconds, not an epoch.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import Seg3dError

# Telemetry starts when mlflow is imported, so this must come first; the machines have no internet anyway.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

# Creating the sqlite tables on first use is announced at INFO; users asked for a run, not for alembic news.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

log = logging.getLogger("seg3d.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PENDING_FILE = "mlflow_pending.jsonl"
REJECTED_FILE = "mlflow_rejected.jsonl"
END_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's HTTP client retries 7 times with exponential back-off and a 120 s timeout: a dead server would stall
# every training step for minutes. These bounds apply only while a Tracker talks to MLflow, and only where the
# user has not set the variable.
_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_CHECK_TIMEOUT_S = 5.0
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params and tags
_SERVER_REFUSED = (400, 404)  # the server answered and said no: re-sending the same request cannot help


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to use: the argument, else MLFLOW_TRACKING_URI, else ./mlflow.db (embedded sqlite).

    A relative sqlite path is made absolute now, because the training code may change the working directory later
    and MLflow would then open (and create) a different database.
    """
    chosen = (uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI).strip()
    if chosen.startswith("sqlite:///"):
        path, sep, query = chosen[len("sqlite:///") :].partition("?")
        if path and path != ":memory:" and not Path(path).is_absolute():
            chosen = f"sqlite:///{Path(path).resolve()}{sep}{query}"
    return chosen


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


def download_artifacts(uri: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Download an MLflow artifact URI (`models:/NAME/VERSION`, `runs:/ID/path`) into `dst`; returns the local path.

    MLflow resolves `models:/` through the process-wide registry URI and ignores the one passed to it, so the
    tracking URI is put into the environment for the duration of the call.
    """
    resolved = resolve_tracking_uri(tracking_uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        with _scoped_env({"MLFLOW_TRACKING_URI": resolved, "MLFLOW_REGISTRY_URI": resolved}), _bounded_http():
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=resolved, registry_uri=resolved
            )
    except Exception as e:
        raise Seg3dError(
            f"could not download {uri} from MLflow at {resolved} ({_brief(e)}); check the model name and version in"
            " the MLflow UI, and --tracking-uri"
        ) from e
    return Path(local)


class Tracker:
    """One MLflow run of a training job.

    Every call after start() is best effort: a failure logs a warning and training goes on. Metrics that could not
    be sent are appended to RUN_DIR/mlflow_pending.jsonl (one JSON object per line: run_id, key, value, step,
    timestamp) and re-sent, in order and with their original timestamps (so a re-send is idempotent), at the next
    successful call and at end(). Metrics the server refuses outright (bad key, deleted run) would block that queue
    forever; they go to RUN_DIR/mlflow_rejected.jsonl with a warning instead.

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

    @property
    def _client(self) -> mlflow.MlflowClient:
        # Made on first use: for sqlite, MLflow creates the database (and its folders) right away, which must not
        # happen before check() has had its say.
        if self._mlflow_client is None:
            self._mlflow_client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._mlflow_client

    @property
    def pending_file(self) -> Path:
        return self.run_dir / PENDING_FILE

    @property
    def rejected_file(self) -> Path:
        return self.run_dir / REJECTED_FILE

    # ----------------------------------------------------------------------------------------------------------
    # Before any compute: errors here are the user's to fix, so they raise.

    def check(self) -> None:
        """Fail within seconds, before training starts, when the tracking store cannot be reached or written."""
        scheme = urlparse(self.uri).scheme
        if scheme in ("http", "https"):
            self._check_server()
        elif scheme == "sqlite":
            path = self.uri[len("sqlite:///") :].partition("?")[0]
            if path and path != ":memory:":
                self._check_writable(Path(path))
        elif scheme == "file":
            self._check_writable(Path(urllib.request.url2pathname(urlparse(self.uri).path)))

    def _check_server(self) -> None:
        # Asks the tracking API itself rather than /health, so that a URI pointing at some other web service fails
        # here too. urllib with a short timeout: MLflow's own client would retry for minutes.
        url = f"{self.uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
        request = urllib.request.Request(url, headers=_auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=_CHECK_TIMEOUT_S) as response:
                json.load(response)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise Seg3dError(
                    f"MLflow tracking server at {self.uri} refused access (HTTP {e.code}); set MLFLOW_TRACKING_USERNAME"
                    " and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or omit --tracking-uri to use the"
                    " embedded sqlite store"
                ) from None
            raise Seg3dError(
                f"{self.uri} is not an MLflow tracking server (HTTP {e.code} from {url}); point --tracking-uri at an"
                " `mlflow server`, or omit --tracking-uri to use the embedded sqlite store"
            ) from None
        except (OSError, ValueError) as e:  # URLError, connection refused, timeout, garbage instead of JSON
            reason = getattr(e, "reason", None) or e
            raise Seg3dError(
                f"MLflow tracking server at {self.uri} does not answer ({reason}); start it, or omit --tracking-uri"
                " to use the embedded sqlite store"
            ) from None

    def _check_writable(self, store: Path) -> None:
        # MLflow creates missing folders itself, so the nearest existing one is the one that must be writable.
        folder = store.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise Seg3dError(
                f"{folder} is a file, so the MLflow store {self.uri} cannot be made in it; choose another"
                " --tracking-uri"
            )
        blocked = store if store.exists() and not os.access(store, os.W_OK) else None
        if blocked is None and not os.access(folder, os.W_OK):
            blocked = folder
        if blocked is not None:
            raise Seg3dError(
                f"MLflow store {self.uri} cannot be written ({blocked} is read-only); fix its permissions, or choose"
                " another --tracking-uri"
            )

    def start(self, run_name: str, tags: dict[str, str], run_id: str | None = None) -> str:
        """Start a new run in the experiment (created if missing), or resume `run_id`; returns the run id.

        A resumed run keeps its id, so its metric history continues where it stopped and its status goes back to
        RUNNING. Metrics left in RUN_DIR/mlflow_pending.jsonl by an earlier, interrupted process are sent now.
        """
        if self.run_id is not None:
            raise RuntimeError(f"this Tracker already started run {self.run_id}; create one Tracker per run")
        try:
            with _bounded_http():
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
                f"could not start an MLflow run in experiment {self.experiment!r} at {self.uri} ({_brief(e)}); check"
                " --tracking-uri, or omit it to use the embedded sqlite store"
            ) from e
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self._ended = False
        self._flush_pending()
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
        if not self.uri.startswith("sqlite:///"):
            return None
        db = Path(self.uri[len("sqlite:///") :].partition("?")[0])
        if not db.is_absolute():
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
            with _bounded_http():
                run = self._resume(run_id, set_running=False)
        except Seg3dError:
            raise
        except Exception as e:
            raise Seg3dError(
                f"could not open MLflow run {run_id} at {self.uri} ({_brief(e)}); check --tracking-uri"
            ) from e
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._ended, self._attached = False, True
        self._flush_pending()
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
            self._flush_pending(records)

    def logged_steps(self, key: str) -> set[int] | None:
        """The steps of metric `key` the store already holds for this run (None when it cannot be asked), so a
        resumed job can send exactly the epochs a crash kept from the store."""
        try:
            with _bounded_http():
                history = self._client.get_metric_history(self._require_run(), key)
        except Exception as e:
            log.warning("could not read the metric history of %r from %s (%s)", key, self.uri, _brief(e))
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

    def register_model(self, artifact_path: str, name: str) -> str | None:
        """Register the run's artifact folder `artifact_path` (a model bundle) as a new version of model `name`.

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
                self._client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"
            # OSS registries create file-backed versions READY at once; waiting would only print an INFO line.
            model_version = self._client.create_model_version(name, source=source, run_id=run_id, await_creation_for=0)
            version.append(str(model_version.version))

        self._attempt(f"register_model {name!r} from {artifact_path!r}", send)
        return version[0] if version else None

    def end(self, status: str = "FINISHED") -> None:
        """Send what is pending, then close the run with `status`; a second call does nothing."""
        if status not in END_STATUSES:
            raise ValueError(f"unknown MLflow run status {status!r}; use one of {', '.join(END_STATUSES)}")
        if self.run_id is None or self._ended:
            return
        self._ended = True
        if not self._flush_pending():
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
            with _bounded_http():
                call()
        except Exception as e:
            log.warning("MLflow %s failed at %s (%s); training goes on", what, self.uri, _brief(e))
            return False
        if self.pending_file.exists():
            self._flush_pending()
        return True

    def _send_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, v) for k, v in _as_tag_values(tags).items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[i : i + _PARAMS_PER_BATCH])

    def _send_metric_records(self, run_id: str, records: list[dict]) -> None:
        metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in records]
        self._client.log_batch(run_id, metrics=metrics)

    def _flush_pending(self, new: list[dict] | None = None) -> bool:
        """Send the pending metrics, oldest first, then `new`; True when nothing is left waiting.

        Whatever cannot be sent now is written back to the pending file, in order. Records keep their original
        timestamps, so a batch that the server stored but whose answer got lost is not stored twice when re-sent
        (MLflow drops exact duplicates).
        """
        queued = self._read_pending()
        records = queued + (new or [])
        if not records:
            return True
        unsent, refused, error = self._deliver(records)
        if refused:
            self._reject(refused, error)
        if unsent:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.pending_file.with_name(PENDING_FILE + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in unsent), encoding="utf-8")
            tmp.replace(self.pending_file)
            steps = sorted({r["step"] for r in unsent})
            log.warning(
                "MLflow did not take metrics at %s (%s); %d metrics of steps %s..%s wait in %s and are re-sent at the"
                " next successful call or at the end of the run",
                self.uri,
                error,
                len(unsent),
                steps[0],
                steps[-1],
                self.pending_file,
            )
            return False
        if self.pending_file.exists():
            self.pending_file.unlink()
        if queued:
            log.info("sent %d pending metrics from %s to MLflow at %s", len(queued), self.pending_file, self.uri)
        return True

    def _deliver(self, records: list[dict]) -> tuple[list[dict], list[dict], str]:
        """Send records in order; returns (not sent because MLflow did not answer, refused by MLflow, last error).

        Stops at the first unanswered batch, so a dead server costs one bounded request per call. A refused batch
        is re-sent record by record, so one bad key does not take a whole step's metrics with it.
        """
        batches: list[list[dict]] = []
        for record in records:  # consecutive records of one run, at most one MLflow batch each
            last = batches[-1] if batches else None
            if last and last[0]["run_id"] == record["run_id"] and len(last) < _METRICS_PER_BATCH:
                last.append(record)
            else:
                batches.append([record])
        refused: list[dict] = []
        error = ""
        for index, batch in enumerate(batches):
            try:
                with _bounded_http():
                    self._send_metric_records(batch[0]["run_id"], batch)
                continue
            except Exception as e:
                error = _brief(e)
                if not _refused(e):
                    return [r for b in batches[index:] for r in b], refused, error
            for position, record in enumerate(batch):
                try:
                    with _bounded_http():
                        self._send_metric_records(record["run_id"], [record])
                except Exception as e:
                    error = _brief(e)
                    if not _refused(e):
                        return batch[position:] + [r for b in batches[index + 1 :] for r in b], refused, error
                    refused.append(record)
        return [], refused, error

    def _read_pending(self) -> list[dict]:
        if not self.pending_file.exists():
            return []
        records = []
        for number, line in enumerate(self.pending_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short when an earlier process was killed mid-write
                log.warning("line %d of %s is not JSON (%r); skipped", number, self.pending_file, line[:200])
        return records

    def _reject(self, records: list[dict], error: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.rejected_file.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        log.warning(
            "MLflow at %s refused metrics %s (%s); they are kept in %s and not re-sent",
            self.uri,
            ", ".join(sorted({r["key"] for r in records})),
            error,
            self.rejected_file,
        )


@contextlib.contextmanager
def _scoped_env(values: Mapping[str, str], override: bool = True) -> Iterator[None]:
    """Set environment variables for the calls inside only (MLflow reads its settings from there at call time)."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if override or saved[name] is None:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _bounded_http() -> contextlib.AbstractContextManager[None]:
    """Bound MLflow's HTTP retries and timeout for the calls inside, unless the user chose values themselves."""
    return _scoped_env(_HTTP_BOUNDS, override=False)


def _auth_headers() -> dict[str, str]:
    # The same credentials MLflow's client would send, so that check() sees what the run will see.
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _as_tag_values(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refused(error: Exception) -> bool:
    """True when the server answered and rejected the request (bad key, deleted run): retrying cannot help."""
    return isinstance(error, MlflowException) and error.get_http_status_code() in _SERVER_REFUSED


def _brief(error: Exception) -> str:
    # MLflow's connection errors run to several hundred characters of urllib3 internals.
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
