"""The study report from a StudyResults built by hand: every file on disk, real PNG images, the summary's numbers in
report.md, the decoy column only where decoys exist, the baseline first in the box plot, missing jobs named."""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.study.report import (
    DECOY_CONFUSION,
    DICE_PER_CASE,
    DICE_VS_COST,
    PER_CASE,
    REPORT,
    SUMMARY,
    box_order,
    dice_text,
    write_report,
)
from pipeline.study.results import Score, StudyResults
from pipeline.study.stats import MEAN_FOREGROUND, SUMMARY_COLUMNS, summarize

CASES = [f"case_{i:02d}" for i in range(8)]
CLASSES = ["pancreas", "cancer"]
# unet is the baseline and scores worst: it must still come first in the box plot.
SHIFTS = {"unet": 0.0, "attention_unet": 0.06, "danet": 0.03, "attention_unet+danet": 0.08}


def _scores(candidate: str, postprocess: bool, decoys: bool) -> list[Score]:
    rng = np.random.default_rng(zlib.crc32(f"{candidate}{postprocess}".encode()))
    shift = SHIFTS[candidate] + (0.01 if postprocess else 0.0)
    return [
        Score(
            candidate=candidate,
            postprocess=postprocess,
            case=case,
            fold=i % 2,
            class_name=cls,
            dice=float(np.clip(0.75 - 0.3 * k + shift + 0.04 * rng.standard_normal(), 0, 1)),
            hd95=float(8 + 10 * k - 20 * shift + rng.uniform(0, 2)),
            nsd=float(0.7 - 0.2 * k + shift),
            decoy_confusion=float(0.3 - 2 * shift + 0.01 * i) if decoys else None,
        )
        for i, case in enumerate(CASES)
        for k, cls in enumerate(CLASSES)
    ]


def study(decoys: bool = True, missing: list[str] | None = None) -> StudyResults:
    scores = [s for c in SHIFTS for pp in (False, True) for s in _scores(c, pp, decoys)]
    costs = {
        v: {
            "parameters": 1000.0 * (i + 1),
            "gflops_per_patch": 0.5 * (i + 1),
            "ms_per_window": 10.0 * (i + 1),
            "train_s_per_iteration": 0.2 * (i + 1),
            "peak_train_mib": 300.0 * (i + 1),
        }
        for i, v in enumerate(["unet", "attention_unet", "danet"])
    }
    ranking = sorted(
        (
            {"candidate": c, "postprocess": pp, "members": c.split("+"), "score": SHIFTS[c] + 0.01 * pp + 0.6}
            for c in SHIFTS
            for pp in (False, True)
        ),
        key=lambda r: -r["score"],
    )
    return StudyResults(
        name="phantom-study",
        baseline="unet",
        classes=CLASSES,
        selection_class=None,
        scores=scores,
        costs=costs,
        ranking=ranking,
        missing_jobs=missing or [],
        hardware="2-core test CPU",
        date="2026-12-02",
        seconds={"unet-f0-s0": 3600.0, "unet-f1-s0": 1800.0, "danet-f0-s0": 7200.0},
    )


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.width >= 300 and image.height >= 200
        # Not a blank canvas: a plot has many distinct colours (axes, text, boxes, points).
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
    assert path.stat().st_size > 5000


def test_full_report_with_decoys(tmp_path):
    results = study(decoys=True)
    paths = write_report(results, tmp_path / "report")
    names = {p.name for p in paths}
    assert names == {REPORT, PER_CASE, SUMMARY, DICE_PER_CASE, DICE_VS_COST, DECOY_CONFUSION}
    assert all(p.is_file() for p in paths)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(names)  # no temporaries left
    for name in (DICE_PER_CASE, DICE_VS_COST, DECOY_CONFUSION):
        _check_png(tmp_path / "report" / name)

    text = (tmp_path / "report" / REPORT).read_text()
    assert "# Study phantom-study" in text and "2026-12-02" in text and "2-core test CPU" in text
    assert "WARNING" not in text and "Every job of the study has finished." in text
    rows = summarize(results)
    chosen = next(r for r in rows if r["candidate"] == "danet" and r["class"] == "cancer" and not r["postprocess"])
    line = next(ln for ln in text.splitlines() if ln.startswith("| danet |") and dice_text(chosen) in ln)
    assert f"{chosen['p_vs_baseline']:.3f}" in line or "<0.001" in line
    assert f"{chosen['p_holm']:.3f}" in line or "<0.001" in line
    assert f"{chosen['hd95_mean']:.1f}" in line and f"{chosen['decoy_confusion']:.3f}" in line
    mean_row = next(r for r in rows if r["candidate"] == "unet" and r["class"] == MEAN_FOREGROUND)
    assert dice_text(mean_row) in text
    assert text.count("decoy confusion") >= 3  # a column in every class table
    # Ranking: every candidate, the winner marked; costs per variant.
    assert "**attention_unet+danet** (winner)" in text
    ranking = text.split("## Ranking of every candidate")[1].split("## Figures")[0]
    assert all(f"| {r['candidate']} | {'on' if r['postprocess'] else 'off'} |" in ranking for r in results.ranking[1:])
    assert "| danet | 3,000 | 1.5 | 30 | 0.6 | 900 | 2.00 |" in text
    assert "How to read this report" in text


