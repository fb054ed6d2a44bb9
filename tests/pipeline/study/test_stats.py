"""The study's statistics against independent computations: the exact signed-rank p-value by enumerating every sign
assignment, the normal approximation written out, the exact bootstrap distribution of a tiny sample, the normal
interval of a large one, Holm's correction worked by hand, and the summary rows against numpy on the same numbers."""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest
from scipy.stats import norm

from pipeline.study.results import Score, StudyResults
from pipeline.study.stats import MEAN_FOREGROUND, bootstrap_ci, holm, paired_wilcoxon, per_case, summarize


def exact_signed_rank_p(a: list[float], b: list[float]) -> float:
    """Two-sided exact p of the signed-rank statistic: every one of the 2^n sign assignments of the ranked absolute
    differences is equally likely under the null (no ties, no zero differences)."""
    d = np.asarray(a) - np.asarray(b)
    ranks = np.argsort(np.argsort(np.abs(d))) + 1  # 1..n, no ties
    observed = ranks[d > 0].sum()
    totals = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))]
    below = sum(t <= observed for t in totals) / len(totals)
    above = sum(t >= observed for t in totals) / len(totals)
    return min(1.0, 2 * min(below, above))


A = [0.81, 0.74, 0.90, 0.66, 0.72, 0.85, 0.79, 0.61, 0.88]
D = [0.03, -0.012, 0.061, 0.045, 0.007, 0.08, -0.021, 0.09, 0.015]  # distinct |differences|, none zero
B = [a - d for a, d in zip(A, D)]


def test_wilcoxon_matches_the_exact_enumeration():
    exact = exact_signed_rank_p(A, B)
    assert 0.01 < exact < 0.2  # a p-value that tells a wrong formula from the right one
    assert paired_wilcoxon(A, B) == pytest.approx(exact, rel=1e-12)
    assert paired_wilcoxon(B, A) == pytest.approx(exact, rel=1e-12)  # two-sided


def test_wilcoxon_large_sample_matches_the_normal_approximation():
    rng = np.random.default_rng(3)
    a = rng.uniform(0.5, 0.9, size=80)
    b = a - rng.normal(0.01, 0.03, size=80)  # continuous: no ties, no zeros
    d = a - b
    n = d.size
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    t_plus = ranks[d > 0].sum()
    z = (t_plus - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    assert paired_wilcoxon(a, b) == pytest.approx(2 * norm.sf(abs(z)), rel=1e-6)


def test_wilcoxon_drops_nan_pairs_and_handles_degenerate_input():
    assert paired_wilcoxon([*A, math.nan, 0.5], [*B, 0.3, math.nan]) == pytest.approx(exact_signed_rank_p(A, B))
    assert paired_wilcoxon([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]) == 1.0
    assert math.isnan(paired_wilcoxon([0.5, math.nan], [0.4, 0.3]))
    assert math.isnan(paired_wilcoxon([], []))


def test_bootstrap_of_a_tiny_sample_follows_its_exact_distribution():
    """For n = 4 the bootstrap distribution of the mean is known exactly (all 4^4 resamples equally likely); the
    interval's ends must be its 2.5% and 97.5% quantiles up to the Monte Carlo error."""
    x = np.array([0.0, 1.0, 2.0, 10.0])
    means = np.sort([np.mean(x[list(idx)]) for idx in itertools.product(range(4), repeat=4)])
    low, high = bootstrap_ci(x, resamples=20000, seed=1)
    # The exact quantiles at 1.5% and 3.5% (and 96.5%, 98.5%) bracket what 20,000 resamples can give.
    assert np.quantile(means, 0.015) <= low <= np.quantile(means, 0.035)
    assert np.quantile(means, 0.965) <= high <= np.quantile(means, 0.985)
    assert np.quantile(means, 0.035) < np.quantile(means, 0.965)  # the bracket is not vacuous


def test_bootstrap_of_a_large_sample_matches_the_normal_interval():
    rng = np.random.default_rng(7)
    x = rng.normal(0.7, 0.1, size=2000)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(x.size)
    low, high = bootstrap_ci(x, seed=0)
    assert low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.1 * half)
    narrower = bootstrap_ci(x, confidence=0.5, seed=0)
    assert low < narrower[0] < narrower[1] < high


def test_bootstrap_is_seeded_drops_nan_and_needs_two_values():
    x = [0.3, 0.5, math.nan, 0.9, 0.4, math.inf]
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci([0.3, 0.5, 0.9, 0.4], seed=5)
    assert all(math.isnan(v) for v in bootstrap_ci([0.4, math.nan]))
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_holm_worked_by_hand():
    # m = 4 (NaN does not count). Sorted: a 0.01, c 0.03, b 0.04, d 0.20.
    # a: 4 * 0.01 = 0.04; c: max(0.04, 3 * 0.03) = 0.09; b: max(0.09, 2 * 0.04 = 0.08) = 0.09; d: max(0.09, 0.20).
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.20, "e": math.nan})
    assert adjusted["a"] == pytest.approx(0.04)
    assert adjusted["c"] == pytest.approx(0.09)
    assert adjusted["b"] == pytest.approx(0.09)  # monotone: not the 0.08 its own product gives
    assert adjusted["d"] == pytest.approx(0.20)
    assert math.isnan(adjusted["e"])
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}  # capped at 1
    assert holm({}) == {}


# -- summarize ------------------------------------------------------------------------------------------------------

CASES = [f"case_{i}" for i in range(8)]
CLASSES = ["pancreas", "cancer"]


