"""A real Orthanc PACS (Debian package orthanc, /usr/sbin/Orthanc) on 127.0.0.1 for the tests of `seg3d serve`.

Each `Orthanc` has its own folder (configuration, storage, index, temporary files, log) and its own free DICOM and
HTTP ports, so several can run at once beside a system Orthanc on 4242/8042. Its configuration is the only one it
reads: Debian's /etc/orthanc (and the plugins it names) is never loaded. Tests use it through its REST API:

    with Orthanc(tmp_path / "pacs", modalities={"seg3d": ("SEG3D", "127.0.0.1", port)}) as pacs:
        series = pacs.upload(ct_folder)
        pacs.push(series, "seg3d")
        segs = pacs.wait_for(lambda: pacs.series("SEG"), 60, "a SEG stored in the PACS")
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

T = TypeVar("T")
Peer = tuple[str, str, int]  # (AE title, host, port) of a DICOM peer


def orthanc_binary() -> str:
    """The path of the Orthanc binary; skips the test where Orthanc is not installed."""
    found = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if not found:
        pytest.skip("Orthanc is not installed (Debian package orthanc; .ci/run installs it via docker/host-setup.sh)")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Orthanc:
    """An Orthanc process on 127.0.0.1 with its storage in `folder`. `aet` is its AE title; `modalities` maps a name
    (as `push` takes it) to the (AE title, host, port) of a DICOM peer it may send to. Any calling AE title may store
    into it. The ports are fixed at construction, so `start()` after `stop()` serves the same storage on the same
    ports (as a PACS that was restarted)."""

    def __init__(self, folder: Path, *, aet: str = "ORTHANC", modalities: dict[str, Peer] | None = None):
        self.folder = Path(folder).resolve()
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.config = self.folder / "orthanc.json"
        self.log = self.folder / "orthanc.log"
        self._process: subprocess.Popen | None = None
        self._http = requests.Session()
        self._http.trust_env = False  # a proxy from the environment must not see requests to 127.0.0.1
        self._write_config()

    def _write_config(self) -> None:
        """The whole configuration (Orthanc 1.10.1's option names); options left out keep Orthanc's defaults."""
        (self.folder / "tmp").mkdir(parents=True, exist_ok=True)
        config = {
            "Name": f"seg3d-test-{self.aet}",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "TemporaryDirectory": str(self.folder / "tmp"),
            "Plugins": [],  # not Debian's /usr/share/orthanc/plugins
            "LuaScripts": [],
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {name: list(peer) for name, peer in self.modalities.items()},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            # Only read by Lua scripts in 1.10.1: a REST store opens its own association and releases it at the end.
            "DicomAssociationCloseDelay": 0,
            "StableAge": 2,
            "SaveJobs": False,  # a restarted Orthanc does not resume an old push
            "HttpThreadsCount": 10,
            "DicomThreadsCount": 2,
        }
        self.config.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 30) -> Orthanc:
        """Start Orthanc (its output appended to `log`) and wait until GET /system answers."""
        if self.running:
            return self
        self._write_config()
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [orthanc_binary(), str(self.config)], cwd=self.folder, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                if self._http.get(f"{self.url}/system", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL if Orthanc has not exited after `timeout` s (0: a crash). The storage stays for a
        later `start()`. A clean stop takes 2-3 s, but it waits for every association a peer holds open to end."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request(self, method: str, path: str, *, timeout: float = 30, **kwargs: Any) -> Any:
        """One REST call; its JSON answer (or the raw bytes where the answer is not JSON). Raises with Orthanc's
        answer (which describes the error) on an HTTP error."""
        answer = self._http.request(method, f"{self.url}{path}", timeout=timeout, **kwargs)
        if not answer.ok:
            raise RuntimeError(f"Orthanc {method} {path}: HTTP {answer.status_code}: {answer.text}")
        if answer.headers.get("Content-Type", "").startswith("application/json"):
            return answer.json()
        return answer.content

    def upload(self, folder: Path) -> str:
        """POST every file of `folder` to /instances; the Orthanc ID of their series (they must be one series)."""
        files = sorted(path for path in Path(folder).iterdir() if path.is_file())
        assert files, f"no files in {folder}"
        series = {self.request("POST", "/instances", data=path.read_bytes())["ParentSeries"] for path in files}
        assert len(series) == 1, f"{folder} holds {len(series)} series, not one"
        return series.pop()

    def push(self, series_id: str, modality: str, *, synchronous: bool = True, timeout: float = 120) -> dict:
        """C-STORE a series to the peer `modality` (a name of `modalities`). Synchronous: the job's summary, and an
        error with Orthanc's answer if the store failed; otherwise {"ID": job, "Path": "/jobs/<job>"}."""
        return self.push_many([series_id], modality, synchronous=synchronous, timeout=timeout)

    def push_many(
        self, series_ids: list[str], modality: str, *, synchronous: bool = True, timeout: float = 120
    ) -> dict:
        """Like `push`, for several series sent in one association (one store job)."""
        body = {"Resources": list(series_ids), "Synchronous": synchronous}
        answer = self.request("POST", f"/modalities/{modality}/store", json=body, timeout=timeout)
        if synchronous and answer.get("FailedInstancesCount", 0):
            raise RuntimeError(f"Orthanc could not store every instance on {modality}: {answer}")
        return answer

    def series(self, modality: str | None = None) -> list[dict]:
        """Every series stored (GET /series?expand), or only those whose Modality is `modality` (e.g. "SEG")."""
        found = self.request("GET", "/series?expand")
        return [s for s in found if modality is None or s["MainDicomTags"].get("Modality") == modality]

    def series_of(self, series_uid: str) -> dict:
        """The series (as GET /series/{id} answers) whose Series Instance UID is `series_uid`."""
        (match,) = self.request("POST", "/tools/lookup", data=series_uid)
        return self.request("GET", f"/series/{match['ID']}")

    def instances(self, series_id: str) -> list[str]:
        """The Orthanc IDs of the instances of a series."""
        return list(self.request("GET", f"/series/{series_id}")["Instances"])

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of an instance, as stored."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def tags(self, instance_id: str) -> dict:
        """The tags of an instance by keyword (sequences as lists of dicts)."""
        return self.request("GET", f"/instances/{instance_id}/simplified-tags")

    def wait_for(self, predicate: Callable[[], T], timeout: float = 60, what: str = "the condition") -> T:
        """Poll `predicate` every 0.5 s until it returns something true, and return that; AssertionError naming
        `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what} (Orthanc on {self.url})")
            time.sleep(0.5)
