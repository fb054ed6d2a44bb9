"""The DICOM node's state, on disk: every stage of a series is a folder of the spool, moved on by one rename, so
that a node killed at any moment (SIGKILL, a power cut) finds on restart exactly what it had acknowledged and
what it had sent.

    SPOOL/incoming/KEY/I.dcm     instances of a series still arriving (KEY: a hash of the Series Instance UID;
                                 I: a hash of the SOP Instance UID). An instance is on disk (written, fsynced,
                                 renamed, folder fsynced) before the sender is told success.
    SPOOL/series/JOB/            a complete series waiting for inference (JOB: KEY-TIME, one per completion)
    SPOOL/outbox/JOB/            its results (the DICOM SEG, the RTSTRUCT if asked), waiting to be sent
    SPOOL/sent/JOB/              results the destination acknowledged: never sent again
    SPOOL/failed/JOB/            a series that could not be read or segmented, with reason.txt; nothing is sent
    SPOOL/work/JOB/              inference in progress (thrown away and redone after a crash)

Names in the spool come from hashes, never from the data. No patient name or id is ever written outside the
instances themselves.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from pipeline.errors import Seg3dError
from pipeline.fileio import fsync_dir, probe_writable

INCOMPLETE = ".incomplete"
STAGES = ("incoming", "series", "outbox", "sent", "failed", "work")


def case_key(series_uid: str) -> str:
    """The accession-free name of a series in logs and in the spool: 12 hex digits of its UID's SHA-256."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:12]


def instance_name(sop_uid: str) -> str:
    return hashlib.sha256(sop_uid.encode()).hexdigest()[:24] + ".dcm"


def job_key(job: str) -> str:
    return job.split("-", 1)[0]


class Spool:
    """The folders above, and the moves between them. One lock orders instance writes against the move of their
    series out of incoming/, so that no instance lands in a series already queued."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.lock = threading.Lock()
        ok, detail = probe_writable(self.root)
        if not ok:
            raise Seg3dError(f"--spool {detail}; give a folder the node can write")
        for stage in STAGES:
            (self.root / stage).mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)

    def stage(self, name: str) -> Path:
        return self.root / name

    def jobs(self, stage: str) -> list[str]:
        """The jobs of a stage, oldest first (JOB names sort by the time they were made)."""
        folder = self.root / stage
        return sorted((p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_job_time)

    # -- receiving ------------------------------------------------------------------------------------------------
    def store_instance(self, key: str, sop_uid: str, data: bytes) -> Path:
        """Write one received instance durably into incoming/KEY/ (temporary, fsync, rename, fsync of the folder).
        Raises OSError (a full disk, a read-only spool): the caller answers the sender with a failure, so an
        instance is acknowledged only once it is on disk."""
        with self.lock:
            folder = self.root / "incoming" / key
            new = not folder.exists()
            folder.mkdir(exist_ok=True)
            if new:
                fsync_dir(folder.parent)
            target = folder / instance_name(sop_uid)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
                fsync_dir(folder)
            finally:
                Path(tmp).unlink(missing_ok=True)
            return target

    def mark_incomplete(self, key: str, reason: str) -> None:
        """Record in incoming/KEY/.incomplete why the series cannot be whole (an instance refused, an association
        broken off): when it completes it fails with this reason instead of being segmented without its slices."""
        with self.lock:
            folder = self.root / "incoming" / key
            folder.mkdir(exist_ok=True)
            with open(folder / INCOMPLETE, "a") as f:
                f.write(reason + "\n")
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(folder)

    def incomplete(self, job: str) -> list[str]:
        marker = self.root / "series" / job / INCOMPLETE
        return marker.read_text().splitlines() if marker.is_file() else []

    def incoming(self) -> list[str]:
        return sorted(p.name for p in (self.root / "incoming").iterdir() if p.is_dir())

    def complete(self, key: str) -> str | None:
        """Move incoming/KEY to series/JOB in one rename; None if nothing of it is there (already moved)."""
        with self.lock:
            folder = self.root / "incoming" / key
            if not folder.is_dir():
                return None
            for part in folder.glob(".*.part"):
                part.unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()
                return None
            job = f"{key}-{time.time_ns()}"
            os.rename(folder, self.root / "series" / job)
            fsync_dir(self.root / "incoming")
            fsync_dir(self.root / "series")
            return job

    # -- the later stages -------------------------------------------------------------------------------------------
    def work_folder(self, job: str) -> Path:
        """A clean work/JOB for the inference of JOB (what a crash left there is removed)."""
        folder = self.root / "work" / job
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        return folder

    def finish_inference(self, job: str) -> Path:
        """work/JOB (its files written atomically by seg3d infer's writers) becomes outbox/JOB in one rename; then
        the series' instances go."""
        outbox = self.root / "outbox" / job
        work = self.root / "work" / job
        fsync_dir(work)
        os.rename(work, outbox)
        fsync_dir(outbox.parent)
        shutil.rmtree(self.root / "series" / job, ignore_errors=True)
        return outbox

    def mark_sent(self, job: str) -> None:
        os.rename(self.root / "outbox" / job, self.root / "sent" / job)
        fsync_dir(self.root / "sent")
        fsync_dir(self.root / "outbox")

    def fail(self, job: str, reason: str) -> Path:
        """series/JOB (instances kept, for whoever looks into it) to failed/JOB with reason.txt."""
        failed = self.root / "failed" / job
        source = self.root / "series" / job
        if source.is_dir():
            os.rename(source, failed)
        else:
            failed.mkdir(exist_ok=True)
        (failed / "reason.txt").write_text(reason + "\n")
        fsync_dir(failed.parent)
        shutil.rmtree(self.root / "work" / job, ignore_errors=True)
        return failed

    def fail_outbox(self, job: str, reason: str) -> Path:
        """Results the destination keeps refusing: outbox/JOB to failed/JOB with reason.txt."""
        failed = self.root / "failed" / job
        os.rename(self.root / "outbox" / job, failed)
        (failed / "reason.txt").write_text(reason + "\n")
        fsync_dir(failed.parent)
        return failed

    @staticmethod
    def age(job: str) -> float:
        """Seconds since JOB was made (its series complete)."""
        return max(0.0, (time.time_ns() - _job_time(job)[0]) / 1e9)

    def results(self, job: str) -> list[Path]:
        return sorted(p for p in (self.root / "outbox" / job).glob("*.dcm") if not p.name.startswith("."))

    def recover(self) -> None:
        """After a crash: throw away half-made work and temporaries; the stages themselves are consistent."""
        for folder in (self.root / "work").iterdir():
            _remove(folder)
        for job in self.jobs("series"):  # killed between the two steps of finish_inference: the results are made
            if (self.root / "outbox" / job).is_dir() or (self.root / "sent" / job).is_dir():
                shutil.rmtree(self.root / "series" / job, ignore_errors=True)
        for part in (self.root / "incoming").glob("*/.*.part"):
            part.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _job_time(job: str) -> tuple[int, str]:
    stamp = job.rsplit("-", 1)[-1]
    return (int(stamp) if stamp.isdigit() else 0, job)
