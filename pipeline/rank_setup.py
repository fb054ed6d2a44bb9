"""One rank's training objects: device, model (wrapped in DistributedDataParallel when distributed), loss,
optimiser, schedule and grad scaler, its own share of the cases as datasets, and the Predictor that validates on
whole volumes exactly as `seg3d infer` predicts; on resume, all of it as the last checkpoint left it.

Setting up seeds the process (MONAI's set_determinism, which also makes cuDNN deterministic and turns its benchmark
off) and may set the thread count (train.threads). Those settings are the whole process's: `torch_settings_restored`
gives the process its own back when training ends, so that a caller's later work is not slowed or changed by them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.data import CacheDataset
from monai.utils import set_determinism
from torch import nn

from pipeline.bundle import load_state_dict_checked, set_rng_state
from pipeline.config import Config
from pipeline.devices import resolve_device, resolve_precision
from pipeline.distributed import Dist
from pipeline.errors import Seg3dError
from pipeline.losses import SegLoss
from pipeline.optimizer import build_optimizer
from pipeline.predict import Predictor
from pipeline.run_folder import CHECKPOINTS
from pipeline.summary import build
from pipeline.train_data import loader_workers, make_train_dataset
from pipeline.transforms import Preprocessing, validation_transforms
from pipeline.val_engine import ValidationEngine

if TYPE_CHECKING:
    from pipeline.run_start import Plan


@dataclass
class Setup:
    """One rank's model, optimiser and share of the data."""

    device: torch.device
    model: nn.Module
    net: nn.Module  # what the training step calls: `model`, or its DistributedDataParallel wrapper
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: SegLoss
    train_ds: Any
    val_ds: Any
    predictor: Predictor
    workers: int
    val_engine: ValidationEngine  # which engine runs validation's windows (train.val_backend)


def setup_rank(*, dist: Dist, cfg: Config, plan: Plan, pre: Preprocessing, run_dir: Path) -> Setup:
    """Build this rank's objects for what rank 0 planned; a user error (a bad model option, fp16 on
    the CPU) raises Seg3dError before anything of the run is written."""
    num_classes = len(plan.class_names)
    device = dist.device(resolve_device(cfg.train.device, option="train.device"))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_determinism(seed=cfg.train.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build(cfg.model.name, spatial_dims=3, in_channels=1, out_channels=num_classes, **cfg.model.overrides())
    model.to(device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    if amp_dtype == torch.float16 and device.type != "cuda":
        raise Seg3dError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    state = plan.state
    total_steps = cfg.train.epochs * cfg.train.iterations_per_epoch
    like = None if state is None else state["optimizer"]
    optimizer, scheduler = build_optimizer(cfg, model, total_steps=total_steps, like=like)
    loss_fn = SegLoss(cfg, model.aux_outputs, num_classes)

    if state is not None:
        load_state_dict_checked(model, state["model"], run_dir / CHECKPOINTS / "last.pt")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        per_rank = state.get("rng_ranks") or []
        if len(per_rank) == dist.world:
            set_rng_state(per_rank[dist.rank])
        elif dist.is_main:
            set_rng_state(state["rng"])
        else:
            set_determinism(seed=cfg.train.seed + dist.rank)  # saved by another world size: a fresh stream
    elif not dist.is_main:
        set_determinism(seed=cfg.train.seed + dist.rank)  # other ranks draw other random numbers

    net = model
    if dist.enabled:
        # An auxiliary output whose loss weight is 0 leaves its branch without gradient; DDP must be told.
        unused = any(w == 0 for w in loss_fn.weights)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
        )

    # Each rank preprocesses and caches only its own cases.
    train_ds = make_train_dataset(cfg, pre, records=dist.partition(plan.train_records), run_dir=run_dir)
    val_share = dist.partition(plan.val_records)
    val_ds = CacheDataset(val_share, validation_transforms(pre), progress=False) if val_share else []
    return Setup(
        device=device,
        model=model,
        net=net,
        amp_dtype=amp_dtype,
        scaler=scaler,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        train_ds=train_ds,
        val_ds=val_ds,
        predictor=validation_predictor(model, cfg=cfg, pre=pre, device=device),
        workers=loader_workers(cfg, device, ranks_per_node=dist.local_world),
        val_engine=ValidationEngine(
            cfg.train.val_backend, device=device, notes=print if dist.is_main else lambda line: None
        ),
    )


def validation_predictor(model: nn.Module, *, cfg: Config, pre: Preprocessing, device: torch.device) -> Predictor:
    """The Predictor that scores a training network: the config's patch and sliding window at train.precision,
    without post-processing (the Dice of the network itself)."""
    return Predictor(
        model=model,
        pre=pre,
        patch_size=cfg.data.patch_size,
        inference=cfg.inference,
        device=device,
        precision=cfg.train.precision,
    )


@contextmanager
def torch_settings_restored() -> Iterator[None]:
    """The thread count and cuDNN's deterministic and benchmark flags as they were on entry, when the block ends by
    return or by exception."""
    threads = torch.get_num_threads()
    deterministic, benchmark = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = benchmark
