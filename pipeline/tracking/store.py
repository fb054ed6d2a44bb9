"""The MLflow store behind a Tracker: which URI, whether it can be reached or written before any compute, the terms
on which every MLflow call is made (bounded HTTP, no table-creation chatter), and downloads from it.

With pipeline/tracking/run.py (the Tracker), this package is the only place of the project that imports mlflow.
Importing it changes nothing in the process: the settings MLflow reads from the environment or from its loggers are
changed only for the duration of the calls that need them, and put back after.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from mlflow.exceptions import MlflowException

from pipeline.errors import Seg3dError, one_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# MLflow's HTTP client retries 7 times with exponential back-off and a 120 s timeout: a dead server would stall every
# training step for minutes. These bounds apply only while seg3d talks to MLflow, and only where the user has not set
# the variable.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# The pre-flight check asks "is anyone there", once, whatever the user set for the run's calls.
CHECK_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# Who announces at INFO that the sqlite tables are being created or upgraded.
_STORE_SETUP_LOGGERS = ("mlflow.store.db.utils", "alembic")


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


def sqlite_path(uri: str) -> Path | None:
    """The database file of an sqlite URI; None for an in-memory store or another scheme."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def check_store(uri: str) -> None:
    """Raise Seg3dError within seconds when the store at `uri` cannot be reached or written; creates nothing.

    So a typo in --tracking-uri costs seconds, not an epoch.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https") and urlparse(uri).netloc:
        _check_server(uri)
    elif uri.startswith("sqlite:///") and uri != "sqlite:///":
        path = sqlite_path(uri)
        if path is not None:
            _check_writable(uri, path)
    else:
        # MLflow 3 refuses the rest itself, but only when the run starts: a plain folder or file: URI (its file store
        # is in maintenance mode), sqlite://NAME (two slashes), databases whose drivers seg3d does not ship, typos.
        raise Seg3dError(
            f"tracking URI {uri[:200]!r} is not one seg3d can use; give sqlite:///PATH (a local database file, the"
            " default ./mlflow.db) or http(s)://HOST:PORT of an `mlflow server`"
        )


def _check_server(uri: str) -> None:
    """Ask the tracking API itself (not /health, so that a URI of some other web service fails here too), through
    MLflow's own client, so that what is checked is what the run will send: the credentials MLflow finds
    (MLFLOW_TRACKING_USERNAME and _PASSWORD, MLFLOW_TRACKING_TOKEN, ~/.mlflow/credentials) and its TLS settings.

    The bounds go through the environment because that is the only way MLflow takes them: MlflowClient -> RestStore
    -> rest_utils.call_endpoint -> http_request, which reads MLFLOW_HTTP_REQUEST_MAX_RETRIES and _TIMEOUT at each
    request and is given no per-call value by the layers above it (mlflow 3.x).
    """
    try:
        with scoped_env(CHECK_BOUNDS):
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        raise _server_error(uri, e) from None


def _server_error(uri: str, error: Exception) -> Seg3dError:
    """The user's problem behind a failed check, in one of three kinds: no answer, no access, not MLflow."""
    unanswered = _in_chain(error, (requests.ConnectionError, requests.Timeout))
    if unanswered is not None:
        return Seg3dError(
            f"MLflow tracking server at {uri} does not answer ({one_line(_innermost(unanswered))}); start it, or omit"
            " --tracking-uri to use the embedded sqlite store"
        )
    status = error.get_http_status_code() if isinstance(error, MlflowException) else None
    if status in (401, 403):
        return Seg3dError(
            f"MLflow tracking server at {uri} refused access (HTTP {status}); set MLFLOW_TRACKING_USERNAME and"
            " MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or omit --tracking-uri to use the embedded sqlite"
            " store"
        )
    return Seg3dError(
        f"{uri} is not an MLflow tracking server ({one_line(error)}); point --tracking-uri at an `mlflow server`, or"
        " omit --tracking-uri to use the embedded sqlite store"
    )


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _in_chain(error: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    # MLflow wraps the HTTP library's error in an MlflowException of its own; the cause tells what happened.
    return next((e for e in _causes(error) if isinstance(e, kinds)), None)


def _innermost(error: BaseException) -> BaseException:
    # "[Errno 111] Connection refused" rather than three layers of urllib3 retry wrappers around it.
    *_, last = _causes(error)
    return last if str(last) else error


def _check_writable(uri: str, store: Path) -> None:
    # MLflow creates missing folders itself, so the nearest existing one is the one that must be writable.
    folder = store.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise Seg3dError(
            f"{folder} is a file, so the MLflow store {uri} cannot be made in it; choose another --tracking-uri"
        )
    blocked = store if store.exists() and not os.access(store, os.W_OK) else None
    if blocked is None and not os.access(folder, os.W_OK):
        blocked = folder
    if blocked is not None:
        raise Seg3dError(
            f"MLflow store {uri} cannot be written ({blocked} is read-only); fix its permissions, or choose"
            " another --tracking-uri"
        )


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str], *, override: bool = True) -> Iterator[None]:
    """Set environment variables for the calls inside only, then put back what was there.

    MLflow reads its HTTP settings (MLFLOW_HTTP_REQUEST_*) and, for `models:/` URIs, the registry URI from the
    environment at call time, and its client passes no per-call value for them down to the request; the environment is
    the only way in. With override=False, a variable the user set keeps the user's value.
    """
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


def bounded_http() -> contextlib.AbstractContextManager[None]:
    """Bound MLflow's HTTP retries and timeout for the calls inside, unless the user chose values themselves."""
    return scoped_env(HTTP_BOUNDS, override=False)


@contextlib.contextmanager
def quiet_store_setup() -> Iterator[None]:
    """Keep MLflow's and alembic's INFO lines about creating or upgrading the sqlite tables ("Creating initial MLflow
    database tables...") out of the output of the calls inside; users asked for a run, not for alembic news.

    Only loggers nobody has configured (level NOTSET) are raised to WARNING, and they go back to NOTSET after, so a
    level the user set to see these lines is kept.
    """
    quieted = [logger for logger in map(logging.getLogger, _STORE_SETUP_LOGGERS) if logger.level == logging.NOTSET]
    for logger in quieted:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger in quieted:
            logger.setLevel(logging.NOTSET)


def download_artifacts(uri: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Download an MLflow artifact URI (`models:/NAME/VERSION`, `runs:/ID/path`) into `dst`; returns the local path.

    MLflow resolves `models:/` through the process-wide registry URI and ignores the one passed to it, so the
    tracking URI is put into the environment for the duration of the call.
    """
    resolved = resolve_tracking_uri(tracking_uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        with (
            scoped_env({"MLFLOW_TRACKING_URI": resolved, "MLFLOW_REGISTRY_URI": resolved}),
            bounded_http(),
            quiet_store_setup(),
        ):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=resolved, registry_uri=resolved
            )
    except Exception as e:
        raise Seg3dError(
            f"could not download {uri} from MLflow at {resolved} ({one_line(e)}); check the model name and version in"
            " the MLflow UI, and --tracking-uri"
        ) from e
    return Path(local)
