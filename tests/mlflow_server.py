"""Servers on 127.0.0.1 for the tracking tests, and a record of the HTTP requests MLflow's client sends to them.

`MlflowServer` is a real `mlflow server` (sqlite backend, artifacts proxied through the server): tests of the server
path talk to the same REST API a shared team server exposes, so nothing about the HTTP client, artifact proxying or
the registry is mocked. One uvicorn worker keeps the start-up and the memory small. The `mlflow_server` fixture in
tests/conftest.py shares one instance across the session; tests that kill and restart a server build their own.

`StubWebServer` is a web server that is not MLflow, or that demands credentials: what a real MLflow server cannot
be made into cheaply (its basic-auth app needs a user database and an admin set up). `record_http` watches the
requests MLflow's client sends, with the timeout and retry budget each was sent under, and lets them go out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One `mlflow server` process group; start() again after stop() reuses the same port and stores."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.backend_uri = f"sqlite:///{self.root / 'backend.db'}"
        self.artifacts = self.root / "artifacts"
        self.log_file = self.root / "server.log"
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Start the server and wait until its REST API answers; returns its URI."""
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow_exe = Path(sys.executable).with_name("mlflow")
        command = [
            str(mlflow_exe),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts),
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log_file.open("ab") as log:
            # A session of its own: mlflow starts uvicorn as a child, and stop() must end both.
            self._proc = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{self._log_tail()}")
            if self.answers():
                return self.uri
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout_s:.0f} s:\n{self._log_tail()}")

    def answers(self) -> bool:
        url = f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def listening(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self, kill: bool = False) -> None:
        """Terminate (or, with kill=True, crash) the server's process group; returns once the port is free."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        _signal_group(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        # mlflow's uvicorn child may outlive its parent by a moment; the port is what the next start() needs.
        # A test server holds nothing worth a long graceful shutdown: after 3 s it is killed.
        deadline = time.monotonic() + 3
        while (proc.poll() is None or self.listening()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None or self.listening():
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def _log_tail(self, lines: int = 40) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # already gone
        pass


class StubWebServer:
    """A web server on 127.0.0.1 that answers every request with one status and body.

    With `authorization`, only a request that carries exactly that Authorization header gets the answer; any other
    gets HTTP 401, as an MLflow server behind basic auth gives. The headers it was sent are kept in `authorizations`.
    """

    def __init__(self, *, status: int, body: str, content_type: str = "application/json", authorization: str = ""):
        self.authorizations: list[str | None] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                sent = self.headers.get("Authorization")
                stub.authorizations.append(sent)
                if authorization and sent != authorization:
                    code, text, kind = 401, "You are not authenticated.", "text/plain"
                else:
                    code, text, kind = status, body, content_type
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="stub-web-server", daemon=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StubWebServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass(frozen=True)
class SentRequest:
    method: str
    url: str
    timeout: float | None  # seconds, as given to requests
    retries: int | None  # the total retries of the session's urllib3 Retry


def record_http(monkeypatch: pytest.MonkeyPatch) -> list[SentRequest]:
    """Every request sent through `requests` (MLflow's HTTP client) from now on, in order; the requests still go out."""
    import requests

    sent: list[SentRequest] = []
    original = requests.Session.request

    def request(session, method, url, *args, **kwargs):
        retry = getattr(session.get_adapter(url), "max_retries", None)
        sent.append(SentRequest(str(method), str(url), kwargs.get("timeout"), getattr(retry, "total", None)))
        return original(session, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", request)
    return sent