def test_csv_files_hold_every_score_and_the_summary(tmp_path):
    results = study(decoys=True)
    write_report(results, tmp_path)
    with open(tmp_path / PER_CASE, newline="") as f:
        per_case = list(csv.DictReader(f))
    assert len(per_case) == len(results.scores)
    first = results.scores[0]
    assert per_case[0]["case"] == first.case and float(per_case[0]["dice"]) == pytest.approx(first.dice)
    with open(tmp_path / SUMMARY, newline="") as f:
        summary = list(csv.DictReader(f))
    rows = summarize(results)
    assert list(summary[0]) == SUMMARY_COLUMNS and len(summary) == len(rows)
    for got, want in zip(summary, rows):
        assert got["candidate"] == want["candidate"] and got["class"] == want["class"]
        assert float(got["dice_mean"]) == pytest.approx(want["dice_mean"])
        assert (got["p_vs_baseline"] == "") == (want["p_vs_baseline"] is None)


def test_without_decoys_there_is_no_decoy_column_nor_figure(tmp_path):
    paths = write_report(study(decoys=False), tmp_path)
    assert DECOY_CONFUSION not in {p.name for p in paths}
    assert not (tmp_path / DECOY_CONFUSION).exists()
    text = (tmp_path / REPORT).read_text()
    assert "decoy" not in text.split("## How to read")[0].lower()
    with open(tmp_path / PER_CASE, newline="") as f:
        assert all(row["decoy_confusion"] == "" for row in csv.DictReader(f))


def test_box_plot_order_puts_the_baseline_first_then_the_winner_last():
    results = study()
    order = box_order(results)
    assert order[0] == ("unet", False)  # the baseline ranks last, yet comes first
    assert order[1:3] == [("attention_unet", False), ("danet", False)]  # the others best first
    assert order[-1] == ("attention_unet+danet", True)  # the winner, an ensemble with post-processing
    assert len(order) == 4


def test_missing_jobs_are_named_loudly_and_a_partial_study_still_reports(tmp_path):
    results = study(missing=["danet-f1-s0", "danet-f0-s0"])
    results.scores = [s for s in results.scores if "danet" not in s.candidate]
    results.ranking = [r for r in results.ranking if "danet" not in r["candidate"]]
    del results.costs["danet"]
    paths = write_report(results, tmp_path)
    text = (tmp_path / REPORT).read_text()
    assert "WARNING: 2 job(s) have no out-of-fold predictions yet" in text
    assert "`danet-f1-s0`" in text and "`danet-f0-s0`" in text
    assert "| danet |" not in text
    assert "**attention_unet** (winner)" in text
    for path in paths:
        if path.suffix == ".png":
            _check_png(path)


def test_an_empty_study_says_there_is_nothing_yet(tmp_path):
    results = StudyResults(
        name="empty", baseline="unet", classes=CLASSES, selection_class="pancreas", missing_jobs=["unet-f0-s0"]
    )
    paths = write_report(results, tmp_path)
    assert {p.name for p in paths} == {REPORT, PER_CASE, SUMMARY, DICE_PER_CASE, DICE_VS_COST}
    text = (tmp_path / REPORT).read_text()
    assert "`unet-f0-s0`" in text and "nothing to compare" in text
    assert "No costs measured yet." in text and "No candidate ranked yet." in text
    with open(tmp_path / SUMMARY, newline="") as f:
        assert list(csv.reader(f)) == [SUMMARY_COLUMNS]
    assert box_order(results) == []
