"""The end of a run, on rank 0: the bundle from the best epoch's weights, the per-case Dice table, the training
curves and a validation overlay, all sent to MLflow, and the bundle registered as a model version.

The bundle is made from a copy of the network loaded with best.pt, so the network that trained is left as the last
epoch left it (every rank returns its own; pipeline/train.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline import faults
from pipeline.bundle import load_checkpoint, load_state_dict_checked, save_bundle
from pipeline.config import Config
from pipeline.epochs import RunProgress
from pipeline.fileio import atomic_write_csv, check_inside
from pipeline.rank_setup import validation_predictor
from pipeline.run_folder import CHECKPOINTS, git_commit
from pipeline.transforms import IMAGE, LABEL, Preprocessing

if TYPE_CHECKING:  # MLflow is imported only by a run that tracks (pipeline/tracking/off.py)
    from pipeline.tracking.off import NoTracker
    from pipeline.tracking.run import Tracker


@dataclass
class TrainResult:
    """What `train` returns. Rank 0 reports the run for all ranks; the last group of fields is each rank's own."""

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
    # This rank's own: its network as the last epoch left it (the bundle holds the best epoch's weights; under
    # DistributedDataParallel every rank's are the same), and the cases it trained and validated on.
    model: nn.Module | None = None
    rank: int = 0
    world: int = 1
    train_cases: list[str] = field(default_factory=list)
    val_cases: list[str] = field(default_factory=list)


def finish_run(
    *,
    cfg: Config,
    run_dir: Path,
    model: nn.Module,
    pre: Preprocessing,
    device: torch.device,
    tracker: Tracker | NoTracker,
    done: RunProgress,
    class_names: list[str],
    val_records: list[dict],
    split: dict,
    register: bool = True,
) -> TrainResult:
    """Rank 0: write and log the run's results, register the bundle (unless `register` is false), end the MLflow run
    FINISHED."""
    from pipeline.imageio import read_volume
    from pipeline.plots import curves_png, overlay_png

    history, best = done.history, done.best
    best_path = run_dir / CHECKPOINTS / "best.pt"
    model = copy.deepcopy(model)
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
    bundle = save_bundle(run_dir / "bundle", model=model, cfg=cfg, pre=pre, provenance=provenance)

    # Per-case Dice of the best epoch, as CSV artifact and MLflow table.
    table: dict[str, list] = {"case": [], **{f"dice_{n}": [] for n in class_names[1:]}}
    for case, values in sorted(best["per_case"].items()):
        table["case"].append(case)
        for n, v in zip(class_names[1:], values):
            table[f"dice_{n}"].append(None if not math.isfinite(v) else round(float(v), 4))
    csv_path = run_dir / "per_case_dice.csv"
    atomic_write_csv(csv_path, list(table), zip(*table.values()))
    curves = curves_png(run_dir / "training_curves.png", history, class_names)
    artifacts = [csv_path, curves, run_dir / "config.yaml", run_dir / "split.json"]
    if val_records:
        record = val_records[0]
        predictor = validation_predictor(model, cfg=cfg, pre=pre, device=device)
        pred = predictor.predict_file(record[IMAGE], case=record["case"])
        image, label = read_volume(record[IMAGE], record["case"]), read_volume(record[LABEL], record["case"], "label")
        overlay = overlay_png(
            check_inside(run_dir, run_dir / f"overlay_{record['case']}.png", what="RUN_DIR"),
            image=image.array,
            affine=image.affine,
            reference=pre.remap(label.array),
            prediction=pred.labels,
            label_names=class_names,
            title=f"{record['case']} (validation), {cfg.model.name}, epoch {best['epoch'] + 1}",
        )
        artifacts.append(overlay)
    for path in artifacts:
        tracker.log_artifact(path)
    if table["case"]:
        tracker.log_table(table, "per_case_dice.json")
    tracker.make_model(bundle, cfg.model.name)  # the bundle is also an MLflow pyfunc model (pipeline/mlflow_model.py)
    tracker.log_artifacts(bundle, "bundle")
    version = tracker.register_model("bundle", cfg.registry_name, alias="candidate") if register else None
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
