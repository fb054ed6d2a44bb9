"""MetricQueue with a plain Python store in place of MLflow: order, idempotent re-sends, refusals kept aside, a line
cut short by a kill, and a queue that a new process reads back from its file."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.metric_queue import PENDING_FILE, REJECTED_FILE, MetricQueue

ROOT = Path(__file__).resolve().parents[2]


class Refused(Exception):
    """The store answered and said no."""


class NoAnswer(Exception):
    """The store did not answer (connection refused, timeout)."""


class FakeStore:
    """Keeps what it is sent as MLflow does (an exact duplicate is kept once) and records every call.

    `answering=False` makes it unreachable; `lose_answers=True` makes it keep a batch and then fail to say so, as a
    server does whose answer is lost on the way back; keys in `refuse` make it refuse any batch that holds them.
    """

    def __init__(self, refuse: tuple[str, ...] = ()):
        self.kept: list[dict] = []
        self.calls: list[list[dict]] = []
        self.answering = True
        self.lose_answers = False
        self.refuse = set(refuse)

    def send(self, run_id: str, records: list[dict]) -> None:
        self.calls.append([dict(r) for r in records])
        assert all(r["run_id"] == run_id for r in records), "a batch mixes runs"
        if not self.answering:
            raise NoAnswer("connection refused")
        if any(r["key"] in self.refuse for r in records):
            raise Refused(f"invalid metric key in {[r['key'] for r in records]}")
        self.kept.extend(dict(r) for r in records if r not in self.kept)
        if self.lose_answers:
            raise NoAnswer("read timed out")


def make_queue(folder: Path, store: FakeStore, batch_size: int = 1000) -> MetricQueue:
    return MetricQueue(
        folder,
        send=store.send,
        refused=lambda e: isinstance(e, Refused),
        destination="the fake store",
        batch_size=batch_size,
    )


def metrics(step: int, run_id: str = "run-a", **values: float) -> list[dict]:
    # A timestamp of its own per step, so that a re-send with a fresh clock would be seen.
    timestamp = 1_700_000_000_000 + step
    return [{"run_id": run_id, "key": k, "value": v, "step": step, "timestamp": timestamp} for k, v in values.items()]


def pending_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / PENDING_FILE).read_text().splitlines()]


def test_records_arrive_in_order_in_batches_of_one_run_within_the_limit(tmp_path):
    store = FakeStore()
    queue = make_queue(tmp_path, store, batch_size=2)
    a0, a1 = metrics(0, loss=1.0, dice=0.1), metrics(1, loss=0.5)
    b0 = metrics(0, run_id="run-b", loss=2.0)
    assert queue.flush(a0 + a1 + b0 + metrics(2, loss=0.25))
    assert store.kept == a0 + a1 + b0 + metrics(2, loss=0.25)
    assert store.calls == [a0, a1, b0, metrics(2, loss=0.25)]
    assert not (tmp_path / PENDING_FILE).exists() and not queue.waiting()


def test_unanswered_records_wait_in_order_and_go_out_before_newer_ones(tmp_path, caplog):
    store = FakeStore()
    queue = make_queue(tmp_path / "run", store, batch_size=2)
    store.answering = False
    with caplog.at_level(logging.WARNING, logger="seg3d.tracking"):
        assert not queue.flush(metrics(0, loss=1.0, dice=0.1, lr=0.01))  # two batches
        assert not queue.flush(metrics(1, loss=0.5))
    # One call per flush: the first unanswered batch stops the flush, a dead store is not asked again and again.
    assert len(store.calls) == 2
    assert pending_lines(tmp_path / "run") == metrics(0, loss=1.0, dice=0.1, lr=0.01) + metrics(1, loss=0.5)
    assert "the fake store did not take metrics (connection refused)" in caplog.text
    assert str(tmp_path / "run" / PENDING_FILE) in caplog.text

    store.answering = True
    assert queue.flush(metrics(2, loss=0.25))
    assert store.kept == metrics(0, loss=1.0, dice=0.1, lr=0.01) + metrics(1, loss=0.5) + metrics(2, loss=0.25)
    assert not queue.waiting()


def test_a_batch_whose_answer_was_lost_is_sent_again_unchanged_and_kept_once(tmp_path):
    store = FakeStore()
    queue = make_queue(tmp_path, store)
    store.lose_answers = True
    assert not queue.flush(metrics(0, loss=1.0, dice=0.1))
    assert pending_lines(tmp_path) == metrics(0, loss=1.0, dice=0.1)  # original timestamps on disk

    store.lose_answers = False
    assert queue.flush()
    assert store.calls[-1] == store.calls[0] == metrics(0, loss=1.0, dice=0.1)  # the very same records again
    assert store.kept == metrics(0, loss=1.0, dice=0.1)  # so a store that drops exact duplicates keeps them once


def test_a_refused_record_is_kept_aside_and_does_not_block_the_rest(tmp_path, caplog):
    store = FakeStore(refuse=("../escape",))
    queue = make_queue(tmp_path, store)
    loss, bad, dice = metrics(0, loss=0.5, **{"../escape": 1.0}, dice=0.3)
    with caplog.at_level(logging.WARNING, logger="seg3d.tracking"):
        assert queue.flush([loss, bad, dice])
    # The refused batch is sent again record by record, so only the bad record is lost to the store.
    assert store.calls == [[loss, bad, dice], [loss], [bad], [dice]]
    assert store.kept == [loss, dice]
    assert [json.loads(line) for line in (tmp_path / REJECTED_FILE).read_text().splitlines()] == [bad]
    assert "refused metrics ../escape" in caplog.text and REJECTED_FILE in caplog.text
    assert not queue.waiting()

    assert queue.flush(metrics(1, loss=0.4))  # the queue is not blocked by what was refused
    assert store.kept == [loss, dice, *metrics(1, loss=0.4)]


def test_a_store_that_goes_dark_during_the_record_by_record_resend_keeps_the_rest_in_order(tmp_path):
    store = FakeStore()
    queue = make_queue(tmp_path, store)
    first, bad, last = metrics(0, loss=0.5, bad=1.0, dice=0.3)
    later = metrics(1, loss=0.4)
    answers = iter([Refused("bad key"), None, NoAnswer("connection reset")])

    def send(run_id: str, records: list[dict]) -> None:
        store.calls.append(records)
        error = next(answers)
        if error is not None:
            raise error
        store.kept.extend(records)

    queue.send = send
    assert not queue.flush([first, bad, last, *later])
    assert store.kept == [first]
    assert pending_lines(tmp_path) == [bad, last, *later]  # nothing judged refused without an answer
    assert not (tmp_path / REJECTED_FILE).exists()


def test_a_line_cut_short_by_a_kill_is_skipped_and_the_rest_is_sent(tmp_path, caplog):
    whole = metrics(0, loss=1.0, dice=0.1)
    torn = json.dumps(metrics(1, loss=0.5)[0])[:25]
    (tmp_path / PENDING_FILE).write_text("".join(json.dumps(r) + "\n" for r in whole) + torn)
    store = FakeStore()
    with caplog.at_level(logging.WARNING, logger="seg3d.tracking"):
        assert make_queue(tmp_path, store).flush()
    assert store.kept == whole
    assert f"line 3 of {tmp_path / PENDING_FILE} is not JSON" in caplog.text
    assert not (tmp_path / PENDING_FILE).exists()


def test_what_a_killed_process_left_waiting_is_sent_by_the_next_one(tmp_path):
    # The first process cannot reach its store, queues two steps and is killed: no clean-up, no atexit.
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from pipeline.metric_queue import MetricQueue

        def send(run_id, records):
            raise ConnectionError("connection refused")

        queue = MetricQueue(Path({str(tmp_path)!r}), send=send, refused=lambda e: False, destination="a dead store")
        for step in (0, 1):
            queue.flush([{{"run_id": "run-a", "key": "loss", "value": 1.0 / (step + 1), "step": step,
                          "timestamp": 1_700_000_000_000 + step}}])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr

    store = FakeStore()
    queue = make_queue(tmp_path, store)
    expected = metrics(0, loss=1.0) + metrics(1, loss=0.5)
    assert queue.pending() == expected
    assert queue.flush()
    assert store.kept == expected


def test_batch_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        make_queue(tmp_path, FakeStore(), batch_size=0)
