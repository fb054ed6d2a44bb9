"""The store behind the Tracker: which URI, and the check before any compute, asked through MLflow's own client under
bounded HTTP settings, with one line for each way a server can fail a user.

The HTTP requests are watched where MLflow's client sends them (`record_http`), so a test sees the timeout and the
retry budget a request really went out with.
"""

from __future__ import annotations

import base64
import logging
import os

import pytest

from pipeline.errors import Seg3dError
from pipeline.tracking.store import check_store, quiet_store_setup, resolve_tracking_uri
from tests.mlflow_server import StubWebServer, free_port, record_http

SEARCH = "/api/2.0/mlflow/experiments/search"
NO_EXPERIMENTS = '{"experiments": []}'
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """Neither the environment nor ~/.mlflow/credentials hold credentials."""
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_tracking_uri_precedence_argument_env_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("http://example:5000") == "http://example:5000"
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = resolve_tracking_uri(None)
    # Absolute, so that a later chdir does not open another database.
    assert default == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert default.startswith("sqlite:////")
    assert resolve_tracking_uri("sqlite:///runs/m.db?timeout=30") == f"sqlite:///{tmp_path / 'runs/m.db'}?timeout=30"


# ----------------------------------------------------------------------------------------------------------------
# check_store(): user errors before any compute


def test_check_unreachable_server_is_reported_dead_after_one_bounded_request(monkeypatch):
    # The user's own settings for the run's calls (MLflow's default is 7 retries and 120 s) do not stretch the check.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    sent = record_http(monkeypatch)
    with pytest.raises(Seg3dError, match=r"does not answer .*start it, or omit --tracking-uri") as excinfo:
        check_store(uri)
    assert uri in str(excinfo.value)
    assert "Connection refused" in str(excinfo.value)  # the cause, not three layers of urllib3 wrappers
    assert [(r.url.split("?")[0], r.retries, r.timeout) for r in sent] == [(f"{uri}{SEARCH}", 0, 5)]
    # Scoped to the check: what the user set is back, what was unset is unset again.
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_check_sqlite_store_location(tmp_path):
    # Missing folders are fine (MLflow creates them), and the check itself creates nothing.
    check_store(f"sqlite:///{tmp_path / 'new' / 'deeper' / 'mlflow.db'}")
    assert not (tmp_path / "new").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(Seg3dError, match=r"a_file is a file.*choose another --tracking-uri"):
        check_store(f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}")
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):
        pytest.skip("running as root: folder permissions are not enforced, the read-only case cannot be made")
    with pytest.raises(Seg3dError, match=r"ro is read-only\); fix its permissions"):
        check_store(f"sqlite:///{read_only / 'mlflow.db'}")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("where", ["environment", "token", "credentials file"])
def test_check_sends_the_credentials_mlflow_finds(where, tmp_path, monkeypatch, no_credentials):
    """The check sees what the run will see: MLflow's own lookup, including ~/.mlflow/credentials."""
    if where == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "radiologist")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
        expected = _basic("radiologist", "s3cret")
    elif where == "token":
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
        expected = "Bearer tok-123"
    else:
        (tmp_path / "home" / ".mlflow").mkdir(parents=True)
        (tmp_path / "home" / ".mlflow" / "credentials").write_text(
            "[mlflow]\nmlflow_tracking_username = radiologist\nmlflow_tracking_password = s3cret\n"
        )
        expected = _basic("radiologist", "s3cret")
    with StubWebServer(status=200, body=NO_EXPERIMENTS, authorization=expected) as server:
        check_store(server.uri)
    assert server.authorizations == [expected]


@pytest.mark.parametrize(
    ("status", "body"),
    [(401, "You are not authenticated."), (403, '{"error_code": "PERMISSION_DENIED", "message": "no"}')],
)
def test_check_refused_access_names_the_credential_variables(status, body, no_credentials):
    with StubWebServer(status=status, body=body) as server:
        with pytest.raises(Seg3dError, match=rf"refused access \(HTTP {status}\); set MLFLOW_TRACKING_USERNAME") as e:
            check_store(server.uri)
    assert server.uri in str(e.value)
    assert server.authorizations == [None]


@pytest.mark.parametrize(
    ("status", "body"), [(404, "<html>Not Found</html>"), (200, "<html>Welcome to the intranet</html>")]
)
def test_check_of_a_web_server_that_is_not_mlflow(status, body, no_credentials):
    with StubWebServer(status=status, body=body, content_type="text/html") as server:
        with pytest.raises(Seg3dError, match=r"is not an MLflow tracking server .*point --tracking-uri at an") as e:
            check_store(server.uri)
    assert str(e.value).startswith(f"{server.uri} is not an MLflow tracking server")


def test_quiet_store_setup_silences_only_loggers_nobody_configured():
    creating, alembic = logging.getLogger("mlflow.store.db.utils"), logging.getLogger("alembic")
    saved = creating.level, alembic.level
    try:
        creating.setLevel(logging.NOTSET)
        alembic.setLevel(logging.DEBUG)  # someone asked to see the migrations
        with quiet_store_setup():
            assert not creating.isEnabledFor(logging.INFO) and creating.isEnabledFor(logging.WARNING)
            assert alembic.isEnabledFor(logging.DEBUG)
        assert (creating.level, alembic.level) == (logging.NOTSET, logging.DEBUG)
    finally:
        creating.setLevel(saved[0])
        alembic.setLevel(saved[1])
