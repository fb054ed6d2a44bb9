"""Costs of tiny networks: FLOPs against a count by hand, parameters against the model's own, memory that grows with
the batch, and the caller's random state and threads left alone. No timed asserts: times only need to be real
positive numbers."""

from __future__ import annotations

import math

import pytest
import torch

from attention3d import create_model
from pipeline.config import load_config
from pipeline.study.costs import COST_KEYS, measure_costs

TINY = [
    "model.channels=[4, 8]",
    "model.strides=[2]",
    "data.patch_size=[16, 16, 16]",
    "train.batch_size=1",
    "data.samples_per_volume=1",
]


def tiny(name: str = "unet", *extra: str):
    return load_config(None, [f"model.name={name}", *TINY, *extra])


def unet_flops_by_hand(c0: int, c1: int, classes: int, edge: int = 16) -> int:
    """The plain U-Net of two levels (attention3d/models/unet.py: two 3x3x3 conv-norm-act per block, a strided
    first conv down, a 2x2x2 transposed conv up, a 1x1x1 head); 2 FLOPs per multiply-add, norms not counted."""
    fine, coarse = edge**3, (edge // 2) ** 3
    k = 27
    macs = fine * k * (1 * c0 + c0 * c0)  # encoder 0
    macs += coarse * k * (c0 * c1 + c1 * c1)  # encoder 1, first conv strided: computed at the coarse grid
    macs += coarse * 8 * c1 * c0  # transposed conv: each coarse voxel spreads over 2x2x2 fine ones
    macs += fine * k * (2 * c0 * c0 + c0 * c0)  # decoder 0 on the concatenation of upsampled and skip
    macs += fine * c0 * classes  # head
    return 2 * macs


def test_costs_of_a_tiny_unet():
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    costs = measure_costs(tiny(), num_classes=3, repeats=1)
    assert set(costs) == set(COST_KEYS)
    assert all(math.isfinite(v) and v > 0 for v in costs.values()), costs
    # The caller's state is its own.
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)
    model = create_model("unet", channels=(4, 8), strides=(2,), out_channels=3)
    assert costs["parameters"] == sum(p.numel() for p in model.parameters())
    assert costs["gflops_per_patch"] * 1e9 == pytest.approx(unet_flops_by_hand(4, 8, 3), rel=0.01)
    # Peak memory holds at least the weights, their gradients and AdamW's two moments, in float32.
    assert costs["peak_train_mib"] * 2**20 >= 4 * 4 * costs["parameters"]


def test_wider_networks_and_attention_cost_more():
    narrow = measure_costs(tiny(), num_classes=3, repeats=1)
    wide = measure_costs(tiny("unet", "model.channels=[8, 16]"), num_classes=3, repeats=1)
    assert wide["gflops_per_patch"] * 1e9 == pytest.approx(unet_flops_by_hand(8, 16, 3), rel=0.01)
    assert wide["parameters"] > narrow["parameters"]
    danet = measure_costs(tiny("danet"), num_classes=3, repeats=1)  # auxiliary PAM/CAM outputs in training
    assert danet["gflops_per_patch"] > narrow["gflops_per_patch"]
    assert danet["parameters"] > narrow["parameters"]
    assert all(math.isfinite(v) and v > 0 for v in danet.values()), danet


def test_peak_memory_grows_with_the_batch():
    four = measure_costs(tiny("unet", "train.batch_size=4"), num_classes=3, repeats=1)["peak_train_mib"]
    sixteen = measure_costs(tiny("unet", "train.batch_size=16"), num_classes=3, repeats=1)["peak_train_mib"]
    # Activations of 16^3 patches at 4 channels are about 64 KiB each, dozens per step: 12 more patches add well
    # over 6 MiB. (Not from batch 1: on an AVX2 CPU oneDNN's batch-1 convolutions take a workspace of their own, and
    # a step of 1 patch measured 4.15 MiB against 2.36 for 2 and 4.64 for 4; 16 measured 18.3.)
    assert sixteen > four + 6.0, (four, sixteen)


@pytest.mark.gpu
def test_costs_on_cuda():
    costs = measure_costs(tiny(), num_classes=3, device="cuda", repeats=2)
    assert all(math.isfinite(v) and v > 0 for v in costs.values()), costs
    assert costs["gflops_per_patch"] * 1e9 == pytest.approx(unet_flops_by_hand(4, 8, 3), rel=0.01)
