"""Training throughput and memory on the GPU: iterations per second and peak memory of seg3d's training step.

    python -m benchmarks.gpu.training --results DIR [--budget-s 170] [--tiny]

The step is pipeline/epochs.py's (the project's model, SegLoss with the variant's auxiliary losses, AdamW and its
schedule from build_optimizer, autocast, gradient clipping) on batches already on the device, so the figures are the
network's and the optimiser's, not the data loader's (benchmarks/loader.py measures that). Cases:
`attention_unet` (configs/attention_unet.yaml) at 96^3 and 128 x 128 x 64 patches, bf16, channels-last on and off,
torch.compile on and off; `danet` (configs/danet.yaml) with the fused position attention (SDPA) against the manual
N x N path, for memory. Each case runs in a process of its own (a clean peak, and an out-of-memory or a compiler
failure costs that case alone), time-boxed; results go to DIR/training.json as they come.
`--tiny` (the CPU dry run of benchmarks/gpu/check.sh): 32 x 32 x 16 patches, a narrow network, two timed steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._report import ROOT, max_rss_bytes
from pipeline.fileio import atomic_write_text

CASES = [
    {"config": "attention_unet", "patch": [96, 96, 96], "channels_last": False, "compile": False},
    {"config": "attention_unet", "patch": [96, 96, 96], "channels_last": True, "compile": False},
    {"config": "attention_unet", "patch": [128, 128, 64], "channels_last": False, "compile": False},
    {"config": "attention_unet", "patch": [128, 128, 64], "channels_last": True, "compile": False},
    {"config": "danet", "patch": [96, 96, 96], "channels_last": False, "compile": False, "fused": True},
    {"config": "danet", "patch": [96, 96, 96], "channels_last": False, "compile": False, "fused": False},
    # torch.compile last: its first step compiles for tens of seconds, and the budget may run out before it.
    {"config": "attention_unet", "patch": [96, 96, 96], "channels_last": False, "compile": True},
    {"config": "attention_unet", "patch": [96, 96, 96], "channels_last": True, "compile": True},
    {"config": "attention_unet", "patch": [128, 128, 64], "channels_last": False, "compile": True},
    {"config": "attention_unet", "patch": [128, 128, 64], "channels_last": True, "compile": True},
]
TINY = ["model.channels=[4, 8, 16, 32, 64]", "data.patch_size=[32, 32, 16]"]


def measure(case: dict) -> dict:
    """One case in this process: warm-up steps (the compile, if any), then timed steps; returns the figures."""
    from attention3d import create_model
    from pipeline.config import load_config
    from pipeline.devices import autocast, resolve_precision
    from pipeline.losses import SegLoss
    from pipeline.optimizer import build_optimizer

    tiny = case.get("tiny", False)
    overrides = [f"data.patch_size=[{', '.join(map(str, case['patch']))}]", "train.precision=bf16"]
    cfg = load_config(ROOT / "configs" / f"{case['config']}.yaml", overrides + (TINY if tiny else []))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, spatial_dims=3, in_channels=1, out_channels=3, **cfg.model.overrides())
    model.to(device).train()
    for module in model.modules():
        if hasattr(module, "fused") and "fused" in case:
            module.fused = case["fused"]
    layout = torch.channels_last_3d if case["channels_last"] else torch.contiguous_format
    model.to(memory_format=layout)
    # On the CPU dry run, dynamo's tracing alone (backend "eager"): inductor's CPU code generation takes minutes
    # there, and failed on this model with torch 2.13 (an assertion in its C++ vectoriser), which says nothing of CUDA.
    backend = "eager" if tiny else "inductor"
    net = torch.compile(model, backend=backend) if case["compile"] else model
    steps = 2 if tiny else 400
    optimizer, scheduler = build_optimizer(cfg, model, total_steps=steps + 10)
    loss_fn = SegLoss(cfg, model.aux_outputs, 3)
    batch = cfg.train.batch_size
    image = torch.randn(batch, 1, *cfg.data.patch_size, device=device).contiguous(memory_format=layout)
    label = torch.randint(0, 3, (batch, 1, *cfg.data.patch_size), device=device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            outputs = net(image)
        loss = loss_fn(outputs, label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or 1e9)
        optimizer.step()
        scheduler.step()
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(0 if tiny else 2):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done, start, limit = 0, time.perf_counter(), 0.0 if tiny else 5.0  # seconds of timed steps
    while done < steps and (done < 2 or time.perf_counter() - start < limit):
        loss = step()
        done += 1
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss_bytes()
    return {
        **{k: v for k, v in case.items() if k != "tiny"},
        "patch": list(cfg.data.patch_size),
        "model": cfg.model.name,
        "batch": batch,
        "precision": str(dtype).removeprefix("torch."),
        "device": device.type,
        "first_step_s": round(first, 2),
        "steps": done,
        "iterations_per_s": round(done / seconds, 2),
        "peak_gib": round(peak / 2**30, 2),
        "peak_kind": "max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "compile_backend": backend if case["compile"] else None,
        "finite": bool(torch.isfinite(loss.detach().float())),
    }


def run_case(case: dict, timeout: float) -> dict:
    """`measure(case)` in a fresh process, at most `timeout` seconds; a failure comes back as {"error": ...}."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu.training", "--case", json.dumps(case)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {**case, "error": f"no result within {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        return {**case, "error": lines[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, help="the check's results folder: writes training.json there")
    parser.add_argument("--budget-s", type=float, default=170.0, help="for all cases together")
    parser.add_argument("--tiny", action="store_true", help="a check of the script on the CPU, not a measurement")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in the worker process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(json.loads(args.case))))
        return
    cases = [dict(c, tiny=True) for c in CASES] if args.tiny else CASES
    deadline = time.monotonic() + args.budget_s
    rows: list[dict] = []
    for case in cases:
        left = deadline - time.monotonic()
        if left < 5:
            rows.append({**case, "error": "not run: the budget was spent"})
        else:
            # No case may take more than half of what is left, so one that hangs leaves room for the others.
            rows.append(run_case(case, timeout=max(left / 2, min(left, 60.0))))
        print(json.dumps(rows[-1]), flush=True)
        if args.results:
            atomic_write_text(args.results / "training.json", json.dumps({"tiny": args.tiny, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
