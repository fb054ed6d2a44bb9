"""Shared by the pipeline tests: a small preprocessing and the untrained attention_unet bundle built from it.
Geometry, plumbing and refusals do not depend on what the weights learned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attention3d import create_model
from pipeline.bundle import save_bundle
from pipeline.config import load_config
from pipeline.transforms import Preprocessing

PRE = Preprocessing(
    target_spacing=(2.0, 2.0, 4.0),
    intensity_mode="foreground",
    clip=(-50.0, 250.0),
    mean=100.0,
    std=40.0,
    foreground_crop=True,
    body_threshold_hu=-500.0,
    label_names=["background", "pancreas", "cancer"],
    label_values=[0, 1, 2],
    exhaustive=True,
)
TINY = ["model.channels=[4, 8, 16]", "model.strides=[2, 2]", "data.patch_size=[32, 32, 16]"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """An untrained attention_unet bundle with TINY's network and PRE, one per test module."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=attention_unet", *TINY])
    model = create_model("attention_unet", channels=(4, 8, 16), strides=(2, 2), out_channels=3)
    return save_bundle(tmp_path_factory.mktemp("bundle") / "bundle", model, cfg, PRE)
