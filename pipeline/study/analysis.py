"""Score every candidate of a study from its out-of-fold files: each variant alone, the ensembles, with and without
post-processing, and rank them on the selection metric (nnU-Net's find_best_configuration, over variants).

A variant's probabilities for a case are its fold model's (the fold that held the case out), averaged over the
study's seeds; an ensemble averages its members' probabilities (probability space, as nnU-Net ensembles). Labels are
the argmax, then, for the post-processed candidates, the first member's post-processing rules. Each case is scored
with `seg3d evaluate`'s own metrics (pipeline/metrics.py), and, where the dataset records decoys (seg3d synth), with
the fraction of decoy voxels given each class. Only variants whose every job is done take part; the others are named
as missing.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datalists import Case, Dataset
from pipeline.errors import Seg3dError
from pipeline.metrics import evaluate_case
from pipeline.postprocess import postprocess
from pipeline.study.config import StudyConfig
from pipeline.study.decoys import decoy_confusion, read_decoy
from pipeline.study.jobs import Job, all_jobs, fold_of
from pipeline.study.results import Score


@dataclass(frozen=True)
class Candidate:
    members: tuple[str, ...]  # variant labels
    postprocess: bool

    @property
    def name(self) -> str:
        return "+".join(self.members)


def complete_variants(cfg: StudyConfig, study_dir: Path) -> list[str]:
    done = {j.variant for j in all_jobs(cfg) if j.done(study_dir) is None}
    return [s.key for s in cfg.specs if s.key not in done]


def _probabilities(cfg: StudyConfig, study_dir: Path, variant: str, fold: int, case: str) -> np.ndarray:
    total = None
    for seed in cfg.seeds:
        path = Job(variant, fold, seed).oof_dir(study_dir) / f"{case}.npz"
        if not path.is_file():
            raise Seg3dError(
                f"out-of-fold file {path} is missing although its job is done; delete the job's done.json "
                "and rerun the study to predict it again"
            )
        with np.load(path, allow_pickle=False) as f:
            p = f["probabilities"].astype(np.float32)
        total = p if total is None else total + p
    return total / len(cfg.seeds)


@dataclass
class _Reference:
    labels: np.ndarray  # class indices
    spacing: tuple[float, ...]
    decoy: np.ndarray | None


def _reference(case: Case, dataset: Dataset) -> _Reference:
    from pipeline.imageio import read_volume

    label = read_volume(case.label, case=case.case, kind="label")
    spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(label.affine)[:3, :3], axis=0))
    decoy = None
    if case.decoy is not None:
        decoy = read_decoy(case.decoy, like_affine=label.affine, like_shape=label.array.shape, case=case.case)
    return _Reference(dataset.remap(np.asarray(label.array), case.case), spacing, decoy)


def _scores(
    candidate: Candidate, probs: np.ndarray, *, ref: _Reference, case: str, fold: int, classes: list[str], rules
) -> list[Score]:
    labels = np.argmax(probs, axis=0).astype(np.uint8)
    if labels.shape != ref.labels.shape:
        raise Seg3dError(
            f"out-of-fold probabilities of {candidate.name} have shape {labels.shape}, the label "
            f"{ref.labels.shape}; the out-of-fold files do not belong to this dataset",
            case=case,
        )
    if candidate.postprocess:
        labels = postprocess(labels, classes, rules)
    records = evaluate_case(labels, ref.labels, ref.spacing, {n: i for i, n in enumerate(classes)}, case=case)
    out = []
    for index, record in enumerate(records, start=1):
        confusion = decoy_confusion(labels, ref.decoy, index) if ref.decoy is not None else None
        out.append(
            Score(
                candidate=candidate.name,
                postprocess=candidate.postprocess,
                case=case,
                fold=fold,
                class_name=record["label"],
                dice=record["dice"],
                hd95=record["hd95_mm"],
                nsd=record["nsd"],
                decoy_confusion=confusion,
            )
        )
    return out


def selection_score(scores: list[Score], class_name: str | None) -> float:
    """Mean over cases of the case's mean foreground Dice, or of one class's Dice (NaN cases left out)."""
    per_case: dict[str, list[float]] = {}
    for s in scores:
        if class_name is None or s.class_name == class_name:
            per_case.setdefault(s.case, []).append(s.dice)
    values = [float(np.nanmean(v)) for v in per_case.values() if not all(math.isnan(x) for x in v)]
    return float(np.mean(values)) if values else float("nan")


def _candidates(cfg: StudyConfig, ranked_singles: list[str], order: list[str]) -> list[tuple[str, ...]]:
    """Every pair and the top N single variants; members listed in the study's order, so a name is stable."""
    groups: list[tuple[str, ...]] = []
    if cfg.ensembles.pairs:
        groups += [tuple(sorted(g, key=order.index)) for g in itertools.combinations(ranked_singles, 2)]
    top = min(cfg.ensembles.top, len(ranked_singles))
    if top >= 2:
        best = tuple(sorted(ranked_singles[:top], key=order.index))
        if best not in groups:
            groups.append(best)
    return groups


def analyse(
    cfg: StudyConfig, *, dataset: Dataset, study_dir: Path, split: dict, say=print
) -> tuple[list[Score], list[dict]]:
    """Every candidate's scores and the ranking (best first: candidate, postprocess, members, score)."""
    variants = complete_variants(cfg, study_dir)
    if not variants:
        return [], []
    classes = dataset.class_names
    folds = fold_of(split)
    rules = {v: cfg.job_config(v, fold=0, seed=cfg.seeds[0]).postprocess for v in variants}
    cases = [c for c in dataset.cases if c.case in folds]
    flags = cfg.ensembles.postprocess

    def score_groups(groups: list[tuple[str, ...]]) -> list[Score]:
        scores: list[Score] = []
        needed = sorted({v for g in groups for v in g}, key=variants.index)
        for case in cases:
            ref = _reference(case, dataset)
            fold = folds[case.case]
            probs = {v: _probabilities(cfg, study_dir, v, fold, case.case) for v in needed}
            for group in groups:
                mean = sum(probs[v] for v in group) / len(group)
                for flag in flags:
                    scores += _scores(
                        Candidate(group, flag),
                        mean,
                        ref=ref,
                        case=case.case,
                        fold=fold,
                        classes=classes,
                        rules=rules[group[0]],
                    )
        return scores

    say(f"study {cfg.name}: scoring {len(variants)} variant(s) on {len(cases)} out-of-fold case(s)")
    scores = score_groups([(v,) for v in variants])
    single_rank = sorted(
        variants,
        key=lambda v: (
            -_nan_low(
                max(
                    selection_score(
                        [s for s in scores if s.candidate == v and s.postprocess == f], cfg.select.class_name
                    )
                    for f in flags
                )
            )
        ),
    )
    groups = _candidates(cfg, single_rank, variants)
    if groups:
        say(f"study {cfg.name}: scoring {len(groups)} ensemble(s)")
        scores += score_groups(groups)
    ranking = []
    for group in [(v,) for v in variants] + groups:
        for flag in flags:
            mine = [s for s in scores if s.candidate == "+".join(group) and s.postprocess == flag]
            ranking.append(
                {
                    "candidate": "+".join(group),
                    "postprocess": flag,
                    "members": list(group),
                    "score": selection_score(mine, cfg.select.class_name),
                }
            )
    # Best first; on a tie the simpler candidate (fewer members), then post-processing on, wins.
    ranking.sort(key=lambda r: (-_nan_low(r["score"]), len(r["members"]), not r["postprocess"]))
    return scores, ranking


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value
