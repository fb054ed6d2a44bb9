"""The training loop: `train(cfg, data, output)`, callable from tests and from `seg3d train`.

config -> datalist + integrity check -> split -> statistics -> transforms -> cached dataset and loader -> model
-> DiceCE (+ the variant's auxiliary losses) -> AdamW/SGD with a poly or cosine schedule, mixed precision,
gradient clipping -> validation on whole volumes with the Predictor that inference uses -> checkpoints,
bundle, MLflow.

Distributed: under torchrun every rank runs `train`; see pipeline/distributed.py and `train`'s docstring.

Crash safety: a checkpoint is written (atomically) before an epoch's metrics are sent to MLflow, and `--resume`
sends whatever epochs the tracking server does not have yet, so a kill at any point loses no epoch and
duplicates none.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, PersistentDataset
from monai.data import Dataset as MonaiDataset
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from torch import nn
from tqdm.auto import tqdm

from attention3d import se_loss
from pipeline import faults
from pipeline.bundle import (
    atomic_write,
    atomic_write_text,
    load_checkpoint,
    load_state_dict_checked,
    remove_temporaries,
    rng_state,
    save_bundle,
    save_checkpoint,
    set_rng_state,
)
from pipeline.config import Config, config_from_dict, load_config, save_config
from pipeline.distributed import Dist, restart_count
from pipeline.errors import Seg3dError
from pipeline.evaluate import dice_per_class, mean_foreground_dice
from pipeline.predict import Predictor, autocast, resolve_precision
from pipeline.summary import build
from pipeline.tracking import Tracker
from pipeline.transforms import (
    IMAGE,
    LABEL,
    Chain,
    Preprocessing,
    as_record,
    cached_train_transforms,
    compute_preprocessing,
    random_train_transforms,
    validation_transforms,
)

CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    run_dir: Path
    bundle: Path
    run_id: str | None
    tracking_uri: str
    epochs: int
    best_epoch: int
    best_dice: float
    history: list[dict] = field(default_factory=list)
    registered_version: str | None = None
    class_names: list[str] = field(default_factory=list)


class RunLock:
    """An exclusive lock on RUN_DIR: a second training pointed at the same folder is refused, not interleaved."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise Seg3dError(
                f"{self.path.parent} is in use by another training (lock {self.path}); "
                "wait for it to end or choose another --output"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


# -- pieces -----------------------------------------------------------------------------------------------------


def kfold_split(case_ids: list[str], folds: int, fold: int, seed: int) -> dict[str, Any]:
    """Seeded k-fold over the sorted case ids: the same cases, folds and seed give the same split anywhere."""
    ids = sorted(case_ids)
    if len(ids) < folds:
        raise Seg3dError(
            f"{len(ids)} labelled case(s) cannot make {folds} folds; set train.folds to at most {len(ids)} "
            "(and at least 2), or add cases"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, folds)
    val = sorted(ids[i] for i in parts[fold])
    return {"folds": folds, "fold": fold, "seed": seed, "train": [c for c in ids if c not in set(val)], "val": val}


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise Seg3dError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class SegLoss(nn.Module):
    """DiceCE on the main logits plus the variant's auxiliaries: deep supervision (weight w**level), DANet's
    PAM and CAM branch logits, EncNet's SE-loss on class presence."""

    def __init__(self, cfg: Config, output_names: list[str], num_classes: int):
        super().__init__()
        lc = cfg.loss
        self.dice_ce = DiceCELoss(
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            batch=lc.batch_dice,
            lambda_dice=lc.dice_weight,
            lambda_ce=lc.ce_weight,
        )
        self.names = output_names
        self.num_classes = num_classes
        self.weights = []
        for name in output_names[1:]:
            if name.startswith("ds"):
                self.weights.append(lc.deep_supervision ** int(name[2:]))
            elif name.startswith("pam"):
                self.weights.append(lc.pam)
            elif name.startswith("cam"):
                self.weights.append(lc.cam)
            elif name.startswith("se"):
                self.weights.append(lc.se)
            else:
                raise ValueError(f"no loss weight for auxiliary output {name!r}")

    def forward(self, outputs, label: torch.Tensor) -> torch.Tensor:
        outs = outputs if isinstance(outputs, list) else [outputs]
        loss = self.dice_ce(outs[0].float(), label)
        for name, w, out in zip(self.names[1:], self.weights, outs[1:]):
            if w == 0:
                continue
            if name.startswith("se"):
                loss = loss + w * se_loss(out.float(), label, self.num_classes)
            else:
                loss = loss + w * self.dice_ce(out.float(), label)
        return loss


