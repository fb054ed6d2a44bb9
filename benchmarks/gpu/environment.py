"""What the GPU check ran on, as JSON: date, GPU, driver, CUDA, torch, Python, CPU; the first line of the report.

python -m benchmarks.gpu.environment > RESULTS/env.json
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess

import torch


def nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def describe() -> dict:
    from benchmarks._report import cpu_model

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "gpu": props.name if props else None,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "multiprocessors": props.multi_processor_count if props else None,
        "driver": nvidia_smi("driver_version"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
    }


def main() -> None:
    print(json.dumps(describe(), indent=2))


if __name__ == "__main__":
    main()
