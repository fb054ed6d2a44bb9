"""The k-fold split of a dataset's labelled cases: seeded, so the same cases, folds and seed give the same split
anywhere (training, `seg3d study`, the benchmarks)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import Seg3dError


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
