"""The node's way in and its worker: a Storage SCP (pynetdicom) that writes each CT instance to the spool before
it answers success, the rule that says when a series is complete, and the loop that segments complete series one
at a time with seg3d infer's own code."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import faults
from pipeline.errors import Seg3dError, one_line, shown
from pipeline.serve.spool import Spool, case_key, job_key

log = logging.getLogger("seg3d.serve")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MAX_PIXELS = 4096 * 4096  # a CT slice is 512 x 512, at most 2048 x 2048 on today's scanners
# C-STORE answers (PS3.4 B.2.3): out of resources, data set does not match SOP class, cannot understand.
OUT_OF_RESOURCES, NOT_THE_SOP_CLASS, CANNOT_UNDERSTAND, SUCCESS = 0xA700, 0xA900, 0xC000, 0x0000


def check_ct_instance(ds) -> str | None:
    """Why a received CT Image Storage instance cannot be a slice of a volume, or None. Sizes come from the
    header and are checked against the pixel data actually received."""
    for name in ("SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns", "BitsAllocated", "PixelData"):
        if name not in ds or ds[name].value in (None, ""):
            return f"no {name}"
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if name not in ds:
            return f"no {name} (not an axial image of a volume)"
    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    if not 0 < rows * cols <= MAX_PIXELS or bits not in (8, 16, 32):
        return f"{rows} x {cols} pixels of {bits} bits is not a CT slice"
    need = rows * cols * int(ds.get("SamplesPerPixel", 1)) * bits // 8
    if not ds.file_meta.TransferSyntaxUID.is_compressed and len(ds.PixelData) < need:
        return f"pixel data of {len(ds.PixelData):,} bytes, where {rows} x {cols} x {bits} bits need {need:,}"
    return None


class Receiver:
    """The SCP's handlers and the completion rule: a series is complete at the end (release) of the association
    that brought it, unless another one is still sending it, or after `quiet_s` without a new instance (routers
    that send one instance per association, or an association that was aborted)."""

    def __init__(self, spool: Spool, metrics, *, quiet_s: float, on_release: bool, wake: threading.Event):
        self.spool, self.metrics, self.quiet_s, self.on_release, self.wake = spool, metrics, quiet_s, on_release, wake
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}  # series key -> monotonic time of its last instance
        self.sending: dict[int, set[str]] = {}  # association -> the series it brought
        self.refused_series: set[str] = set()
        # Series whose association broke off (aborted, or the node was killed while receiving): unless an association
        # that ends normally brings them again, they fail at the quiet time, as incomplete as far as the node knows.
        self.interrupted: set[str] = set()
        self.stopping = threading.Event()
        now = time.monotonic()
        for key in spool.incoming():  # left by the last run
            self.last[key] = now
            if on_release:  # else the quiet time is how series end, and this one may be whole
                self.interrupted.add(key)

    def handlers(self):
        from pynetdicom import evt

        return [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_CONN_CLOSE, self.on_closed),
            (evt.EVT_REJECTED, self.on_rejected),
        ]

    def on_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            key = case_key(str(ds.SeriesInstanceUID))
        except Exception as err:
            self.metrics.refused.inc()
            log.warning("an instance from %s cannot be read (%s); refused", calling, one_line(err, 120))
            return CANNOT_UNDERSTAND
        sop_class = str(event.request.AffectedSOPClassUID)
        try:
            problem = None if sop_class == CT_IMAGE_STORAGE else f"it is {_sop_name(sop_class)}, not CT Image Storage"
            problem = problem or check_ct_instance(ds)
        except Exception as err:
            problem = f"it cannot be read ({one_line(err, 120)})"
        if problem:
            self.metrics.refused.inc()
            if sop_class == CT_IMAGE_STORAGE:  # a CT series missing a slice must not be segmented without it
                try:
                    self.spool.mark_incomplete(key, f"an instance was refused: {problem}")
                except OSError:
                    pass
                with self.lock:
                    self.last[key] = time.monotonic()
            if key not in self.refused_series:  # one line per series, not one per instance
                if len(self.refused_series) > 10_000:
                    self.refused_series.clear()
                self.refused_series.add(key)
                log.warning(
                    "series %s from %s: an instance was refused: %s; nothing will be sent for this series",
                    key,
                    calling,
                    problem,
                )
            return NOT_THE_SOP_CLASS
        try:
            self.spool.store_instance(key, str(ds.SOPInstanceUID), event.encoded_dataset())
        except OSError as err:
            log.error(
                "series %s: cannot store an instance (%s); refused, the sender keeps it", key, err.strerror or err
            )
            return OUT_OF_RESOURCES
        with self.lock:
            self.last[key] = time.monotonic()
            self.sending.setdefault(id(event.assoc), set()).add(key)
        self.metrics.instances.inc()
        faults.point("serve.received")  # acknowledged once this returns: a crash here loses nothing acknowledged
        return SUCCESS

    def on_released(self, event) -> None:
        with self.lock:
            keys = self.sending.pop(id(event.assoc), set())
            still = set().union(*self.sending.values()) if self.sending else set()
            self.interrupted -= keys
        if self.on_release:
            for key in sorted(keys - still):
                self.complete(key)

    def on_closed(self, event) -> None:
        with self.lock:  # aborted (a released one is gone already): its series wait for the sender to try again
            self.interrupted |= self.sending.pop(id(event.assoc), set())

    def on_rejected(self, event) -> None:
        requestor = event.assoc.requestor
        log.warning(
            "refused an association from %s at %s: calling AE title not allowed (--allow)",
            shown(requestor.ae_title, 20),
            requestor.address,
        )

    def complete(self, key: str) -> None:
        with self.lock:
            self.last.pop(key, None)
        job = self.spool.complete(key)
        if job is not None:
            count = len(list((self.spool.stage("series") / job).glob("*.dcm")))
            self.metrics.received.inc()
            log.info("series %s: complete, %d instance(s); queued (%s)", key, count, job)
            self.wake.set()

    def tick(self) -> None:
        """Complete the series that have been quiet for quiet_s; runs every 0.2 s in a thread of its own."""
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            with self.lock:
                busy = set().union(*self.sending.values()) if self.sending else set()
                due = [k for k, t in self.last.items() if now - t >= self.quiet_s and k not in busy]
            for key in due:
                if key in self.interrupted:
                    self.interrupted.discard(key)
                    try:
                        self.spool.mark_incomplete(
                            key,
                            f"the association that brought it broke off and nothing more came in {self.quiet_s:g} s",
                        )
                    except OSError:
                        pass
                self.complete(key)


def work_loop(
    spool: Spool, segment: Callable[[Path, Path], None], metrics, wake: threading.Event, sent_wake, stop
) -> None:
    """Segment queued series, oldest first, until `stop` is set. A series that fails goes to failed/ with its
    reason and one log line; the loop goes on with the others."""
    while not stop.is_set():
        try:
            jobs = spool.jobs("series")
        except OSError as err:  # the spool's file system went away for a moment: say so, keep the node up
            log.error("cannot list the spool's queue (%s); trying again in 5 s", err.strerror or err)
            stop.wait(5.0)
            continue
        if not jobs:
            wake.wait(1.0)
            wake.clear()
            continue
        job = jobs[0]
        key, start = job_key(job), time.perf_counter()
        work = spool.work_folder(job)
        try:
            incomplete = spool.incomplete(job)
            if incomplete:
                raise Seg3dError(f"incomplete series: {incomplete[0]}")
            segment(spool.stage("series") / job, work)
            faults.point("serve.segmented")
            spool.finish_inference(job)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # Seg3dError (unreadable, incomplete, not a volume), OSError (disk), or a bug
            reason = str(err) if isinstance(err, Seg3dError) else one_line(err)
            spool.fail(job, reason)
            metrics.failed.inc()
            log.error("series %s (%s): failed, nothing sent: %s", key, job, reason)
            continue
        log.info("series %s: segmented in %.1f s", key, time.perf_counter() - start)
        sent_wake.set()


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else f"SOP class {shown(uid, 64)}"
