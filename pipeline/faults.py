"""Fault points for the fault-injection tests (failpoints, as etcd and TiKV have them).

`point("name")` marks a place where a crash or an outage must not lose anything: inside a training step, during
validation, in the middle of a checkpoint write. Unless SEG3D_FAULT is set it does nothing but read one
environment variable. SEG3D_FAULT holds comma-separated NAME:N[:ACTION] items; the N-th time the process reaches
NAME it

- kill (the default): sends itself SIGKILL, as the OOM killer or a power cut would: no cleanup, no finally;
- wait: touches DIR/NAME.N.reached and blocks until DIR/NAME.N.go exists, DIR being SEG3D_FAULT_DIR (meanwhile
  a test takes a server away or starts a second training).

Under torchrun, SEG3D_FAULT_RANK=R limits the faults to the process of RANK R, and a job that torchrun restarted
(TORCHELASTIC_RESTART_COUNT > 0) runs clean: a fault is injected once per job, so the restart can finish it.

The tests in tests/pipeline/test_faults.py drive it; nobody else should set SEG3D_FAULT.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

ENV = "SEG3D_FAULT"
DIR_ENV = "SEG3D_FAULT_DIR"
RANK_ENV = "SEG3D_FAULT_RANK"
WAIT_LIMIT_S = 600.0

_hits: Counter[str] = Counter()


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec or not _armed():
        return
    _hits[name] += 1
    for item in spec.split(","):
        target, _, rest = item.strip().partition(":")
        count, _, action = rest.partition(":")
        if target == name and _hits[name] == int(count or 1):
            _act(name, _hits[name], action or "kill")


def _armed() -> bool:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    rank = os.environ.get(RANK_ENV)
    return rank is None or rank == os.environ.get("RANK", "0")


def _act(name: str, count: int, action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "wait":
        folder = Path(os.environ[DIR_ENV])
        (folder / f"{name}.{count}.reached").touch()
        go = folder / f"{name}.{count}.go"
        deadline = time.monotonic() + WAIT_LIMIT_S
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        raise ValueError(f"{ENV}: unknown action {action!r} for {name} (kill or wait)")
