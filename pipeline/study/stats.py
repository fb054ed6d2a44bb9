"""The statistics of a study: bootstrap intervals, the paired Wilcoxon test against the baseline, Holm's correction,
and the summary rows (one per candidate, post-processing flag and class) that the report prints.

Every candidate is scored on the same out-of-fold cases, so the test against the baseline is paired by case:
Wilcoxon's signed-rank test (scipy.stats.wilcoxon, two-sided), as nnU-Net-style comparisons and the medical
segmentation decathlon's ranking do, with Holm's step-down correction (Holm 1979, "A simple sequentially rejective
multiple test procedure") across the candidates compared with the same baseline. Intervals are percentile bootstrap
intervals of the mean over cases (Efron & Tibshirani 1993, ch. 13).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from pipeline.study.results import Score, StudyResults

# The class name of the rows that average the foreground classes per case: the winner is chosen on it when
# results.selection_class is None.
MEAN_FOREGROUND = "mean foreground"

# The column order of summarize's rows (and of summary.csv).
SUMMARY_COLUMNS = [
    "candidate",
    "postprocess",
    "class",
    "n",
    "dice_mean",
    "dice_std",
    "dice_ci_low",
    "dice_ci_high",
    "hd95_mean",
    "hd95_std",
    "nsd_mean",
    "nsd_std",
    "decoy_confusion",
    "p_vs_baseline",
    "p_holm",
]


def _finite(values: Iterable[float]) -> np.ndarray:
    x = np.asarray(list(values), dtype=np.float64)
    return x[np.isfinite(x)]


def bootstrap_ci(values, *, confidence: float = 0.95, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaN and infinities dropped): `resamples` resamples of
    the same size drawn with replacement, the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of their
    means. Fewer than 2 finite values: (nan, nan)."""
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"confidence must be in (0, 1) and resamples at least 1, got {confidence}, {resamples}")
    x = _finite(values)
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    # Drawn in blocks so that memory stays bounded (resamples * n indices at once would be 800 MB for 10,000 x 10,000).
    block = max(1, 2_000_000 // x.size)
    means = []
    for start in range(0, resamples, block):
        picks = rng.integers(0, x.size, size=(min(block, resamples - start), x.size))  # (resamples in block, n)
        means.append(x[picks].mean(axis=1))
    means = np.concatenate(means)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_wilcoxon(a, b) -> float:
    """Two-sided p-value of Wilcoxon's signed-rank test of the pairs (a[i], b[i]); pairs with a NaN in either are
    dropped. All differences zero: 1.0 (nothing differs). Fewer than 2 pairs: nan."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size < 2:
        return math.nan
    if np.all(x == y):
        return 1.0
    with warnings.catch_warnings():
        # scipy warns when zero differences or ties make it fall back to the normal approximation; the p-value it
        # then returns is the right one for those data.
        warnings.simplefilter("ignore", category=RuntimeWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        return float(scipy_stats.wilcoxon(x, y, alternative="two-sided").pvalue)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values, same keys: the i-th smallest of m p-values becomes
    max over j <= i of min(1, (m - j + 1) * p_(j)). NaN stays NaN and does not count in m."""
    out = {key: math.nan for key in pvalues}
    ranked = sorted((p, key) for key, p in pvalues.items() if p is not None and not math.isnan(p))
    m = len(ranked)
    running = 0.0
    for i, (p, key) in enumerate(ranked):
        running = max(running, min(1.0, (m - i) * p))
        out[key] = running
    return out


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    mean = float(values.mean()) if values.size else math.nan
    std = float(values.std(ddof=1)) if values.size >= 2 else math.nan
    return mean, std


def _nanmean(values: list[float]) -> float:
    x = _finite(values)
    return float(x.mean()) if x.size else math.nan


@dataclass(frozen=True)
class CaseNumbers:
    """One candidate's numbers on one case for one class (or MEAN_FOREGROUND)."""

    dice: float
    hd95: float
    nsd: float
    decoy_confusion: float | None


CaseTable = dict[tuple[str, bool, str], dict[str, CaseNumbers]]


def per_case(results: StudyResults) -> CaseTable:
    """(candidate, postprocess, class) -> case -> CaseNumbers, including the MEAN_FOREGROUND class: each number
    averaged over the case's foreground classes (NaN ignored), its decoy confusion the sum over classes (the
    fraction of decoy voxels labelled any foreground class). A case scored more than once (several seeds) gets the
    mean of its scores."""
    grouped: dict[tuple[str, bool, str, str], list[Score]] = defaultdict(list)
    for s in results.scores:
        grouped[(s.candidate, s.postprocess, s.class_name, s.case)].append(s)
    table: CaseTable = defaultdict(dict)
    by_case: dict[tuple[str, bool, str], list[CaseNumbers]] = defaultdict(list)
    for (candidate, pp, cls, case), scores in grouped.items():
        decoys = [s.decoy_confusion for s in scores if s.decoy_confusion is not None]
        numbers = CaseNumbers(
            dice=_nanmean([s.dice for s in scores]),
            hd95=_nanmean([s.hd95 for s in scores]),
            nsd=_nanmean([s.nsd for s in scores]),
            decoy_confusion=float(np.mean(decoys)) if decoys else None,
        )
        table[(candidate, pp, cls)][case] = numbers
        by_case[(candidate, pp, case)].append(numbers)
    for (candidate, pp, case), classes in by_case.items():
        decoys = [c.decoy_confusion for c in classes]
        table[(candidate, pp, MEAN_FOREGROUND)][case] = CaseNumbers(
            dice=_nanmean([c.dice for c in classes]),
            hd95=_nanmean([c.hd95 for c in classes]),
            nsd=_nanmean([c.nsd for c in classes]),
            decoy_confusion=float(sum(decoys)) if None not in decoys else None,  # type: ignore[arg-type]
        )
    return dict(table)


def case_values(
    results: StudyResults, *, candidate: str, postprocess: bool, class_name: str | None
) -> dict[str, float]:
    """Case -> Dice of one candidate for `class_name` (None: the mean foreground Dice, the default selection)."""
    cases = per_case(results).get((candidate, postprocess, class_name or MEAN_FOREGROUND), {})
    return {case: numbers.dice for case, numbers in cases.items()}


def _row(key: tuple[str, bool, str], cases: dict[str, CaseNumbers]) -> dict:
    candidate, pp, cls = key
    dice = _finite(c.dice for c in cases.values())
    hd95 = _finite(c.hd95 for c in cases.values())
    nsd = _finite(c.nsd for c in cases.values())
    decoys = [c.decoy_confusion for c in cases.values() if c.decoy_confusion is not None]
    low, high = bootstrap_ci(dice)
    dice_mean, dice_std = _mean_std(dice)
    hd95_mean, hd95_std = _mean_std(hd95)
    nsd_mean, nsd_std = _mean_std(nsd)
    return {
        "candidate": candidate,
        "postprocess": pp,
        "class": cls,
        "n": int(dice.size),
        "dice_mean": dice_mean,
        "dice_std": dice_std,
        "dice_ci_low": low,
        "dice_ci_high": high,
        "hd95_mean": hd95_mean,
        "hd95_std": hd95_std,
        "nsd_mean": nsd_mean,
        "nsd_std": nsd_std,
        "decoy_confusion": float(np.mean(decoys)) if decoys else None,
        "p_vs_baseline": None,
        "p_holm": None,
    }


def summarize(results: StudyResults) -> list[dict]:
    """One row per (candidate, postprocess, class), classes in label order then MEAN_FOREGROUND, with the keys of
    SUMMARY_COLUMNS. `n` counts the cases with a finite Dice; HD95 and NSD are over their finite values; the decoy
    confusion is None without decoy masks. p_vs_baseline: the paired Wilcoxon p of the candidate's per-case Dice
    against the baseline's (same post-processing flag, the cases both have); p_holm: Holm's adjustment across the
    non-baseline candidates of that class and flag. Both are None for the baseline itself and where the baseline
    has no scores."""
    table = per_case(results)
    order = {cls: i for i, cls in enumerate([*results.classes, MEAN_FOREGROUND])}
    keys = sorted(table, key=lambda k: (order.get(k[2], len(order)), k[2], k[1], k[0] != results.baseline, k[0]))
    rows = [_row(key, table[key]) for key in keys]
    groups: dict[tuple[bool, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["postprocess"], row["class"])].append(row)
    for (pp, cls), group in groups.items():
        base = table.get((results.baseline, pp, cls))
        if not base:
            continue
        pvalues = {}
        for row in group:
            if row["candidate"] == results.baseline:
                continue
            mine = table[(row["candidate"], pp, cls)]
            common = sorted(set(mine) & set(base))
            row["p_vs_baseline"] = paired_wilcoxon([mine[c].dice for c in common], [base[c].dice for c in common])
            pvalues[row["candidate"]] = row["p_vs_baseline"]
        adjusted = holm(pvalues)
        for row in group:
            if row["candidate"] in adjusted:
                row["p_holm"] = adjusted[row["candidate"]]
    return rows
