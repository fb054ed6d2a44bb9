"""A real `mlflow server` on 127.0.0.1 for tests: sqlite backend, artifacts proxied through the server.

Tests of the server path talk to the same REST API a shared team server exposes, so nothing about the HTTP
client, artifact proxying or the registry is mocked. One uvicorn worker keeps the start-up (~10 s on 2 cores) and
the memory small. The `mlflow_server` fixture in tests/conftest.py shares one instance across the session;
tests that kill and restart a server build their own `MlflowServer`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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
