"""`seg3d study`: run a shard of the study's jobs, then, once every job is done, the analysis, report and champion.

Each job is one ordinary training (pipeline/train.py) in its own RUN_DIR with its own MLflow run, a child of the
study's parent run (MLflow's `mlflow.parentRunId` tag), so the UI shows the study as one expandable row. After
training, the job's best model predicts its fold's validation cases in their own geometry and keeps the class
probabilities (out-of-fold files, float16 as `seg3d infer --save-probabilities` writes them): every ensemble is then
scored from files, without retraining. done.json is written last; a killed job is resumed from its checkpoint by
the next run of the command, and a job is never trained twice (pipeline/study/jobs.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from pipeline import faults
from pipeline.datalists import Dataset
from pipeline.errors import Seg3dError
from pipeline.fileio import atomic_write_text, require_output_folder
from pipeline.study.config import StudyConfig
from pipeline.study.jobs import DONE, PARENT, Job, all_jobs, missing_jobs, open_study, shard_jobs, write_study_files

LOCK = ".lock"


@dataclass
class StudyRun:
    ran: list[str] = field(default_factory=list)  # job ids this process trained (or finished)
    skipped: list[str] = field(default_factory=list)  # already done
    missing: list[str] = field(default_factory=list)  # not done after this process (other shards' jobs)
    report: Path | None = None
    champion: Path | None = None
    winner: dict | None = None
    parent_run_id: str | None = None
    registered_version: str | None = None


def study_dataset(cfg: StudyConfig, data: Path) -> Dataset:
    """The dataset as the jobs will read it (the training section's label selection, if any), checked once here."""
    from pipeline.integrity import training_dataset

    return training_dataset(data, cfg.job_config(cfg.specs[0].key, fold=0, seed=cfg.seeds[0]).data.labels)[0]


def parent_run(cfg: StudyConfig, study_dir: Path, tracking_uri: str):
    """The study's parent run, created by whichever shard comes first (under STUDY_DIR's lock), reattached by the
    others and by every rerun; returns a Tracker attached to it."""
    from pipeline.tracking import Tracker

    tracker = Tracker(tracking_uri, cfg.experiment, study_dir / "parent")
    with FileLock(study_dir / LOCK):
        path = study_dir / PARENT
        if path.is_file():
            tracker.start(run_name=cfg.name, tags={}, run_id=json.loads(path.read_text())["run_id"])
        else:
            run_id = tracker.start(
                run_name=cfg.name,
                tags={"seg3d.study": cfg.name, "seg3d.study_fingerprint": cfg.fingerprint()},
            )
            tracker.log_params(
                {
                    "study": {
                        "variants": ",".join(s.key for s in cfg.specs),
                        "baseline": cfg.baseline,
                        "folds": cfg.folds,
                        "seeds": ",".join(map(str, cfg.seeds)),
                        "budget": cfg.budget.model_dump(mode="json"),
                    }
                }
            )
            atomic_write_text(path, json.dumps({"run_id": run_id, "tracking_uri": tracker.uri}, indent=2))
    return tracker


def run_job(
    job: Job,
    *,
    cfg: StudyConfig,
    data: Path,
    study_dir: Path,
    split: dict,
    parent_id: str,
    tracking_uri: str,
    device: str,
    progress: bool | None,
) -> dict:
    """Train (or resume) one job, write its out-of-fold probabilities, then done.json; returns done.json's record."""
    from pipeline.train import train

    run_dir = job.run_dir(study_dir)
    job_cfg = cfg.job_config(job.variant, fold=job.fold, seed=job.seed)
    resume = (run_dir / "config.yaml").is_file()
    start = time.perf_counter()
    result = train(
        job_cfg,
        data,
        run_dir,
        tracking_uri,
        resume=resume,
        progress=progress,
        tags={"mlflow.parentRunId": parent_id, "seg3d.study": cfg.name, "seg3d.job": job.id},
        register=False,
    )
    trained = json.loads((run_dir / "split.json").read_text())
    if sorted(trained["val"]) != sorted(split["val"][job.fold]):
        raise Seg3dError(
            f"job {job.id} validated on other cases than the study's fold {job.fold}; {run_dir} was edited"
        )
    cases = {c.case: c for c in study_dataset(cfg, data).cases}
    oof = write_out_of_fold(result.bundle, [cases[c] for c in split["val"][job.fold]], job.oof_dir(study_dir), device)
    record = {
        "job": job.id,
        "variant": job.variant,
        "fold": job.fold,
        "seed": job.seed,
        "run_id": result.run_id,
        "best_epoch": result.best_epoch,
        "best_val_dice": result.best_dice,
        "train_seconds": round(sum(r.get("epoch_time_s", 0.0) for r in result.history), 2),
        "this_attempt_seconds": round(time.perf_counter() - start, 2),
        "out_of_fold": sorted(oof),
    }
    atomic_write_text(job.folder(study_dir) / DONE, json.dumps(record, indent=2))
    faults.point("study.job_done")  # between jobs: the next run must skip this one and run the rest
    return record


def write_out_of_fold(bundle_dir: Path, cases: list, out_dir: Path, device: str) -> list[str]:
    """The fold model's class probabilities on its validation cases, in each case's own grid, without
    post-processing (the analysis applies it or not); a case whose file exists is not predicted again."""
    from pipeline.bundle import load_bundle
    from pipeline.predict import Predictor
    from pipeline.writers import write_probabilities

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases if not (out_dir / f"{c.case}.npz").is_file()]
    if todo:
        bundle = load_bundle(bundle_dir)
        predictor = Predictor.from_bundle(bundle, device=device, postprocess=False)
        for case in todo:
            prediction = predictor.predict_file(case.image, case=case.case, probabilities=True)
            write_probabilities(prediction, bundle.preprocessing, out_dir / f"{case.case}.npz")
    return [c.case for c in cases]


