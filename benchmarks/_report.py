"""Shared by the benchmarks: hardware description, timing, peak memory in a fresh process, report sections."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.devices import CPU_FEATURES, cpu_has_native_bf16, cpu_info

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks.md"


def has_native_bf16() -> bool:
    """bf16 convolutions run natively on GPUs and on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated."""
    return torch.cuda.is_available() or cpu_has_native_bf16()


def cpu_model() -> str:
    model, flags = cpu_info()
    feats = [f for f in CPU_FEATURES if f in flags]
    return f"{model} ({', '.join(feats) or 'no AVX2'})"


def hardware() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"{gpu}, Python {platform.python_version()}"
    )


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_isolated(module: str, payload: dict, timeout: float = 1800) -> dict:
    """Run `python -m module` with `payload` as JSON argv in a fresh process and return the JSON it prints.

    Peak memory is a high-water mark of the whole process, so each measurement gets a process of its own.
    """
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_section(name: str, body: str, measured: str | None = None, report: Path = REPORT) -> None:
    """Replace the section `name` of `report` (docs/benchmarks.md; between its markers), keeping the others.
    `measured`: when and where, for figures measured elsewhere (the GPU check); default: now, on this machine."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if measured is None:
        measured = f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {hardware()}"
    block = f"{start}\n_Measured {measured}._\n\n{body.strip()}\n{end}"
    text = (
        report.read_text()
        if report.exists()
        else "# Benchmarks\n\nWritten by `make bench`; every figure below comes from the run it is dated with.\n"
    )
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table from dicts; columns are (key, header)."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines)
