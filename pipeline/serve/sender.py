"""The node's way out: results sent to the destination (`--send-to AET@HOST:PORT`) with C-STORE, retried with
back-off while it is down, and marked sent (outbox/JOB -> sent/JOB) only once it acknowledged every object."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline import faults
from pipeline.errors import Seg3dError, one_line, shown
from pipeline.serve.spool import Spool, job_key

log = logging.getLogger("seg3d.serve")

# Success and the warnings a storage SCP may answer with while keeping the object (PS3.4 B.2.3).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
# A destination that answers but refuses a result this many times sends it to failed/ (a network outage is retried
# for as long as it lasts: the result waits in the outbox).
MAX_REFUSALS = 5
BACKOFF_S = (1.0, 60.0)
_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5: default character set, no backslash, 16 at most


@dataclass(frozen=True)
class Peer:
    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def check_aet(value: str, what: str) -> str:
    if not _AET.match(value) or not value.strip():
        raise Seg3dError(f"{what} {shown(value)} is not an AE title: 1 to 16 printable ASCII characters, no backslash")
    return value.strip()


def parse_peer(spec: str) -> Peer:
    """AET@HOST:PORT, as --send-to takes it."""
    aet, at, address = spec.rpartition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Seg3dError(f"--send-to {shown(spec)} is not AET@HOST:PORT; e.g. --send-to ORTHANC@pacs.example:4242")
    return Peer(check_aet(aet, "--send-to's AE title"), host.strip("[]"), int(port))


class SendError(Exception):
    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused  # the destination answered and said no (as opposed to: could not be reached)


def send_files(files: list[Path], peer: Peer, calling_aet: str, timeout: float = 30.0) -> None:
    """C-STORE every file to `peer` in one association; SendError unless each was stored."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet)
    if not assoc.is_established:
        refused = assoc.is_rejected
        raise SendError(f"{peer} {'rejected the association' if refused else 'cannot be reached'}", refused=refused)
    try:
        for path, ds in zip(files, datasets):
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status and "Status" in status else None
            if code not in STORED:
                answer = "no answer" if code is None else f"status 0x{code:04X}"
                raise SendError(f"{peer} did not store {path.name} ({answer})", refused=code is not None)
    finally:
        if assoc.is_established:
            assoc.release()


class Sender(threading.Thread):
    """Sends outbox/ oldest first. While the destination is down it waits 1, 2, 4 ... 60 s between tries and
    sends nothing else (the order of results is kept); what it could not send stays in the outbox, for this run
    or the next."""

    def __init__(self, spool: Spool, peer: Peer, calling_aet: str, metrics, wake: threading.Event):
        super().__init__(name="seg3d-sender", daemon=True)
        self.spool, self.peer, self.calling_aet, self.metrics, self.wake = spool, peer, calling_aet, metrics, wake
        self.stopping = threading.Event()
        self.refusals: dict[str, int] = {}

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        backoff = BACKOFF_S[0]
        while not self.stopping.is_set():
            try:
                jobs = self.spool.jobs("outbox")
            except OSError as err:
                log.error("cannot list the spool's outbox (%s); trying again in 5 s", err.strerror or err)
                self.stopping.wait(5.0)
                continue
            if not jobs:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            if self._send(jobs[0]):
                backoff = BACKOFF_S[0]
            else:
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])

    def _send(self, job: str) -> bool:
        key, files = job_key(job), self.spool.results(job)
        try:
            if not files:
                raise SendError("no result was made", refused=True)
            send_files(files, self.peer, self.calling_aet)
        except SendError as err:
            if err.refused:
                self.refusals[job] = self.refusals.get(job, 0) + 1
                if self.refusals[job] >= MAX_REFUSALS:
                    self.spool.fail_outbox(job, f"{err}, {MAX_REFUSALS} times")
                    self.metrics.failed.inc()
                    log.error("series %s (%s): %s %d times; moved to failed/, not sent", key, job, err, MAX_REFUSALS)
                    return True
            log.warning("series %s: not sent yet: %s; the result stays in the spool and is sent again", key, err)
            return False
        except Exception as err:  # a bug or a broken file must not stop the sender for the other series
            self.spool.fail_outbox(job, one_line(err))
            self.metrics.failed.inc()
            log.error("series %s (%s): cannot send: %s; moved to failed/", key, job, one_line(err))
            return True
        faults.point("serve.sent")  # acknowledged, not yet marked: a crash here sends it again (the same UIDs)
        self.spool.mark_sent(job)
        self.refusals.pop(job, None)
        seconds = self.spool.age(job)
        self.metrics.done.inc()
        self.metrics.seconds.observe(seconds)
        log.info(
            "series %s: sent %d object(s) to %s; done %.1f s after it was complete", key, len(files), self.peer, seconds
        )
        return True
