"""One model measurement in a fresh process (see benchmarks/models.py); prints one JSON line."""

from __future__ import annotations

import json
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._report import max_rss_bytes, median_time

CHANNELS = (16, 32, 64, 128, 256)
STRIDES = (2, 2, 2, 2)


def build(name: str) -> torch.nn.Module:
    if name == "monai_attention_unet":
        from monai.networks.nets import AttentionUnet

        return AttentionUnet(spatial_dims=3, in_channels=1, out_channels=3, channels=CHANNELS, strides=STRIDES)
    from attention3d import create_model

    return create_model(name, channels=CHANNELS, strides=STRIDES)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    torch.manual_seed(0)
    model = build(cfg["model"]).eval()
    x = torch.randn(1, 1, *([cfg["patch"]] * 3))
    dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg["precision"]]

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return model(x)

    base = max_rss_bytes()
    start = time.perf_counter()
    out = forward()
    first = time.perf_counter() - start
    extra = max_rss_bytes() - base
    repeats = cfg.get("repeats", 3)
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "extra_bytes": extra,
        # repeats = 0: the first forward alone (for emulated bf16, where each forward takes minutes).
        "seconds": median_time(forward, repeats=repeats, warmup=0) if repeats else first,
        "finite": bool(torch.isfinite(out.float()).all()),
    }
    if cfg.get("flops"):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        result["flops"] = counter.get_total_flops()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
