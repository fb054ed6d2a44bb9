"""A durable queue for metrics on their way to a tracking store, so that training outlives the store's outages.

Metrics that could not be delivered wait in FOLDER/mlflow_pending.jsonl, one JSON object per line (run_id, key,
value, step, timestamp), and are sent again, oldest first and with their original timestamps, at the next flush. A
batch the store kept but whose answer was lost is therefore re-sent unchanged, and a store that drops exact duplicates
(MLflow does) keeps it once. A record the store refuses outright (a bad key, a deleted run) would block the queue
forever; it goes to FOLDER/mlflow_rejected.jsonl with a warning instead.

The queue knows nothing of MLflow. It is given `send(run_id, records)`, which delivers a batch of one run's records
or raises, and `refused(error)`, which tells "the store answered no" (sending again cannot help) from "the store did
not answer" (wait, and send again later). pipeline/tracking/run.py gives it MLflow's log_batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.errors import one_line
from pipeline.fileio import atomic_write_text

log = logging.getLogger("seg3d.tracking.queue")

# The names predate this module; a run folder written by an older seg3d is still read.
PENDING_FILE = "mlflow_pending.jsonl"
REJECTED_FILE = "mlflow_rejected.jsonl"
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit

Sender = Callable[[str, list[dict]], None]


class MetricQueue:
    """Metrics that wait in `folder` until `send` gets them through; nothing lives only in memory.

    All state is in the pending file, so a new process that makes a MetricQueue on the same folder (a resumed run)
    picks up exactly what an interrupted one left.
    """

    def __init__(
        self,
        folder: Path,
        *,
        send: Sender,
        refused: Callable[[Exception], bool],
        destination: str,
        batch_size: int = METRICS_PER_BATCH,
    ):
        """`destination` names the store in warnings ("MLflow at http://..."); `batch_size` is the most records
        one call of `send` is given."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.folder = Path(folder)
        self.send = send
        self.refused = refused
        self.destination = destination
        self.batch_size = batch_size

    @property
    def pending_file(self) -> Path:
        return self.folder / PENDING_FILE

    @property
    def rejected_file(self) -> Path:
        return self.folder / REJECTED_FILE

    def waiting(self) -> bool:
        """True when records wait in the pending file."""
        return self.pending_file.exists()

    def pending(self) -> list[dict]:
        """The records that wait, oldest first; a line cut short by a killed writer is skipped with a warning."""
        if not self.pending_file.exists():
            return []
        records = []
        for number, line in enumerate(self.pending_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("line %d of %s is not JSON (%r); skipped", number, self.pending_file, line[:200])
        return records

    def flush(self, new: Iterable[dict] = ()) -> bool:
        """Send the waiting records, oldest first, then `new`; True when nothing is left waiting.

        Whatever cannot be sent now is written back to the pending file, in order (a whole file or the old one,
        never half of one).
        """
        queued = self.pending()
        records = queued + list(new)
        if not records:
            return True
        unsent, refused, error = self._deliver(records)
        if refused:
            self._reject(refused, error)
        if unsent:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.pending_file, "".join(json.dumps(r) + "\n" for r in unsent))
            steps = sorted({r["step"] for r in unsent})
            log.warning(
                "%s did not take metrics (%s); %d metrics of steps %s..%s wait in %s and are re-sent, in order, when"
                " it answers again",
                self.destination,
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
            log.info("sent %d pending metrics from %s to %s", len(queued), self.pending_file, self.destination)
        return True

    def _batches(self, records: list[dict]) -> list[list[dict]]:
        """Consecutive records of one run, at most `batch_size` each: the order within and across batches is kept."""
        batches: list[list[dict]] = []
        for record in records:
            last = batches[-1] if batches else None
            if last and last[0]["run_id"] == record["run_id"] and len(last) < self.batch_size:
                last.append(record)
            else:
                batches.append([record])
        return batches

    def _deliver(self, records: list[dict]) -> tuple[list[dict], list[dict], str]:
        """Send records in order; returns (not sent because the store did not answer, refused by it, last error).

        Stops at the first unanswered batch, so a dead store costs one bounded request per flush. A refused batch is
        sent again record by record, so one bad key does not take a whole step's metrics with it.
        """
        batches = self._batches(records)
        refused: list[dict] = []
        error = ""
        for index, batch in enumerate(batches):
            try:
                self.send(batch[0]["run_id"], batch)
                continue
            except Exception as e:
                error = one_line(e)
                if not self.refused(e):
                    return [r for b in batches[index:] for r in b], refused, error
            for position, record in enumerate(batch):
                try:
                    self.send(record["run_id"], [record])
                except Exception as e:
                    error = one_line(e)
                    if not self.refused(e):
                        return batch[position:] + [r for b in batches[index + 1 :] for r in b], refused, error
                    refused.append(record)
        return [], refused, error

    def _reject(self, records: list[dict], error: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.rejected_file.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        log.warning(
            "%s refused metrics %s (%s); they are kept in %s and not re-sent",
            self.destination,
            ", ".join(sorted({r["key"] for r in records})),
            error,
            self.rejected_file,
        )