def run_study(
    cfg: StudyConfig,
    *,
    data: Path,
    study_dir: Path,
    tracking_uri: str | None = None,
    shard: tuple[int, int] = (0, 1),
    report_only: bool = False,
    progress: bool | None = None,
    say=print,
) -> StudyRun:
    """Run this shard's jobs that are not done, then (when none is missing) the analysis, report and champion."""
    from pipeline.devices import resolve_device
    from pipeline.tracking.store import check_store, resolve_tracking_uri

    data, study_dir = Path(data), Path(study_dir)
    dataset = study_dataset(cfg, data)
    split = open_study(study_dir, cfg, dataset)
    if cfg.select.class_name is not None and cfg.select.class_name not in dataset.class_names[1:]:
        raise Seg3dError(
            f"select.class_name {cfg.select.class_name!r} is not a foreground class of {data} "
            f"({', '.join(dataset.class_names[1:])}); give one of those, or null for the mean foreground Dice"
        )
    if report_only and not (study_dir / PARENT).is_file():
        raise Seg3dError(f"{study_dir} holds no started study; run `seg3d study` without --report-only first")
    uri = resolve_tracking_uri(tracking_uri)
    if report_only:
        uri = json.loads((study_dir / PARENT).read_text()).get("tracking_uri", uri) if tracking_uri is None else uri
    require_output_folder(study_dir)
    check_store(uri)
    # The jobs' own device setting (train.device) also places the out-of-fold predictions and the cost measurements.
    dev = str(resolve_device(cfg.job_config(cfg.baseline, fold=0, seed=cfg.seeds[0]).train.device, "train.device"))
    write_study_files(study_dir, cfg, dataset, split)
    parent = parent_run(cfg, study_dir, uri)
    outcome = StudyRun(parent_run_id=parent.run_id)
    try:
        if not report_only:
            mine = shard_jobs(all_jobs(cfg), shard)
            for n, job in enumerate(mine, 1):
                if job.done(study_dir) is not None:
                    outcome.skipped.append(job.id)
                    continue
                say(f"study {cfg.name}: job {job.id} ({n}/{len(mine)} of shard {shard[0]}/{shard[1]})")
                run_job(
                    job,
                    cfg=cfg,
                    data=data,
                    study_dir=study_dir,
                    split=split,
                    parent_id=parent.run_id,
                    tracking_uri=uri,
                    device=dev,
                    progress=progress,
                )
                outcome.ran.append(job.id)
        outcome.missing = [j.id for j in missing_jobs(cfg, study_dir)]
        if outcome.missing and not report_only:
            say(
                f"study {cfg.name}: {len(outcome.missing)} job(s) of other shards not done yet; the last shard to "
                "finish writes the report"
            )
            return outcome
        from pipeline.study.finish import finish_study

        finish_study(
            cfg, dataset=dataset, study_dir=study_dir, split=split, tracker=parent, device=dev, outcome=outcome, say=say
        )
    except BaseException as e:
        parent.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if not outcome.missing:
        parent.end("FINISHED")
    return outcome
