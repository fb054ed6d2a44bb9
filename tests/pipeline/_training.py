"""Shared by the training tests: tiny networks and runs on a small phantom dataset, a few iterations each."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from pipeline.config import Config, load_config
from pipeline.synthetic import synthesize

if TYPE_CHECKING:  # the gpu tests import this module where MLflow is absent (benchmarks/gpu/check.sh)
    import mlflow

TINY = [
    "model.channels=[4, 8, 16]",
    "model.strides=[2, 2]",
    "data.patch_size=[32, 32, 16]",
    "data.target_spacing=[2.0, 2.0, 4.0]",
    "data.num_workers=0",
    "train.epochs=2",
    "train.iterations_per_epoch=3",
    "train.folds=2",
    "train.threads=2",
    "inference.sw_batch_size=2",
]


def phantom_data(root: Path) -> Path:
    """Four labelled phantom cases and one test case (MSD layout) in `root`."""
    synthesize(root, cases=4, seed=2, test_cases=1)
    return root


def tiny_cfg(*extra: str, name: str = "attention_unet") -> Config:
    return load_config(None, [f"model.name={name}", *TINY, *extra])


def mlflow_client(uri: str) -> mlflow.MlflowClient:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def bundle_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "bundle" / "model.safetensors")
