"""Throughput of `seg3d serve` against a real PACS: a burst of CT series pushed from Orthanc (Debian's package, on
loopback) back to back, one association each, timed from the first push to the last DICOM SEG stored in Orthanc;
side by side, the same series segmented by `seg3d infer --dicom-seg` started once per series (what a site without
a node runs), whole processes.

    python -m benchmarks.serve [--series 10] [--shape 160 160 48] [--write]

The model is the demo config's network with seeded random weights (benchmarks/startup.py's bundle: the cost does
not depend on what the weights learned). With --write the table becomes the section "serve" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from benchmarks._report import ROOT, table, write_section
from benchmarks.startup import make_bundle
from tests.pipeline._ct_series import phantom_hu, write_ct_series
from tests.pipeline._orthanc import Orthanc, free_port
from tests.pipeline._serve_node import ServeNode


def _segs(pacs: Orthanc) -> int:
    return sum(len(s["Instances"]) for s in pacs.series("SEG"))


def _peak_queue(url: str, stop: threading.Event, seen: list[float]) -> None:
    while not stop.wait(0.25):
        try:
            text = requests.get(url, timeout=2).text
        except requests.RequestException:
            continue
        seen.extend(float(line.split()[1]) for line in text.splitlines() if line.startswith("seg3d_queue_length "))


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _row(how: str, seconds: float, n: int) -> dict:
    return {
        "how": how,
        "total": f"{seconds:.1f}",
        "per_min": f"{60 * n / seconds:.1f}",
        "per_series": f"{seconds / n:.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 48), help="x y slices of each phantom")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    bundle = make_bundle()
    work = Path(tempfile.mkdtemp(prefix="seg3d-bench-serve-"))
    folders = [work / f"ct{i}" for i in range(args.series)]
    for i, folder in enumerate(folders):
        write_ct_series(folder, phantom_hu(shape=tuple(args.shape), seed=i))

    # seg3d infer, one process per series (the outputs only; sending them would add a storescu per series).
    start = time.perf_counter()
    for i, folder in enumerate(folders):
        cmd = [sys.executable, "-m", "pipeline.cli", "infer", "--model", str(bundle), "--input", str(folder),
               "--output", str(work / f"infer{i}"), "--dicom-seg", "--device", "cpu"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    infer_s = time.perf_counter() - start
    print(f"seg3d infer per series: {infer_s:.1f} s for {args.series}", flush=True)

    with Orthanc(work / "pacs") as pacs:
        health = free_port()
        node = ServeNode(bundle, work / "spool", port=free_port(), send_to=f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
                         extra=("--health-port", str(health)))  # fmt: skip
        pacs.request("PUT", "/modalities/seg3d", json={"AET": "SEG3D", "Host": "127.0.0.1", "Port": node.port})
        t0 = time.perf_counter()
        node.start()
        startup_s = time.perf_counter() - t0
        ids = [pacs.upload(folder) for folder in folders]
        stop, queue = threading.Event(), []
        poller = threading.Thread(target=_peak_queue, args=(f"http://127.0.0.1:{health}/metrics", stop, queue))
        poller.start()
        start = time.perf_counter()
        for series_id in ids:
            pacs.push(series_id, "seg3d")
        pushed_s = time.perf_counter() - start
        pacs.wait_for(lambda: _segs(pacs) >= args.series, 3600, f"{args.series} SEGs")
        serve_s = time.perf_counter() - start
        stop.set()
        poller.join()
        rss = _vm_hwm_mib(node.proc.pid)
        latencies = [float(x) for x in re.findall(r"done ([0-9.]+) s after it was complete", node.log())]
        node.stop()
    print(f"seg3d serve: {serve_s:.1f} s for {args.series} (pushes took {pushed_s:.1f} s)", flush=True)

    shape = " x ".join(map(str, args.shape))
    n = args.series
    rows = [
        _row(f"`seg3d infer --dicom-seg`, one process per series ({n} in a row)", infer_s, n),
        _row(
            f"`seg3d serve`, {n} series pushed back to back from Orthanc, until the last SEG is in Orthanc", serve_s, n
        ),
    ]
    cols = [("how", "how"), ("total", "wall (s)"), ("per_min", "series per minute"), ("per_series", "s per series")]
    body = (
        "### seg3d serve: a burst of CT series from a real PACS (Orthanc)\n\n"
        f"`python -m benchmarks.serve --series {args.series} --shape {' '.join(map(str, args.shape))}`: {args.series}"
        f" phantom CT series of {shape} voxels (one uncompressed file per slice), the demo config's network (random"
        " weights), on the CPU at the precision `auto` picks. Orthanc 1.10.1 pushes each series in an association of"
        " its own, back to back; the node (quiet time 2 s) segments them one at a time and sends each DICOM SEG back."
        "\n\n"
        + table(rows, cols)
        + f"\n\nThe node: ready {startup_s:.1f} s after it was started (imports and the model, once); the pushes took"
        f" {pushed_s:.1f} s in all; from a series complete to its SEG stored in Orthanc, median"
        f" {statistics.median(latencies):.1f} s, longest {max(latencies):.1f} s (the queue of the burst included);"
        f" at most {int(max(queue or [0]))} series waited for inference at once (the queue lives in the spool, on"
        " disk);"
        f" peak resident memory of the node {rss:.0f} MiB."
    )
    print(body)
    if args.write:
        write_section("serve", body)


if __name__ == "__main__":
    main()
