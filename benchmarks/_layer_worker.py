"""One layer measurement in a fresh process (see benchmarks/layers.py); prints one JSON line."""

from __future__ import annotations

import json
import sys

import torch

from benchmarks._report import max_rss_bytes, median_time


def build(name: str, channels: int, dims: int) -> torch.nn.Module:
    from attention3d import ChannelAttention, EMAttention, NonLocalBlock, PositionAttention

    if name.startswith("pam"):
        module = PositionAttention(dims, channels)
        module.fused = name == "pam_fused"
        torch.nn.init.constant_(module.gamma, 0.5)
        return module
    if name == "cam":
        return ChannelAttention()
    if name == "ema":
        return EMAttention(dims, channels)
    if name == "nonlocal":
        return NonLocalBlock(dims, channels)
    raise ValueError(name)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    torch.manual_seed(0)
    n, c, mode = cfg["edge"], cfg["channels"], cfg["mode"]
    module = build(cfg["layer"], c, 3)
    x = torch.randn(1, c, n, n, n, requires_grad=mode == "train")
    if mode == "train":
        module.train()

        def step():
            module(x).sum().backward()
    else:
        module.eval()

        def step():
            with torch.no_grad():
                module(x)

    base = max_rss_bytes()
    step()
    extra = max_rss_bytes() - base
    seconds = median_time(step, repeats=cfg.get("repeats", 3), warmup=0)
    print(json.dumps({"extra_bytes": extra, "seconds": seconds}))


if __name__ == "__main__":
    main()
