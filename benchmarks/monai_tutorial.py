"""The peer: MONAI's `AttentionUnet` run the MONAI tutorial way (LoadImaged ... sliding_window_inference ...
Invertd, SaveImaged), timed per stage. benchmarks/inference.py and benchmarks/engines.py run it beside `seg3d infer`
with the same patch size, overlap and Gaussian blending."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import AttentionUnet
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    SaveImaged,
    ScaleIntensityRanged,
    Spacingd,
)
from torch import nn

STAGES = ("load", "preprocess", "network", "stitch", "invert", "write")


class TimedNetwork(nn.Module):
    """The peer as sliding_window_inference sees it: seconds inside the forward, and windows seen."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, device
        self.seconds, self.windows = 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.windows += x.shape[0]
        return out


def monai_network(cfg) -> nn.Module:
    """MONAI's AttentionUnet with the channels and strides of the config's network."""
    channels, strides = tuple(cfg.model.channels), tuple(cfg.model.strides)
    return AttentionUnet(spatial_dims=3, in_channels=1, out_channels=3, channels=channels, strides=strides)


def monai_once(weights: Path, images: list[Path], out: Path, pre, cfg, device, bf16: bool) -> dict:
    """The MONAI tutorial way: pre-transforms, sliding window (fp32 unless `bf16`), Invertd, argmax, SaveImaged."""
    start = time.perf_counter()
    model = monai_network(cfg)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    network = TimedNetwork(model.to(device).eval(), device)
    lo, hi = pre.clip
    pre_t = Compose(
        [
            LoadImaged(keys="image", reader="NibabelReader"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=pre.target_spacing, mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
            NormalizeIntensityd(keys="image", subtrahend=pre.mean, divisor=pre.std),
        ]
    )
    invert = Compose(
        [
            Invertd(keys="pred", transform=pre_t, orig_keys="image", nearest_interp=False),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )
    save = SaveImaged(
        keys="pred",
        output_dir=out,
        output_postfix="",
        separate_folder=False,
        output_dtype=np.uint8,
        writer="NibabelWriter",
        print_log=False,
    )
    stages = dict.fromkeys(STAGES, 0.0)
    for path in images:
        t = time.perf_counter()
        data = pre_t({"image": str(path)}, end=2)
        stages["load"] += time.perf_counter() - t
        t = time.perf_counter()
        data = pre_t(data, start=2)
        stages["preprocess"] += time.perf_counter() - t
        t, before = time.perf_counter(), network.seconds
        x = data["image"][None].to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = sliding_window_inference(
                x,
                roi_size=cfg.data.patch_size,
                sw_batch_size=cfg.inference.sw_batch_size,
                predictor=network,
                overlap=cfg.inference.overlap,
                mode="gaussian",
                sigma_scale=cfg.inference.sigma_scale,
            )
        data["pred"] = pred[0].cpu()
        stages["network"] += network.seconds - before
        stages["stitch"] += time.perf_counter() - t - (network.seconds - before)
        t = time.perf_counter()
        data = invert(data)
        stages["invert"] += time.perf_counter() - t
        t = time.perf_counter()
        save(data)
        stages["write"] += time.perf_counter() - t
    return {"wall": time.perf_counter() - start, "stages": stages, "windows": network.windows}


def run_monai(*args, repeats: int = 2) -> dict:
    for _ in range(repeats - 1):
        monai_once(*args)  # cold runs, not kept
    return monai_once(*args)
