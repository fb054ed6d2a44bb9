"""Model summaries for the CLI: parameters, attention plug points, FLOPs of one forward pass."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attention3d import create_model, list_models
from pipeline.errors import Seg3dError, one_line


def build(name: str, **overrides) -> nn.Module:
    """create_model with the registry's ValueError turned into the project's error."""
    try:
        return create_model(name, **overrides)
    except (ValueError, TypeError, RuntimeError) as err:  # MONAI's norm factory raises several lines of text
        raise Seg3dError(one_line(err, limit=600)) from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plug_points(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "-"
    parts = [f"skip={cfg.skip}" if cfg.skip else "", f"context={cfg.context}" if cfg.context else ""]
    parts.append(f"recalibration={cfg.recalibration}" if cfg.recalibration else "")
    return ", ".join(p for p in parts if p) or "none"


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward pass, counted by PyTorch's FlopCounterMode (a multiply-add is 2 FLOPs)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def models_table() -> list[dict]:
    rows = []
    for name in list_models():
        model = build(name)
        rows.append(
            {
                "model": name,
                "params_M": count_parameters(model) / 1e6,
                "plug_points": plug_points(model),
                "aux_outputs": ", ".join(model.output_names[1:]) or "-",
            }
        )
    return rows


def demo_summary(name: str, patch: int, channels: tuple[int, ...], seed: int = 0) -> dict:
    """Build a small model, run one forward and one training step on a random patch, report what happened."""
    torch.manual_seed(seed)
    model = build(name, channels=channels, strides=(2,) * (len(channels) - 1))
    x = torch.randn(1, 1, patch, patch, patch)
    flops = forward_flops(model, x)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    forward_s = time.perf_counter() - start

    model.train()
    out = model(x)
    main = out[0] if isinstance(out, list) else out
    target = torch.randint(0, main.shape[1], (1, *main.shape[2:]))
    loss = nn.functional.cross_entropy(main, target)
    loss.backward()
    return {
        "model": name,
        "params": count_parameters(model),
        "plug_points": plug_points(model),
        "input": tuple(x.shape),
        "logits": tuple(logits.shape),
        "gflops": flops / 1e9,
        "forward_s": forward_s,
        "train_outputs": model.output_names,
        "loss": float(loss.detach()),
    }
