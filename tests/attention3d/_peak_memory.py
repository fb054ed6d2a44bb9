"""Peak memory of code run in a fresh Python process, read from the operating system (Linux's per-process peak
resident set, VmHWM), so that a test of "the fused attention path never materialises the N x N map" depends on no
profiler kernel names, which change between torch versions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

_RUNNER = """
import json, sys
import torch

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

job = json.load(sys.stdin)
# Fixed threads: kernels keep per-thread scratch buffers, which would otherwise grow with the machine's cores.
torch.set_num_threads(2)
torch.manual_seed(0)
scope = {"torch": torch}
exec(job["setup"], scope)
growth = {}
for label, code in job["steps"]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak to the current resident set, so each step is measured on its own
    before = status("VmRSS")
    exec(code, scope)
    growth[label] = status("VmHWM") - before
print(json.dumps(growth))
"""


def peak_growth(setup: str, steps: list[tuple[str, str]]) -> dict[str, int]:
    """Run `setup`, then each (label, code) of `steps` in order, in one fresh process; return per label the bytes by
    which that step's peak resident memory exceeded the resident memory at its start.

    `setup` should run every path once on a small input, so that code pages and thread pools are counted before
    the steps. Skips where the kernel's per-process peak (/proc/self/status, /proc/self/clear_refs) is absent."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak memory is read from Linux's /proc/self/status, absent on this system")
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps({"setup": setup, "steps": steps}),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory process failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
