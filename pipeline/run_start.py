"""The start of a run, on rank 0, in two steps with the model built in between (pipeline/rank_setup.py).

`plan_run`, before any compute: lock RUN_DIR and sweep what a killed attempt left, decide fresh or resumed, read
the dataset and refuse one with errors, check that the tracking store answers, fix the split and the preprocessing.
What it decides goes to every rank as a `Plan` of plain values; what must stay on rank 0 (the tracker) comes back
in a `RunContext`.

`start_run`, once the model is built and nothing is left to refuse: start (or continue) the MLflow run, write the
run's files, log the parameters; on resume, send the epochs a crash kept from the tracking store.

Crash safety: a checkpoint is written before an epoch's metrics are sent (pipeline/epochs.py), and a resumed run
sends whatever epochs the store does not have yet, so a kill at any point loses no epoch and duplicates none.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.distributed import Dist, restart_count
from pipeline.epochs import epoch_metrics
from pipeline.errors import Seg3dError
from pipeline.fileio import require_output_folder
from pipeline.rank_setup import Setup
from pipeline.run_folder import RunLock, git_commit, prepare_run_dir, sweep_temporaries, write_run_files
from pipeline.splits import kfold_split
from pipeline.tracking.off import open_tracker
from pipeline.transforms import Preprocessing, as_record, compute_preprocessing
from pipeline.yamlio import read_text

if TYPE_CHECKING:
    from pipeline.tracking.off import NoTracker
    from pipeline.tracking.run import Tracker


@dataclass
class Plan:
    """What rank 0 decided before any compute, handed to every rank (plain, picklable values)."""

    config: dict
    resume: bool
    state: dict | None  # the last checkpoint of a resumed run
    run_info: dict
    split: dict
    preprocessing: str
    class_names: list[str]
    train_records: list[dict]
    val_records: list[dict]


@dataclass
class RunContext:
    """Rank 0's own objects for the run; they never leave rank 0."""

    cfg: Config  # the run's config: the given one, or the stored one on resume
    tracker: Tracker | NoTracker  # NoTracker for --tracking-uri none
    dataset_params: dict[str, Any]  # what MLflow records of the dataset