def build_optimizer(cfg: Config, model: nn.Module, total_steps: int):
    t = cfg.train
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    if t.schedule == "poly":
        sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total_steps, power=t.poly_power)
    elif t.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    return opt, sched


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cases_by_id(dataset) -> dict[str, Any]:
    return {c.case: c for c in dataset.cases}


def _make_train_dataset(cfg: Config, pre: Preprocessing, records: list[dict], run_dir: Path):
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
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    return min(8, (os.cpu_count() or 2) // 2 // ranks_per_node) if device.type == "cuda" else 0


def _epoch_loader(cfg: Config, dataset, epoch: int, workers: int, rank: int = 0) -> DataLoader:
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


def validate(predictor: Predictor, val_data, num_classes: int) -> dict[str, list[float]]:
    """Dice per case and class on whole preprocessed volumes, by the sliding-window path inference uses."""
    per_case = {}
    for item in val_data:
        logits = predictor.predict_preprocessed(item[IMAGE][None].as_tensor())
        pred = logits.argmax(1)[0]
        per_case[item["case"]] = dice_per_class(pred, item[LABEL][0].as_tensor().long(), num_classes)
        faults.point("validation.case")
    return per_case


def _flatten_epoch(epoch: int, names: list[str], loss: float, lr: float, secs: float, its: float, val) -> dict:
    row = {"epoch": epoch, "train_loss": loss, "lr": lr, "epoch_time_s": secs, "iterations_per_s": its}
    if val is not None:
        per_class, mean = mean_foreground_dice(list(val.values()))
        row.update({f"val_dice_{n}": v for n, v in zip(names[1:], per_class)})
        row["val_dice_mean"] = mean
    return row


# -- the loop ---------------------------------------------------------------------------------------------------


def train(
    cfg: Config | None,
    data: Path | str,
    output: Path | str,
    tracking_uri: str | None = None,
    resume: bool = False,
    config_path: Path | str | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train one fold; see the module docstring. `cfg` may be None with resume=True (the stored config is used).

    Under torchrun (WORLD_SIZE > 1) every rank calls this: rank 0 owns RUN_DIR (lock, files, checkpoints, bundle)
    and the MLflow run; all ranks train a DistributedDataParallel copy on their own share of the cases. After
    torchrun restarted the group (TORCHELASTIC_RESTART_COUNT > 0), a run folder that already holds this run is
    resumed from its last checkpoint."""
    dist = Dist.from_env()
    run_dir = Path(output)
    created = dist.is_main and not run_dir.exists()
    dist.init()
    try:
        with contextlib.ExitStack() as stack:
            return _train_locked(dist, stack, cfg, Path(data), run_dir, tracking_uri, resume, config_path, progress)
    except Seg3dError:
        if created and run_dir.exists() and {p.name for p in run_dir.iterdir()} <= {".lock"}:
            shutil.rmtree(run_dir, ignore_errors=True)  # refused before anything was written: leave no trace
        raise
    finally:
        dist.close()


def _prepare_run_dir(cfg: Config | None, run_dir: Path, resume: bool) -> tuple[Config, dict | None, dict]:
    stored_cfg = run_dir / "config.yaml"
    last = run_dir / CHECKPOINTS / "last.pt"
    run_info_path = run_dir / "run.json"
    if not resume:
        if stored_cfg.exists() or last.exists():
            raise Seg3dError(
                f"{run_dir} already holds a training run; pass --resume to continue it or choose another --output"
            )
        if cfg is None:
            raise Seg3dError("no config given; pass --config configs/NAME.yaml")
        return cfg, None, {}
    if not stored_cfg.exists():
        raise Seg3dError(f"--resume: {run_dir} holds no training run (no config.yaml); start it without --resume")
    stored = load_config(stored_cfg)
    if cfg is not None and cfg.to_dict() != stored.to_dict():
        a, b = _flat(cfg.to_dict()), _flat(stored.to_dict())
        key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise Seg3dError(
            f"--resume: the given config differs from the run's stored config at '{key}' "
            f"({a.get(key)!r} vs {b.get(key)!r}); resume without --config or with the same one"
        )
    run_info = json.loads(run_info_path.read_text()) if run_info_path.exists() else {}
    state = load_checkpoint(last) if last.exists() else None
    return stored, state, run_info


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


@dataclass
class _Plan:
    """What rank 0 decided before any compute, handed to every rank (plain, picklable values)."""

    config: dict
    resume: bool
    state: dict | None
    run_info: dict
    split: dict
    preprocessing: str
    class_names: list[str]
    train_records: list[dict]
    val_records: list[dict]


def _plan(stack, cfg, data, run_dir, tracking_uri, resume, world, main_only: dict) -> _Plan:
    """Rank 0: lock RUN_DIR, check the config, tracking store and dataset, fix split and preprocessing."""
    from pipeline.data import check_dataset, load_dataset

    run_dir.mkdir(parents=True, exist_ok=True)
    stack.enter_context(RunLock(run_dir))
    for folder in (run_dir, run_dir / CHECKPOINTS):  # what a killed attempt's writes left, under our lock now
        remove_temporaries(folder)
    if not resume and restart_count() > 0 and (run_dir / "config.yaml").exists():
        resume = True  # torchrun restarted the job after a worker died: continue this run from its last checkpoint
    cfg, state, run_info = _prepare_run_dir(cfg, run_dir, resume)
    tracker = Tracker(
        run_info.get("tracking_uri") if resume and not tracking_uri else tracking_uri, cfg.experiment, run_dir
    )

    labels = None
    if cfg.data.labels:
        labels = dict(cfg.data.labels)
        labels = labels if "background" in labels else {"background": 0, **labels}
    dataset = load_dataset(data, labels=labels)
    report = check_dataset(dataset, include_test=False)
    if not report.ok:
        errors = [f for f in report.findings if f.level == "error"]
        raise Seg3dError(
            f"dataset {data} has {len(errors)} problem(s), first: {errors[0].case}: {errors[0].message}; "
            f"run `seg3d check-data {data}` for all of them"
        )
    tracker.check()  # a dead server is an error now, not after training (and a bad dataset leaves no store behind)

    if state is None or not (run_dir / "split.json").exists():
        split = kfold_split([c.case for c in dataset.cases], cfg.train.folds, cfg.train.fold, cfg.train.seed)
    else:
        split = json.loads((run_dir / "split.json").read_text())
    cases = _cases_by_id(dataset)
    missing = sorted(set(split["train"] + split["val"]) - set(cases))
    if missing:
        raise Seg3dError(f"the run's split names cases the dataset no longer has: {missing[:5]}")
    if len(split["train"]) < world:
        raise Seg3dError(
            f"{len(split['train'])} training case(s) cannot feed {world} ranks (each trains on its own cases); "
            f"start at most {len(split['train'])} processes, or add cases"
        )
    infos = {i.case: i for i in report.infos}
    if (run_dir / "preprocessing.json").exists() and resume:
        pre = Preprocessing.from_json((run_dir / "preprocessing.json").read_text())
    else:
        pre = compute_preprocessing(cfg, dataset.labels, dataset.exhaustive, [infos[c] for c in split["train"]])

    spacings = np.array([infos[c].spacing_ras for c in split["train"]])
    main_only["tracker"], main_only["cfg"] = tracker, cfg
    main_only["dataset_params"] = {
        "path": str(Path(data).resolve()),
        "cases": len(dataset.cases),
        "train_cases": len(split["train"]),
        "val_cases": len(split["val"]),
        "median_spacing_mm": [round(float(s), 3) for s in np.median(spacings, axis=0)],
        "datalist_hash": dataset.fingerprint(),
        "labels": dict(dataset.labels),
    }
    return _Plan(
        config=cfg.to_dict(),
        resume=resume,
        state=state,
        run_info=run_info,
        split=split,
        preprocessing=pre.to_json(),
        class_names=list(dataset.labels),
        train_records=[as_record(c, cases[c].image, cases[c].label) for c in split["train"]],
        val_records=[as_record(c, cases[c].image, cases[c].label) for c in split["val"]],
    )


@dataclass
class _Setup:
    """One rank's model, optimiser and share of the data."""

    device: torch.device
    model: nn.Module
    net: nn.Module  # what the training step calls: `model`, or its DistributedDataParallel wrapper
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    optimizer: Any
    scheduler: Any
    loss_fn: SegLoss
    train_ds: Any
    val_ds: Any
    predictor: Predictor
    workers: int


def _setup(dist: Dist, cfg: Config, plan: _Plan, pre: Preprocessing, run_dir: Path) -> _Setup:
    num_classes = len(plan.class_names)
    device = dist.device(pick_device(cfg.train.device))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_determinism(seed=cfg.train.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build(cfg.model.name, spatial_dims=3, in_channels=1, out_channels=num_classes, **cfg.model.overrides())
    model.to(device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    if amp_dtype == torch.float16 and device.type != "cuda":
        raise Seg3dError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    total_steps = cfg.train.epochs * cfg.train.iterations_per_epoch
    optimizer, scheduler = build_optimizer(cfg, model, total_steps)
    loss_fn = SegLoss(cfg, model.output_names, num_classes)

    state = plan.state
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
    train_ds = _make_train_dataset(cfg, pre, dist.partition(plan.train_records), run_dir)
    val_share = dist.partition(plan.val_records)
    val_ds = CacheDataset(val_share, validation_transforms(pre), progress=False) if val_share else []
    predictor = Predictor(model, pre, cfg.data.patch_size, cfg.inference, None, device, cfg.train.precision)
    workers = loader_workers(cfg, device, ranks_per_node=dist.local_world)
    return _Setup(
        device, model, net, amp_dtype, scaler, optimizer, scheduler, loss_fn, train_ds, val_ds, predictor, workers
    )


def _start_tracking(dist: Dist, cfg, plan: _Plan, s: _Setup, run_dir, data, config_path, main_only) -> str:
    """Rank 0: start (or resume) the MLflow run and write the run's files, now that nothing is left to refuse."""
    tracker: Tracker = main_only["tracker"]
    pre = Preprocessing.from_json(plan.preprocessing)
    tags = {
        "variant": cfg.model.name,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "monai": __import__("monai").__version__,
        "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "precision": str(s.amp_dtype).removeprefix("torch."),
        "fold": str(cfg.train.fold),
    }
    if dist.enabled:
        tags["distributed"] = f"{dist.world} ranks, {dist.backend}"
    run_info = plan.run_info
    run_id = tracker.start(run_name=run_info.get("run_name", run_dir.name), tags=tags, run_id=run_info.get("run_id"))
    try:
        run_info = {
            "run_id": run_id,
            "run_name": run_info.get("run_name", run_dir.name),
            "tracking_uri": tracker.uri,
            "experiment": cfg.experiment,
            "data": str(Path(data).resolve()),
        }
        # The run's files are written only now that everything a user can get wrong has been checked, so a
        # mistake leaves no half-made run behind that would demand --resume.
        if not plan.resume:
            save_config(cfg, run_dir / "config.yaml")
            atomic_write_text(run_dir / "split.json", json.dumps(plan.split, indent=2))
            atomic_write_text(run_dir / "preprocessing.json", pre.to_json())
            if config_path is not None:
                atomic_write_text(run_dir / "config.source.yaml", Path(config_path).read_text())
        atomic_write_text(run_dir / "run.json", json.dumps(run_info, indent=2))
        if plan.state is None:  # a fresh run, or one killed before its first checkpoint (same values: MLflow accepts)
            tracker.log_params(cfg.to_dict())
            params = {
                "dataset": main_only["dataset_params"],
                "preprocessing": {
                    "target_spacing_mm": [round(s, 3) for s in pre.target_spacing],
                    "clip_hu": [round(c, 1) for c in pre.clip],
                    "mean": round(pre.mean, 2),
                    "std": round(pre.std, 2),
                },
                "model": {"parameters": sum(p.numel() for p in s.model.parameters())},
            }
            if dist.enabled:
                params["distributed"] = {
                    "world_size": dist.world,
                    "global_batch_size": cfg.train.batch_size * dist.world,
                }
            tracker.log_params(params)
            if config_path is not None:
                tracker.log_artifact(Path(config_path), "config")
        else:
            _resend_missing_epochs(tracker, plan.state["history"])
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return run_id


def _train_locked(dist, stack, cfg, data, run_dir, tracking_uri, resume, config_path, progress) -> TrainResult:
    main_only: dict[str, Any] = {}  # rank 0's tracker and dataset facts; never leaves rank 0
    plan = dist.on_main(lambda: _plan(stack, cfg, data, run_dir, tracking_uri, resume, dist.world, main_only))
    cfg = main_only.get("cfg") or config_from_dict(plan.config, str(run_dir / "config.yaml"))
    pre = Preprocessing.from_json(plan.preprocessing)
    class_names, split, val_records = plan.class_names, plan.split, plan.val_records
    num_classes = len(class_names)

    s = dist.agree(lambda: _setup(dist, cfg, plan, pre, run_dir))
    model, device, optimizer, scheduler, scaler = s.model, s.device, s.optimizer, s.scheduler, s.scaler
    start_epoch, history, best = 0, [], {"dice": -1.0, "epoch": -1, "per_case": {}}
    if plan.state is not None:
        start_epoch, history, best = int(plan.state["epoch"]), list(plan.state["history"]), dict(plan.state["best"])
    # (after the checkpoint's history told the tracker which epochs a crash kept from the store)
    dist.on_main(lambda: _start_tracking(dist, cfg, plan, s, run_dir, data, config_path, main_only))
    plan.state = None  # the weights live in the model and optimiser now; do not hold a second copy
    tracker: Tracker | None = main_only.get("tracker")
    show = progress if dist.is_main else False  # None: a bar on a terminal only
    stale = 0
    try:
        # -- epochs
        for epoch in range(start_epoch, cfg.train.epochs):
            s.net.train()
            loader = _epoch_loader(cfg, s.train_ds, epoch, s.workers, rank=dist.rank)
            t0, losses = time.perf_counter(), []
            bar = tqdm(
                total=cfg.train.iterations_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                disable=None if show is None else not show,
                leave=False,
                dynamic_ncols=True,
            )
            for batch in loader:
                image = batch[IMAGE].to(device, non_blocking=True)
                label = batch[LABEL].to(device, non_blocking=True).long()
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, s.amp_dtype):
                    outputs = s.net(image)
                loss = s.loss_fn(outputs, label)
                mean_loss = dist.all_mean(loss.detach())  # every rank sees the same value, so all stop together
                if not torch.isfinite(mean_loss):
                    raise Seg3dError(
                        f"epoch {epoch + 1}: the loss became {mean_loss.item()}; lower train.lr or use "
                        "train.precision=fp32"
                    )
                scaler.scale(loss).backward()
                if cfg.train.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                faults.point("train.step")
                losses.append(mean_loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", best=f"{max(best['dice'], 0):.3f}")
            bar.close()
            train_secs = time.perf_counter() - t0
            its = len(losses) / train_secs

            val = None
            last_epoch = epoch + 1 == cfg.train.epochs
            if val_records and ((epoch + 1) % cfg.train.val_every == 0 or last_epoch):
                model.eval()
                val = _gather_validation(dist, validate(s.predictor, s.val_ds, num_classes), split["val"])
            row = _flatten_epoch(
                epoch,
                class_names,
                float(np.mean(losses)),
                scheduler.get_last_lr()[0],
                time.perf_counter() - t0,
                its,
                val,
            )
            improved = val is not None and np.isfinite(row["val_dice_mean"]) and row["val_dice_mean"] > best["dice"]
            if improved:
                best = {"dice": row["val_dice_mean"], "epoch": epoch, "per_case": val}
                stale = 0
            elif val is not None:
                stale += 1
            stop = cfg.train.early_stop is not None and stale >= cfg.train.early_stop
            # Every rank computed these from the same gathered numbers; rank 0's copy is the one that counts.
            row, improved, best, stale, stop = dist.broadcast((row, improved, best, stale, stop))
            history.append(row)
            rngs = dist.gather(rng_state()) if dist.enabled else None
            if dist.is_main:
                ckpt = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "rng": rng_state(),
                    "history": history,
                    "best": best,
                    "stopped_early": stop,
                    "model_name": cfg.model.name,
                }
                if rngs is not None:
                    ckpt["rng_ranks"] = rngs
                if improved or best["epoch"] < 0:
                    save_checkpoint(ckpt, run_dir / CHECKPOINTS / "best.pt")
                save_checkpoint(ckpt, run_dir / CHECKPOINTS / "last.pt")
                faults.point("epoch.checkpointed")  # on disk, not yet in MLflow
                tracker.log_metrics({k: v for k, v in row.items() if k != "epoch" and np.isfinite(v)}, step=epoch)
            _print_epoch(row, class_names, cfg.train.epochs, show)
            if stop:
                if dist.is_main:
                    print(f"early stop: no better validation Dice for {stale} validations")
                break
        _write_rank_report(dist, model, s, epoch_count=len(history))
        return dist.on_main(
            lambda: _finish(
                cfg, run_dir, model, pre, s.predictor, tracker, history, best, class_names, val_records, split
            )
        )
    except KeyboardInterrupt:
        if tracker is not None:
            tracker.end("KILLED")
        raise
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise


def _gather_validation(dist: Dist, mine: dict[str, list[float]], val_cases: list[str]) -> dict[str, list[float]]:
    """Every rank's per-case Dice, merged in the split's case order: each validation case counted exactly once,
    whether or not the cases divide evenly among the ranks."""
    merged: dict[str, list[float]] = {}
    for part in dist.gather(mine):
        merged.update(part)
    if sorted(merged) != sorted(val_cases):
        raise RuntimeError(f"validation covered {sorted(merged)}, expected the split's {sorted(val_cases)}")
    return {case: merged[case] for case in val_cases}


RANK_REPORT_ENV = "SEG3D_RANK_REPORT_DIR"


def _write_rank_report(dist: Dist, model: nn.Module, s: _Setup, epoch_count: int) -> None:
    """With SEG3D_RANK_REPORT_DIR set, each rank writes what it trained on and a SHA-256 of its final weights
    (rank<r>.json), so that a test can compare the ranks' own parameters, not rank 0's copy of them."""
    folder = os.environ.get(RANK_REPORT_ENV)
    if not folder:
        return
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    report = {
        "rank": dist.rank,
        "world": dist.world,
        "epochs": epoch_count,
        "attempt": restart_count(),
        "train_cases": sorted(r["case"] for r in s.train_ds.data),
        "val_cases": sorted(r["case"] for r in getattr(s.val_ds, "data", [])),
        "state_sha256": digest.hexdigest(),
    }
    atomic_write_text(Path(folder) / f"rank{dist.rank}.json", json.dumps(report, indent=2))


def _resend_missing_epochs(tracker: Tracker, history: list[dict]) -> None:
    """After a crash between the checkpoint and the MLflow call, send the epochs the server lacks (and only those)."""
    logged = tracker.logged_steps("train_loss")
    if logged is None:
        return  # the store cannot be asked: sending blindly could duplicate epochs
    for row in history:
        if row["epoch"] not in logged:
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch" and np.isfinite(v)}, step=row["epoch"])


def _print_epoch(row: dict, names: list[str], epochs: int, show) -> None:
    if show is False:
        return
    parts = [f"epoch {row['epoch'] + 1}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if "val_dice_mean" in row:
        parts.append("dice " + " ".join(f"{n} {row.get(f'val_dice_{n}', float('nan')):.3f}" for n in names[1:]))
        parts.append(f"mean {row['val_dice_mean']:.3f}")
    parts.append(f"{row['iterations_per_s']:.2f} it/s")
    parts.append(f"{row['epoch_time_s']:.0f} s")
    tqdm.write("  ".join(parts))


def _finish(
    cfg, run_dir, model, pre, predictor, tracker, history, best, class_names, val_records, split
) -> TrainResult:
    from pipeline.imageio import read_volume
    from pipeline.plots import curves_png, overlay_png

    best_path = run_dir / CHECKPOINTS / "best.pt"
    if best["epoch"] >= 0 and best_path.exists():
        load_state_dict_checked(model, load_checkpoint(best_path)["model"], best_path)
    model.eval()
    provenance = {
        "best_epoch": best["epoch"],
        "best_val_dice_mean": best["dice"],
        "epochs": len(history),
        "fold": split["fold"],
        "mlflow_run_id": tracker.run_id,
        "git_commit": git_commit(),
    }
    bundle = save_bundle(run_dir / "bundle", model, cfg, pre, provenance)

    # Per-case Dice of the best epoch, as CSV artifact and MLflow table.
    table: dict[str, list] = {"case": [], **{f"dice_{n}": [] for n in class_names[1:]}}
    for case, values in sorted(best["per_case"].items()):
        table["case"].append(case)
        for n, v in zip(class_names[1:], values):
            table[f"dice_{n}"].append(None if not math.isfinite(v) else round(float(v), 4))
    csv_path = run_dir / "per_case_dice.csv"

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(table))
            w.writerows(zip(*table.values()))

    atomic_write(csv_path, write_csv)
    curves = curves_png(run_dir / "training_curves.png", history, class_names)
    artifacts = [csv_path, curves, run_dir / "config.yaml", run_dir / "split.json"]
    if val_records:
        record = val_records[0]
        pred = predictor.predict_file(record[IMAGE], case=record["case"])
        image, label = read_volume(record[IMAGE], record["case"]), read_volume(record[LABEL], record["case"], "label")
        overlay = overlay_png(
            run_dir / f"overlay_{record['case']}.png",
            image.array,
            image.affine,
            pre.remap(label.array),
            pred.labels,
            class_names,
            title=f"{record['case']} (validation), {cfg.model.name}, epoch {best['epoch'] + 1}",
        )
        artifacts.append(overlay)
    for path in artifacts:
        tracker.log_artifact(path)
    if table["case"]:
        tracker.log_table(table, "per_case_dice.json")
    tracker.log_artifacts(bundle, "bundle")
    version = tracker.register_model("bundle", cfg.registry_name)
    faults.point("train.finish")
    tracker.end("FINISHED")
    return TrainResult(
        run_dir=run_dir,
        bundle=bundle,
        run_id=tracker.run_id,
        tracking_uri=tracker.uri,
        epochs=len(history),
        best_epoch=best["epoch"],
        best_dice=best["dice"],
        history=history,
        registered_version=version,
        class_names=class_names,
    )
