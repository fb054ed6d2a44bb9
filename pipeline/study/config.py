"""The study config: which variants, how many folds and seeds, one training budget for all, how the winner is chosen.

    name: phantom-demo
    experiment: seg3d-study            # MLflow experiment of the parent run and of every job's child run
    training: {...}                    # a training config (configs/demo.yaml's keys) that every job starts from
    variants:                          # registry names, or {name, label, overrides} for a variant with changes
      - unet
      - {name: danet, label: danet_wide, overrides: {model.channels: [16, 32, 64, 128]}}
    baseline: unet                     # the label every other variant is tested against
    folds: 5
    seeds: [0]
    split_seed: 0                      # one split for every variant and seed (STUDY_DIR/split.json)
    budget: {epochs: 100, iterations_per_epoch: 250, batch_size: 2, patch_size: [96, 96, 96]}
    select: {class_name: null}         # null: mean foreground Dice over cases; else that class's Dice
    ensembles: {pairs: true, top: 3, postprocess: [true, false]}
    registered_model: seg3d-champion

Validated like the training config (pipeline/config.py): an unknown key, a variant the registry lacks, a baseline
not among the variants, or a variant whose overrides touch the shared budget is one line naming the key. Every job's
training config is built and validated here too, so a study that would fail in its fifth job fails before its first.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from attention3d import list_models
from pipeline.config import Config, Patch, _Section, config_from_dict, describe_validation
from pipeline.errors import Seg3dError, shown
from pipeline.names import check_case_id
from pipeline.yamlio import raw_config

# The budget every variant shares: a variant's own overrides may not change these (a fair comparison).
BUDGET_KEYS = ("train.epochs", "train.iterations_per_epoch", "train.batch_size", "data.patch_size")
# Set by the study for each job; a variant or the training section may not set them either.
JOB_KEYS = ("model.name", "train.folds", "train.fold", "train.seed", "train.split_seed", "experiment")
MAX_JOBS = 10_000


class VariantSpec(_Section):
    name: str
    label: str | None = None  # how reports and job ids name it; default the registry name
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted training-config keys -> values

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in list_models():
            raise ValueError(f"unknown variant {v!r}; valid variants: {', '.join(list_models())}")
        return v

    @field_validator("overrides")
    @classmethod
    def _fair(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if k in BUDGET_KEYS or k in JOB_KEYS]
        if bad:
            raise ValueError(f"a variant may not override {bad[0]!r}: the budget and the job keys are the study's")
        return v

    @property
    def key(self) -> str:
        return self.label or self.name


class BudgetConfig(_Section):
    epochs: int = Field(100, ge=1)
    iterations_per_epoch: int = Field(250, ge=1)
    batch_size: int = Field(2, ge=1)
    patch_size: Patch = (96, 96, 96)


class SelectConfig(_Section):
    class_name: str | None = None  # null: mean foreground Dice over cases selects the winner


class EnsembleConfig(_Section):
    pairs: bool = True  # every pair of variants
    top: int = Field(3, ge=0)  # the best `top` single variants together (0 or 1: none)
    postprocess: list[bool] = Field(default_factory=lambda: [True, False])  # each candidate with and without

    @field_validator("postprocess")
    @classmethod
    def _some(cls, v: list[bool]) -> list[bool]:
        if not v:
            raise ValueError("give at least one of true, false")
        return sorted(set(v), reverse=True)


class StudyConfig(_Section):
    name: str = "study"
    experiment: str = "seg3d-study"
    training: dict[str, Any] = Field(default_factory=dict)
    variants: list[VariantSpec | str] = Field(default_factory=lambda: ["unet", "attention_unet"])
    baseline: str = "unet"
    folds: int = Field(5, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0])
    split_seed: int = 0
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    ensembles: EnsembleConfig = Field(default_factory=EnsembleConfig)
    registered_model: str = "seg3d-champion"

    @field_validator("name", "experiment", "registered_model")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        try:  # it names files, runs and registry entries
            return check_case_id(v, "the study config")
        except Seg3dError as err:
            raise ValueError(str(err)) from None

    @field_validator("variants", mode="after")
    @classmethod
    def _specs(cls, v: list[VariantSpec | str]) -> list[VariantSpec | str]:
        specs = [VariantSpec(name=s) if isinstance(s, str) else s for s in v]
        if not specs:
            raise ValueError("list at least one variant")
        keys = [s.key for s in specs]
        for key in keys:
            try:
                check_case_id(key, "the study's variants")
            except Seg3dError as err:
                raise ValueError(str(err)) from None
            if "+" in key:
                raise ValueError(f"variant label {key!r} may not contain '+' (it joins the members of an ensemble)")
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup:
            raise ValueError(f"variant {dup!r} is listed twice; give the second a label")
        return specs

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError(f"give one or more distinct seeds >= 0, got {shown(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        keys = [s.key for s in self.specs]
        if self.baseline not in keys:
            raise ValueError(f"baseline {self.baseline!r} is not among the variants ({', '.join(keys)}); add it")
        jobs = len(self.specs) * self.folds * len(self.seeds)
        if jobs > MAX_JOBS:
            raise ValueError(f"{jobs} jobs is more than {MAX_JOBS}; use fewer variants, folds or seeds")
        return self

    @property
    def specs(self) -> list[VariantSpec]:
        return [s if isinstance(s, VariantSpec) else VariantSpec(name=s) for s in self.variants]

    def spec(self, key: str) -> VariantSpec:
        return next(s for s in self.specs if s.key == key)

    def job_config(self, key: str, *, fold: int, seed: int) -> Config:
        """The training config of one job: the shared training section, the budget, the variant and its
        overrides, and the job's fold and seed (with the study's split seed, so every job splits alike)."""
        spec = self.spec(key)
        raw = copy.deepcopy(self.training)
        raw.setdefault("model", {})
        raw["model"]["name"] = spec.name
        settings = {
            "experiment": self.experiment,
            "train.epochs": self.budget.epochs,
            "train.iterations_per_epoch": self.budget.iterations_per_epoch,
            "train.batch_size": self.budget.batch_size,
            "data.patch_size": list(self.budget.patch_size),
            "train.folds": self.folds,
            "train.fold": fold,
            "train.seed": seed,
            "train.split_seed": self.split_seed,
            **spec.overrides,
        }
        for dotted, value in settings.items():
            _set(raw, dotted, value)
        return config_from_dict(raw, f"study {self.name}, variant {key}")

    def fingerprint(self) -> str:
        """What makes two studies the same study: every setting that changes a result."""
        doc = self.model_dump(mode="json")
        doc.pop("registered_model")
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _set(raw: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise Seg3dError(f"study config: {dotted!r} goes through {part!r}, which is not a section")
        node = child
    node[last] = value


def load_study_config(path: Path | str | None, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read a study YAML, apply `key=value` overrides (e.g. `folds=3 budget.epochs=2`), validate it and every job's
    training config."""
    raw, source = raw_config(path, overrides)
    training = raw.get("training")
    if isinstance(training, str):  # a path to a training config, relative to the study config
        base = Path(path).parent if path else Path.cwd()
        raw["training"], _ = raw_config(base / training, ())
    try:
        cfg = describe_validation(StudyConfig, raw)
    except Seg3dError as err:
        raise Seg3dError(f"{source}: {err}") from None
    for spec in cfg.specs:  # every job's config, validated now: a typo in one variant fails before any training
        cfg.job_config(spec.key, fold=0, seed=cfg.seeds[0])
    return cfg