def _scores(candidate: str, shift: float, *, postprocess: bool = False, decoy: bool = False) -> list[Score]:
    rng = np.random.default_rng(zlib.crc32(f"{candidate}{postprocess}".encode()))
    out = []
    for i, case in enumerate(CASES):
        for k, cls in enumerate(CLASSES):
            dice = float(np.clip(0.5 + 0.3 * k + shift + 0.05 * rng.standard_normal(), 0, 1))
            if cls == "cancer" and i == 0:
                dice = math.nan  # absent from reference and prediction
            out.append(
                Score(
                    candidate=candidate,
                    postprocess=postprocess,
                    case=case,
                    fold=i % 2,
                    class_name=cls,
                    dice=dice,
                    hd95=math.inf if i == 1 else 10.0 - 10 * shift + i,
                    nsd=0.6 + shift,
                    decoy_confusion=(0.2 - shift + 0.01 * i) if decoy else None,
                )
            )
    return out


def _results(decoy: bool = False) -> StudyResults:
    scores = [
        *_scores("unet", 0.0, decoy=decoy),
        *_scores("danet", 0.05, decoy=decoy),
        *_scores("emanet", 0.02, decoy=decoy),
        *_scores("danet+emanet", 0.06, decoy=decoy),
    ]
    return StudyResults(name="s", baseline="unet", classes=CLASSES, selection_class=None, scores=scores)


def _dice(results: StudyResults, candidate: str, cls: str) -> np.ndarray:
    by_case = {s.case: s.dice for s in results.scores if s.candidate == candidate and s.class_name == cls}
    return np.array([by_case[c] for c in CASES])


def test_summary_rows_match_numpy_and_the_tests():
    results = _results()
    rows = summarize(results)
    row = {(r["candidate"], r["postprocess"], r["class"]): r for r in rows}
    assert len(rows) == 4 * (len(CLASSES) + 1)
    assert [r["class"] for r in rows][:4] == ["pancreas"] * 4  # classes in label order, the baseline first
    assert rows[0]["candidate"] == "unet"

    danet, unet = _dice(results, "danet", "cancer"), _dice(results, "unet", "cancer")
    r = row[("danet", False, "cancer")]
    assert r["n"] == 7  # the case where cancer is absent from both does not count
    assert r["dice_mean"] == pytest.approx(np.nanmean(danet))
    assert r["dice_std"] == pytest.approx(np.nanstd(danet, ddof=1))
    assert (r["dice_ci_low"], r["dice_ci_high"]) == bootstrap_ci(danet)
    assert r["dice_ci_low"] < r["dice_mean"] < r["dice_ci_high"]
    assert r["hd95_mean"] == pytest.approx(np.mean([10.0 - 0.5 + i for i in range(8) if i != 1]))  # inf left out
    assert r["decoy_confusion"] is None
    assert r["p_vs_baseline"] == pytest.approx(paired_wilcoxon(danet, unet))
    ps = {c: row[(c, False, "cancer")]["p_vs_baseline"] for c in ("danet", "emanet", "danet+emanet")}
    assert r["p_holm"] == pytest.approx(holm(ps)["danet"])
    assert row[("unet", False, "cancer")]["p_vs_baseline"] is None
    assert row[("unet", False, "cancer")]["p_holm"] is None


def test_mean_foreground_rows_average_the_classes_per_case():
    results = _results(decoy=True)
    rows = {(r["candidate"], r["postprocess"], r["class"]): r for r in summarize(results)}
    per_case_mean = np.nanmean(
        np.stack([_dice(results, "emanet", "pancreas"), _dice(results, "emanet", "cancer")]), axis=0
    )
    r = rows[("emanet", False, MEAN_FOREGROUND)]
    assert r["n"] == 8
    assert r["dice_mean"] == pytest.approx(per_case_mean.mean())
    unet_mean = np.nanmean(np.stack([_dice(results, "unet", c) for c in CLASSES]), axis=0)
    assert r["p_vs_baseline"] == pytest.approx(paired_wilcoxon(per_case_mean, unet_mean))
    # Decoy confusion: per class its mean over cases; for the mean row the sum over classes (any foreground).
    assert rows[("emanet", False, "pancreas")]["decoy_confusion"] == pytest.approx(0.18 + 0.035)
    assert r["decoy_confusion"] == pytest.approx(2 * (0.18 + 0.035))


def test_cases_pair_by_id_and_repeated_seeds_are_averaged():
    base = _scores("unet", 0.0)
    other = [s for s in _scores("danet", 0.05) if s.case != "case_3"]  # one case missing: pairs on the other 7
    seed2 = [Score(**{**s.__dict__, "dice": s.dice - 0.02}) for s in other]
    results = StudyResults(name="s", baseline="unet", classes=CLASSES, selection_class=None)
    results.scores = [*base, *reversed(other), *seed2]
    table = per_case(results)
    assert table[("danet", False, "pancreas")]["case_0"].dice == pytest.approx(
        np.mean([s.dice for s in [*other, *seed2] if s.case == "case_0" and s.class_name == "pancreas"])
    )
    row = next(r for r in summarize(results) if r["candidate"] == "danet" and r["class"] == "pancreas")
    cases = [c for c in CASES if c != "case_3"]
    mine = [table[("danet", False, "pancreas")][c].dice for c in cases]
    theirs = [table[("unet", False, "pancreas")][c].dice for c in cases]
    assert row["p_vs_baseline"] == pytest.approx(paired_wilcoxon(mine, theirs))
    assert row["p_holm"] == pytest.approx(row["p_vs_baseline"])  # the only comparison: Holm leaves it


def test_no_baseline_scores_leaves_p_empty():
    results = StudyResults(name="s", baseline="unet", classes=CLASSES, selection_class=None)
    results.scores = _scores("danet", 0.05)
    assert all(r["p_vs_baseline"] is None and r["p_holm"] is None for r in summarize(results))
    assert summarize(StudyResults(name="s", baseline="unet", classes=CLASSES, selection_class=None)) == []
