"""What the GPU rewards at inference: seg3d's Predictor on one CT with one setting changed at a time.

    python -m benchmarks.gpu.variants --bundle DIR --image CT.nii.gz --results DIR [--label NAME] [--budget-s 120]

Settings against the default (`auto` precision = bf16 on the GPU, NCDHW, the config's window batch, full-volume sums
on the GPU when they fit): fp32; channels-last; larger window batches; the sums in host memory; torch.compile of the
network; torch.compile with CUDA graphs (mode "reduce-overhead": the windows have a fixed size, so one graph serves
all full batches). Per setting: wall time of `predict_file` (read, preprocess, sliding window, invert,
post-process; no writing), the network's share of it, windows per second and peak GPU memory; the first call
(compilation) is a warm-up, the median of the next two is kept. Each setting runs in a process of its own,
time-boxed; rows go to DIR/variants_NAME.json as they come. On the CPU (the dry run) every setting runs once, without
the compiled ones' code generation (backend "eager").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._report import ROOT, max_rss_bytes
from pipeline.fileio import atomic_write_text

SETTINGS = [
    {"name": "default"},
    {"name": "fp32", "precision": "fp32"},
    {"name": "channels-last", "channels_last": True},
    {"name": "window batch 8", "sw_batch_size": 8},
    {"name": "window batch 16", "sw_batch_size": 16},
    {"name": "window batch 32", "sw_batch_size": 32},
    {"name": "sums in host memory", "host_sums": True},
    {"name": "channels-last, window batch 16", "channels_last": True, "sw_batch_size": 16},
    {"name": "torch.compile", "compile": "default"},
    {"name": "torch.compile + CUDA graphs", "compile": "reduce-overhead"},
]


def measure(setting: dict, bundle_dir: Path, image: Path) -> dict:
    from pipeline.bundle import load_bundle
    from pipeline.predict import Predictor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_bundle(bundle_dir)
    cfg = bundle.config
    inference = cfg.inference
    if "sw_batch_size" in setting:
        inference = inference.model_copy(update={"sw_batch_size": setting["sw_batch_size"]})
    predictor = Predictor(
        bundle.model,
        pre=bundle.preprocessing,
        patch_size=cfg.data.patch_size,
        inference=inference,
        postprocessing=cfg.postprocess,
        device=device,
        precision=setting.get("precision", "auto"),
        channels_last=setting.get("channels_last", device.type == "cpu"),  # from_bundle's choice by default
        fold_norms=True,
    )
    if setting.get("host_sums"):
        predictor._accumulator_device = lambda spatial, channels: torch.device("cpu")
    if setting.get("compile"):
        options = {"backend": "eager"} if device.type == "cpu" else {"mode": setting["compile"]}
        predictor.model = torch.compile(predictor.model, **options)
    windows = [0]
    predictor.model.register_forward_hook(lambda m, args, out: windows.__setitem__(0, windows[0] + len(args[0])))

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        pred = predictor.predict_file(image, case="ct")
        return time.perf_counter() - start, pred.timings.get("network", 0.0)

    first, _ = once()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [once() for _ in range(2 if device.type == "cuda" else 1)]
    walls, nets = [r[0] for r in runs], [r[1] for r in runs]
    windows_per_call = windows[0] // (1 + len(runs))
    wall, network = statistics.median(walls), statistics.median(nets)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max_rss_bytes()
    return {
        **setting,
        "device": device.type,
        "first_call_s": round(first, 2),
        "wall_s": round(wall, 3),
        "network_s": round(network, 3),
        "network_share": round(network / wall, 3) if wall else None,
        "windows": windows_per_call,
        "windows_per_s": round(windows_per_call / network, 1) if network else None,
        "peak_gib": round(peak / 2**30, 2),
    }


def run_setting(setting: dict, bundle: Path, image: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu.variants", "--bundle", str(bundle), "--image", str(image)]
    try:
        proc = subprocess.run(
            [*cmd, "--setting", json.dumps(setting)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {**setting, "error": f"no result within {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        return {**setting, "error": lines[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--label", default="demo", help="names the results file: variants_LABEL.json")
    parser.add_argument("--budget-s", type=float, default=120.0, help="for all settings together")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # one setting, in the worker process
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(measure(json.loads(args.setting), args.bundle, args.image)))
        return
    deadline = time.monotonic() + args.budget_s
    rows: list[dict] = []
    for setting in SETTINGS:
        left = deadline - time.monotonic()
        if left < 5:
            rows.append({**setting, "error": "not run: the budget was spent"})
        else:
            rows.append(run_setting(setting, args.bundle, args.image, timeout=max(left / 2, min(left, 45.0))))
        print(json.dumps(rows[-1]), flush=True)
        if args.results:
            payload = {"bundle": str(args.bundle), "image": args.image.name, "rows": rows}
            atomic_write_text(args.results / f"variants_{args.label}.json", json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
