"""The training cases as a dataset and, per epoch, a loader of random patches.

The deterministic part of the training transforms (preprocessing, padding to the patch, foreground indices) is
computed once per case and kept in memory or on disk (`data.cache`: memory, disk, or none to compute it every time);
the random part (patch sampling, augmentation) runs every time a case is drawn.
Sampling and augmentation depend only on (seed, epoch, rank), so a resumed run sees the same patches an unbroken
one would have, and each rank of a distributed run other ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, PersistentDataset
from monai.data import Dataset as MonaiDataset

from pipeline.config import Config
from pipeline.errors import Seg3dError
from pipeline.transforms import Chain, Preprocessing, cached_train_transforms, random_train_transforms


def make_train_dataset(cfg: Config, pre: Preprocessing, *, records: list[dict], run_dir: Path):
    """The dataset of `records` with the cache `cfg.data.cache` asks for (disk: in cfg.data.cache_dir, or in
    RUN_DIR/cache)."""
    transform = Chain([*cached_train_transforms(cfg, pre).transforms, *random_train_transforms(cfg, pre).transforms])
    if cfg.data.cache == "memory":
        return CacheDataset(records, transform, num_workers=min(4, os.cpu_count() or 1), progress=False)
    if cfg.data.cache == "disk":
        # MONAI keys cached items by the record alone; a folder per preprocessing keeps a cache_dir shared by runs
        # with other statistics, spacing or patch size from serving stale volumes.
        key = hashlib.sha256((pre.to_json() + json.dumps(cfg.data.model_dump(mode="json"))).encode()).hexdigest()[:16]
        cache_dir = (cfg.data.cache_dir or (run_dir / "cache")) / key
        cache_dir.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(records, transform, cache_dir=cache_dir)
    return MonaiDataset(records, transform)


def loader_workers(cfg: Config, device: torch.device, ranks_per_node: int = 1) -> int:
    """data.num_workers, or by default half the cores shared by this machine's ranks (at most 8) when a GPU trains,
    none on the CPU (whose cores compute the network)."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    return min(8, (os.cpu_count() or 2) // 2 // ranks_per_node) if device.type == "cuda" else 0


def epoch_loader(cfg: Config, dataset, *, epoch: int, workers: int, rank: int = 0) -> DataLoader:
    """A loader for one epoch whose sampling and augmentation depend only on (seed, epoch, rank): a resumed run sees
    the same patches it would have seen without the interruption, and each rank of a distributed run other ones."""
    t, d = cfg.train, cfg.data
    if t.batch_size % d.samples_per_volume:
        raise Seg3dError(
            f"train.batch_size ({t.batch_size}) must be a multiple of data.samples_per_volume ({d.samples_per_volume})"
        )
    volumes = t.batch_size // d.samples_per_volume
    seed = t.seed * 100_003 + epoch + rank * 1_000_003
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=t.iterations_per_epoch * volumes, generator=generator
    )
    if workers == 0:
        dataset.transform.set_random_state(seed=seed % (2**32))
    return DataLoader(dataset, batch_size=volumes, sampler=sampler, num_workers=workers, generator=generator)
