"""The study config: the shipped studies load, every job's training config is the shared one plus the budget and the
variant, and a config that would fail in some job fails at load."""

from __future__ import annotations

import pytest

from pipeline.errors import Seg3dError
from pipeline.study.config import load_study_config
from pipeline.study.jobs import all_jobs, shard_jobs
from tests.conftest import ROOT


@pytest.mark.parametrize("name", ["study", "study_demo"])
def test_the_shipped_studies_load_and_every_job_config_validates(name):
    cfg = load_study_config(ROOT / "configs" / f"{name}.yaml")
    jobs = all_jobs(cfg)
    assert len(jobs) == len(cfg.specs) * cfg.folds * len(cfg.seeds)
    for job in jobs:
        job_cfg = cfg.job_config(job.variant, fold=job.fold, seed=job.seed)
        assert job_cfg.model.name == cfg.spec(job.variant).name
        assert (job_cfg.train.fold, job_cfg.train.seed, job_cfg.train.folds) == (job.fold, job.seed, cfg.folds)
        assert job_cfg.train.split_seed == cfg.split_seed  # one split for every seed
        assert job_cfg.train.epochs == cfg.budget.epochs and tuple(job_cfg.data.patch_size) == cfg.budget.patch_size
        assert job_cfg.experiment == cfg.experiment


def test_shards_partition_the_jobs():
    cfg = load_study_config(ROOT / "configs" / "study.yaml")
    jobs = all_jobs(cfg)
    for n in (1, 2, 3, 7):
        parts = [shard_jobs(jobs, (i, n)) for i in range(n)]
        assert sorted(j.id for p in parts for j in p) == sorted(j.id for j in jobs)
        assert len({j.id for p in parts for j in p}) == len(jobs)


def test_a_variant_with_its_own_width_keeps_the_budget_and_the_others_keep_theirs():
    cfg = load_study_config(
        ROOT / "configs" / "study_demo.yaml",
        ["variants=[unet, {name: unet, label: unet_wide, overrides: {model.channels: [16, 32, 64, 128]}}]"],
    )
    wide = cfg.job_config("unet_wide", fold=0, seed=0)
    narrow = cfg.job_config("unet", fold=0, seed=0)
    assert list(wide.model.channels) == [16, 32, 64, 128] and list(narrow.model.channels) == [8, 16, 32, 64]
    assert wide.train.iterations_per_epoch == narrow.train.iterations_per_epoch


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("variants=[unet, unet]", "listed twice"),
        ("variants=[]", "at least one variant"),
        ("seeds=[1, 1]", "distinct seeds"),
        ("name=../x", "not a safe name"),
        ("variants=[unet, {name: danet, label: a+b}]", "may not contain '+'"),
        ("variants=[unet, {name: danet, overrides: {train.fold: 1}}]", "may not override 'train.fold'"),
        ("variants=[unet, {name: danet, overrides: {model.channels: [0]}}]", "variant danet"),
        ("budget.batch_size=3", "multiple of data.samples_per_volume"),
        ("select.nonsense=1", "unknown key 'select.nonsense'"),
    ],
)
def test_a_bad_study_config_is_one_line_naming_the_key(override, expect):
    with pytest.raises(Seg3dError, match=None) as err:
        load_study_config(ROOT / "configs" / "study_demo.yaml", [override])
    assert expect in str(err.value) and "\n" not in str(err.value)
