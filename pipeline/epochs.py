"""The epoch loop: training steps, validation, early stop, and a checkpoint after every epoch.

A step: mixed precision forward (train.precision), the loss (pipeline/losses.py), a scaled backward for fp16,
gradient clipping, the optimiser and the per-step schedule. Every `train.val_every` epochs (and after the last) the
validation cases are predicted whole, by the sliding-window Predictor that inference uses, and scored by Dice; the
best mean foreground Dice so far decides best.pt and the early stop (`train.early_stop` validations without a
better one).

A checkpoint holds the full training state (model, optimiser, schedule, scaler, every rank's RNG state, the
history) and is written, atomically, before the epoch's metrics go to MLflow: a crash loses no epoch, and a
resumed run (pipeline/run_start.py) sends only the epochs the tracking store lacks.

Distributed: each rank trains on its own cases and validates its share of the validation cases; the loss is
averaged and the per-case Dice gathered over ranks, so every rank reaches the same decisions; rank 0 writes the
checkpoints and logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline import faults
from pipeline.bundle import rng_state, save_checkpoint
from pipeline.config import Config
from pipeline.devices import autocast
from pipeline.distributed import Dist
from pipeline.errors import Seg3dError
from pipeline.metrics import dice_per_class, mean_foreground_dice
from pipeline.predict import Predictor
from pipeline.rank_setup import Setup
from pipeline.run_folder import CHECKPOINTS
from pipeline.train_data import epoch_loader
from pipeline.transforms import IMAGE, LABEL

if TYPE_CHECKING:  # MLflow is imported only by a run that tracks (pipeline/tracking/off.py)
    from pipeline.tracking.off import NoTracker
    from pipeline.tracking.run import Tracker


@dataclass
class RunProgress:
    """How far a run got: the epochs done, one history row each, and the best validation so far."""

    epochs_done: int
    history: list[dict]
    best: dict[str, Any]  # {"dice": mean foreground Dice, "epoch": 0-based, "per_case": {case: Dice per class}}

    @classmethod
    def from_checkpoint(cls, state: dict | None) -> RunProgress:
        """Where the checkpoint `state` left the run; the start for a fresh run (state None)."""
        if state is None:
            return cls(epochs_done=0, history=[], best={"dice": -1.0, "epoch": -1, "per_case": {}})
        return cls(epochs_done=int(state["epoch"]), history=list(state["history"]), best=dict(state["best"]))


def run_epochs(
    *,
    dist: Dist,
    cfg: Config,
    setup: Setup,
    start: RunProgress,
    class_names: list[str],
    val_cases: list[str],
    run_dir: Path,
    tracker: Tracker | NoTracker | None,
    show: bool | None,
) -> RunProgress:
    """Train from `start` to train.epochs (or an early stop); `tracker` is rank 0's, None on the others. `show`:
    progress bars and epoch lines (None: only on a terminal)."""
    try:
        return _run_epochs(dist=dist, cfg=cfg, setup=setup, start=start, class_names=class_names,
                           val_cases=val_cases, run_dir=run_dir, tracker=tracker, show=show)  # fmt: skip
    finally:
        setup.val_engine.close()  # its exported files live in a temporary folder


def _run_epochs(*, dist, cfg, setup, start, class_names, val_cases, run_dir, tracker, show) -> RunProgress:
    history, best = list(start.history), dict(start.best)
    stale = 0
    for epoch in range(start.epochs_done, cfg.train.epochs):
        t0 = time.perf_counter()
        losses = _train_epoch(dist=dist, cfg=cfg, setup=setup, epoch=epoch, best_dice=best["dice"], show=show)
        its = len(losses) / (time.perf_counter() - t0)

        val, val_s = None, None
        last_epoch = epoch + 1 == cfg.train.epochs
        if val_cases and ((epoch + 1) % cfg.train.val_every == 0 or last_epoch):
            t_val = time.perf_counter()
            setup.model.eval()
            with setup.val_engine.use(setup.predictor) as predictor:  # PyTorch, or an engine on these weights
                mine = validate(predictor, setup.val_ds, len(class_names))
            val = gather_validation(dist, mine, val_cases)
            val_s = time.perf_counter() - t_val
        row = epoch_row(
            epoch=epoch,
            names=class_names,
            loss=float(np.mean(losses)),
            lr=setup.scheduler.get_last_lr()[0],
            secs=time.perf_counter() - t0,
            its=its,
            val=val,
            val_s=val_s,
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
            state = checkpoint_state(
                cfg=cfg, setup=setup, epochs_done=epoch + 1, history=history, best=best, stopped_early=stop
            )
            if rngs is not None:
                state["rng_ranks"] = rngs
            if improved or best["epoch"] < 0:
                save_checkpoint(state, run_dir / CHECKPOINTS / "best.pt")
            save_checkpoint(state, run_dir / CHECKPOINTS / "last.pt")
            faults.point("epoch.checkpointed")  # on disk, not yet in MLflow
            tracker.log_metrics(epoch_metrics(row), step=epoch)
        _print_epoch(row, class_names, cfg.train.epochs, show)
        if stop:
            if dist.is_main:
                print(f"early stop: no better validation Dice for {stale} validations")
            break
    return RunProgress(epochs_done=len(history), history=history, best=best)


def _train_epoch(*, dist: Dist, cfg: Config, setup: Setup, epoch: int, best_dice: float, show) -> list[float]:
    """One epoch of training steps; the loss of each step, averaged over ranks."""
    s = setup
    s.net.train()
    loader = epoch_loader(cfg, s.train_ds, epoch=epoch, workers=s.workers, rank=dist.rank)
    losses: list[float] = []
    bar = tqdm(
        total=cfg.train.iterations_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        disable=None if show is None else not show,
        leave=False,
        dynamic_ncols=True,
    )
    for batch in loader:
        image = batch[IMAGE].to(s.device, non_blocking=True)
        label = batch[LABEL].to(s.device, non_blocking=True).long()
        s.optimizer.zero_grad(set_to_none=True)
        with autocast(s.device, s.amp_dtype):
            outputs = s.net(image)
        loss = s.loss_fn(outputs, label)
        mean_loss = dist.all_mean(loss.detach())  # every rank sees the same value, so all stop together
        if not torch.isfinite(mean_loss):
            raise Seg3dError(
                f"epoch {epoch + 1}: the loss became {mean_loss.item()}; lower train.lr or use train.precision=fp32"
            )
        s.scaler.scale(loss).backward()
        if cfg.train.grad_clip:
            s.scaler.unscale_(s.optimizer)
            nn.utils.clip_grad_norm_(s.model.parameters(), cfg.train.grad_clip)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        faults.point("train.step")
        losses.append(mean_loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", best=f"{max(best_dice, 0):.3f}")
    bar.close()
    return losses


def validate(predictor: Predictor, val_data, num_classes: int) -> dict[str, list[float]]:
    """Dice per case and class on whole preprocessed volumes, by the sliding-window path inference uses."""
    per_case = {}
    for item in val_data:
        logits = predictor.predict_preprocessed(item[IMAGE][None].as_tensor())
        pred = logits.argmax(1)[0]
        per_case[item["case"]] = dice_per_class(pred, item[LABEL][0].as_tensor().long(), num_classes)
        faults.point("validation.case")
    return per_case


def gather_validation(dist: Dist, mine: dict[str, list[float]], val_cases: list[str]) -> dict[str, list[float]]:
    """Every rank's per-case Dice, merged in the split's case order: each validation case counted exactly once,
    whether or not the cases divide evenly among the ranks."""
    merged: dict[str, list[float]] = {}
    for part in dist.gather(mine):
        merged.update(part)
    if sorted(merged) != sorted(val_cases):
        raise RuntimeError(f"validation covered {sorted(merged)}, expected the split's {sorted(val_cases)}")
    return {case: merged[case] for case in val_cases}


def epoch_row(
    *,
    epoch: int,
    names: list[str],
    loss: float,
    lr: float,
    secs: float,
    its: float,
    val: dict | None,
    val_s: float | None = None,
) -> dict:
    """One history row: the epoch (0-based), its training numbers and, after a validation, the Dice per foreground
    class, their mean and the validation's seconds (inside epoch_time_s)."""
    row = {"epoch": epoch, "train_loss": loss, "lr": lr, "epoch_time_s": secs, "iterations_per_s": its}
    if val is not None:
        per_class, mean = mean_foreground_dice(list(val.values()))
        row.update({f"val_dice_{n}": v for n, v in zip(names[1:], per_class)})
        row["val_dice_mean"] = mean
    if val_s is not None:
        row["val_time_s"] = val_s
    return row


def epoch_metrics(row: dict) -> dict[str, float]:
    """A history row as MLflow metrics (the epoch is the step; a NaN, e.g. the Dice of a class absent from every
    validation case, is left out)."""
    return {k: v for k, v in row.items() if k != "epoch" and np.isfinite(v)}


def checkpoint_state(
    *, cfg: Config, setup: Setup, epochs_done: int, history: list[dict], best: dict, stopped_early: bool
) -> dict[str, Any]:
    """The full training state after `epochs_done` epochs, as last.pt and best.pt hold it."""
    return {
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(),
        "scaler": setup.scaler.state_dict(),
        "epoch": epochs_done,
        "rng": rng_state(),
        "history": history,
        "best": best,
        "stopped_early": stopped_early,
        "model_name": cfg.model.name,
    }


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