def plan_run(
    *,
    stack: contextlib.ExitStack,
    cfg: Config | None,
    data: Path,
    run_dir: Path,
    tracking_uri: str | None,
    resume: bool,
    world: int,
) -> tuple[Plan, RunContext]:
    """Rank 0: lock RUN_DIR (until `stack` closes), check the config, tracking store and dataset, fix split and
    preprocessing."""
    from pipeline.integrity import training_dataset

    require_output_folder(run_dir)  # a read-only, full or impossible --output: one line now, not a traceback later
    run_dir.mkdir(parents=True, exist_ok=True)
    stack.enter_context(RunLock(run_dir))
    sweep_temporaries(run_dir)
    if not resume and restart_count() > 0 and (run_dir / "config.yaml").exists():
        resume = True  # torchrun restarted the job after a worker died: continue this run from its last checkpoint
    cfg, state, run_info = prepare_run_dir(cfg, run_dir, resume)
    tracker = open_tracker(
        run_info.get("tracking_uri") if resume and not tracking_uri else tracking_uri, cfg.experiment, run_dir
    )

    dataset, report = training_dataset(data, cfg.data.labels)
    tracker.check()  # a dead server is an error now, not after training (and a bad dataset leaves no store behind)

    if state is None or not (run_dir / "split.json").exists():
        split_seed = cfg.train.seed if cfg.train.split_seed is None else cfg.train.split_seed
        split = kfold_split([c.case for c in dataset.cases], cfg.train.folds, cfg.train.fold, split_seed)
    else:
        split = json.loads((run_dir / "split.json").read_text())
    cases = {c.case: c for c in dataset.cases}
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
        stored = run_dir / "preprocessing.json"
        pre = Preprocessing.from_json(read_text(stored), where=str(stored))  # every field checked, as a bundle's
    else:
        pre = compute_preprocessing(cfg, dataset.labels, dataset.exhaustive, [infos[c] for c in split["train"]])
        # What the bundle will carry is checked before anything is written: a bundle that would not load is never made.
        pre.validate(
            f"dataset {data}: the preprocessing computed from its training cases",
            fix="check them with `seg3d check-data` (a foreground of one intensity needs data.intensity.mode=window)",
        )

    spacings = np.array([infos[c].spacing_ras for c in split["train"]])
    dataset_params = {
        "path": str(Path(data).resolve()),
        "cases": len(dataset.cases),
        "train_cases": len(split["train"]),
        "val_cases": len(split["val"]),
        "median_spacing_mm": [round(float(s), 3) for s in np.median(spacings, axis=0)],
        "datalist_hash": dataset.fingerprint(),
        "labels": dict(dataset.labels),
    }
    plan = Plan(
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
    return plan, RunContext(cfg=cfg, tracker=tracker, dataset_params=dataset_params)


def start_run(
    *,
    dist: Dist,
    context: RunContext,
    plan: Plan,
    setup: Setup,
    run_dir: Path,
    data: Path,
    config_path: Path | str | None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Rank 0: start (or resume) the MLflow run and write the run's files, now that nothing is left to refuse;
    returns the run id. `extra_tags` are set on the run too (a study's parent-run tag). The run ends FAILED (KILLED
    on Ctrl-C) if this fails after it started."""
    cfg, tracker = context.cfg, context.tracker
    pre = Preprocessing.from_json(plan.preprocessing)
    device = setup.device
    tags = {
        "variant": cfg.model.name,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "monai": __import__("monai").__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "precision": str(setup.amp_dtype).removeprefix("torch."),
        "fold": str(cfg.train.fold),
    }
    tags.update(extra_tags or {})
    if dist.enabled:
        tags["distributed"] = f"{dist.world} ranks, {dist.backend}"
    # Room for what the run will write: last.pt and best.pt (weights and two Adam moments each) and the bundle.
    weights = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    require_output_folder(run_dir, need_bytes=7 * weights)
    run_info = plan.run_info
    run_id = tracker.start(run_name=run_info.get("run_name", run_dir.name), tags=tags, run_id=run_info.get("run_id"))
    try:
        # The run's files are written only now that everything a user can get wrong has been checked, so a
        # mistake leaves no half-made run behind that would demand --resume.
        write_run_files(
            run_dir,
            cfg=cfg,
            split=plan.split,
            preprocessing=plan.preprocessing,
            config_path=config_path,
            run_info={
                "run_id": run_id,
                "run_name": run_info.get("run_name", run_dir.name),
                "tracking_uri": tracker.uri,
                "experiment": cfg.experiment,
                "data": str(Path(data).resolve()),
            },
            fresh=not plan.resume,
        )
        if plan.state is None:  # a fresh run, or one killed before its first checkpoint (same values: MLflow accepts)
            tracker.log_params(cfg.to_dict())
            params = {
                "dataset": context.dataset_params,
                "preprocessing": {
                    "target_spacing_mm": [round(s, 3) for s in pre.target_spacing],
                    "clip_hu": [round(c, 1) for c in pre.clip],
                    "mean": round(pre.mean, 2),
                    "std": round(pre.std, 2),
                },
                "model": {"parameters": sum(p.numel() for p in setup.model.parameters())},
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


def _resend_missing_epochs(tracker: Tracker | NoTracker, history: list[dict]) -> None:
    """After a crash between the checkpoint and the MLflow call, send the epochs the server lacks (and only those)."""
    logged = tracker.logged_steps("train_loss")
    if logged is None:
        return  # the store cannot be asked: sending blindly could duplicate epochs
    for row in history:
        if row["epoch"] not in logged:
            tracker.log_metrics(epoch_metrics(row), step=row["epoch"])
