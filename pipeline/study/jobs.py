"""STUDY_DIR: what a study holds, which jobs it has, which are done, and which a shard runs.

    study.json            the study's identity (name, fingerprint, dataset) and its job list: a second study
                          pointed at the same folder is refused
    split.json            the k folds, made once from the split seed: every variant and seed trains on them
    parent_run.json       the MLflow parent run every job's run is a child of
    jobs/<job id>/run/    the job's RUN_DIR (pipeline/train.py): checkpoints, bundle, its own MLflow run
    jobs/<job id>/oof/    the fold model's probabilities on its validation cases (<case>.npz, as infer writes them)
    jobs/<job id>/done.json   written last: the job is finished (training, bundle and out-of-fold files)
    costs.json, report/, champion/   the analysis (pipeline/study/analysis.py, report.py) and the winner

A job is one (variant, fold, seed); its id is `<variant>-f<fold>-s<seed>`. Jobs are listed seed-major, then fold,
then variant, and shard i of n runs jobs i, i+n, i+2n, ...: shards partition the jobs, so several machines sharing
STUDY_DIR never run a job twice. A job is finished when its done.json exists; anything less is resumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.datalists import Dataset
from pipeline.errors import Seg3dError
from pipeline.fileio import atomic_write_text
from pipeline.splits import kfold_split
from pipeline.study.config import StudyConfig

STUDY, SPLIT, PARENT, DONE = "study.json", "split.json", "parent_run.json", "done.json"


@dataclass(frozen=True)
class Job:
    variant: str  # the variant's label
    fold: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.variant}-f{self.fold}-s{self.seed}"

    def folder(self, study_dir: Path) -> Path:
        return Path(study_dir) / "jobs" / self.id

    def run_dir(self, study_dir: Path) -> Path:
        return self.folder(study_dir) / "run"

    def oof_dir(self, study_dir: Path) -> Path:
        return self.folder(study_dir) / "oof"

    def done(self, study_dir: Path) -> dict | None:
        path = self.folder(study_dir) / DONE
        return json.loads(path.read_text()) if path.is_file() else None


def all_jobs(cfg: StudyConfig) -> list[Job]:
    return [Job(s.key, fold, seed) for seed in cfg.seeds for fold in range(cfg.folds) for s in cfg.specs]


def shard_jobs(jobs: list[Job], shard: tuple[int, int]) -> list[Job]:
    index, count = shard
    return jobs[index::count]


def make_split(cfg: StudyConfig, dataset: Dataset) -> dict:
    """The study's folds: fold f's validation cases are what `train` computes for fold f with the split seed."""
    ids = [c.case for c in dataset.cases]
    if len(ids) < cfg.folds:
        raise Seg3dError(
            f"the dataset has {len(ids)} labelled case(s), fewer than the study's {cfg.folds} folds; set folds to at "
            f"most {len(ids)} (folds=N) or add cases"
        )
    val = [kfold_split(ids, cfg.folds, f, cfg.split_seed)["val"] for f in range(cfg.folds)]
    return {"folds": cfg.folds, "seed": cfg.split_seed, "val": val}


def identity(cfg: StudyConfig, dataset: Dataset) -> dict:
    return {
        "name": cfg.name,
        "fingerprint": cfg.fingerprint(),
        "dataset": dataset.fingerprint(),
        "jobs": [j.id for j in all_jobs(cfg)],
    }


def open_study(study_dir: Path, cfg: StudyConfig, dataset: Dataset) -> dict:
    """Check that STUDY_DIR is this study's folder (or empty) and fix its split; returns the split. Called before
    anything is written, so a folder holding another study is refused with nothing changed."""
    study_dir = Path(study_dir)
    ident = identity(cfg, dataset)
    stored_path = study_dir / STUDY
    if stored_path.is_file():
        stored = json.loads(stored_path.read_text())
        if stored.get("fingerprint") != ident["fingerprint"] or stored.get("dataset") != ident["dataset"]:
            what = "config" if stored.get("dataset") == ident["dataset"] else "dataset"
            raise Seg3dError(
                f"{study_dir} holds a different study ({stored.get('name')!r}, another {what}); give a new --output, "
                "or the same config and dataset to continue it"
            )
    elif study_dir.is_dir() and any(p.name != ".lock" for p in study_dir.iterdir()):
        raise Seg3dError(f"{study_dir} is not empty and holds no study ({STUDY} missing); give a new or empty --output")
    return make_split(cfg, dataset)


def write_study_files(study_dir: Path, cfg: StudyConfig, dataset: Dataset, split: dict) -> None:
    """study.json and split.json, once; a second shard finds them and checks them (open_study)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    if not (study_dir / SPLIT).is_file():
        atomic_write_text(study_dir / SPLIT, json.dumps(split, indent=2))
    elif json.loads((study_dir / SPLIT).read_text()) != split:
        raise Seg3dError(f"{study_dir / SPLIT} differs from the split this study makes; the folder was edited")
    if not (study_dir / STUDY).is_file():
        atomic_write_text(study_dir / STUDY, json.dumps(identity(cfg, dataset), indent=2))


def fold_of(split: dict) -> dict[str, int]:
    """case -> the fold it is validated in."""
    return {case: f for f, cases in enumerate(split["val"]) for case in cases}


def missing_jobs(cfg: StudyConfig, study_dir: Path) -> list[Job]:
    return [j for j in all_jobs(cfg) if j.done(study_dir) is None]
