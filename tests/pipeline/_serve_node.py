"""`seg3d serve` as a real process for the tests: started with the command line a user types, killed with SIGKILL
or stopped with SIGTERM, started again on the same spool and port; its log is kept across restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def scu_store(files: list[Path], port: int, *, calling: str = "ORTHANC", called: str = "SEG3D") -> list[int | None]:
    """C-STORE `files` to 127.0.0.1:port in one association, as a modality would; the status of each (None: no
    association, or no answer)."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return [None] * len(files)
    try:
        return [int(s.Status) if s and "Status" in s else None for s in map(assoc.send_c_store, datasets)]
    finally:
        assoc.release()


class ServeNode:
    def __init__(self, bundle: Path, spool: Path, *, port: int, send_to: str, quiet: float = 2.0, extra=()):
        self.bundle, self.spool, self.port, self.send_to, self.quiet, self.extra = (
            bundle,
            spool,
            port,
            send_to,
            quiet,
            extra,
        )
        self.log_path = spool.parent / f"{spool.name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "pipeline.cli", "serve",
            "--model", str(self.bundle), "--spool", str(self.spool), "--send-to", self.send_to,
            "--host", "127.0.0.1", "--port", str(self.port), "--allow", "ORTHANC",
            "--quiet-time", str(self.quiet), "--health-port", "0", "--device", "cpu", *self.extra,
        ]  # fmt: skip

    def start(self, fault: str | None = None, env: dict | None = None, timeout: float = 180) -> ServeNode:
        """Start (or start again) and wait until it listens. `fault`: SEG3D_FAULT for this run only."""
        env = {**{k: v for k, v in os.environ.items() if k != "SEG3D_FAULT"}, **(env or {})}
        if fault:
            env["SEG3D_FAULT"] = fault
        before = self.log().count("listening on")
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while self.log().count("listening on") == before:
            if self.proc.poll() is not None:
                raise AssertionError(f"seg3d serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"seg3d serve did not listen within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_exit(self, timeout: float = 180) -> int:
        """The exit code of a node that is expected to end by itself (a fault point's SIGKILL: -9)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def wait_log(self, text: str, count: int = 1, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} x{count} not in the log within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
