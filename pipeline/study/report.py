"""The study's report: STUDY_DIR/report/report.md with its tables, per_case.csv, summary.csv and the figures.

Written from a StudyResults alone, so that `seg3d study --report-only` rebuilds it from whatever is finished: a
partial study gets a report that says, at the top, which jobs are missing. Every file is written atomically and
all of them together (fileio.atomic_write_all): a report is never half old, half new. Figures are drawn on
matplotlib's Agg canvas directly, without pyplot, so that no process-wide backend is chosen.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.fileio import atomic_write_all, csv_text
from pipeline.study.results import StudyResults
from pipeline.study.stats import MEAN_FOREGROUND, SUMMARY_COLUMNS, case_values, summarize

REPORT, PER_CASE, SUMMARY = "report.md", "per_case.csv", "summary.csv"
DICE_PER_CASE, DICE_VS_COST, DECOY_CONFUSION = "dice_per_case.png", "dice_vs_cost.png", "decoy_confusion.png"
PER_CASE_COLUMNS = ["candidate", "postprocess", "case", "fold", "class", "dice", "hd95", "nsd", "decoy_confusion"]
_JOB_ID = re.compile(r"(?P<variant>.+)-f\d+-s-?\d+")  # pipeline/study/jobs.py: VARIANT-fFOLD-sSEED

HOW_TO_READ = """\
Every number comes from out-of-fold predictions: each case was predicted by the fold model that never saw it, so
every candidate is scored on the same cases. Dice is given as mean ± standard deviation over cases with its 95%
percentile-bootstrap interval of the mean. "p" is the two-sided paired Wilcoxon signed-rank test of the candidate's
per-case Dice against the baseline's (same post-processing setting); "Holm p" corrects it for the number of
candidates compared with the baseline, and is the one to read: below 0.05, the difference is unlikely to be chance.
A narrow interval with a large p means the variants differ by less than the cases differ among themselves. HD95 is
in mm (lower is better, cases where it is undefined left out); NSD is the surface Dice at the evaluation tolerance.
The decoy confusion, where the dataset marks decoys, is the fraction of decoy voxels (tissue that looks like the
organ, where no organ belongs) labelled as the class: a network that uses context keeps it low. Costs were measured
on the hardware named above; set a gain in Dice against its milliseconds per window in dice_vs_cost.png.
"""


# -- numbers as text ---------------------------------------------------------------------------------------------


def _num(value: float | None, spec: str = ".3f") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return format(value, spec)


def _p(value: float | None) -> str:
    if value is not None and not math.isnan(value) and value < 0.001:
        return "<0.001"
    return _num(value, ".3f")


def _cell(text: object) -> str:
    """Text for a markdown table cell: a pipe or a line break would end the cell or the row."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _label(candidate: str, postprocess: bool) -> str:
    return f"{candidate} +pp" if postprocess else candidate


def dice_text(row: dict) -> str:
    """A summary row's Dice as the report prints it: mean ± std [ci_low, ci_high]."""
    return (
        f"{_num(row['dice_mean'])} ± {_num(row['dice_std'])} [{_num(row['dice_ci_low'])}, {_num(row['dice_ci_high'])}]"
    )


# -- what is shown -----------------------------------------------------------------------------------------------


def network_flag(results: StudyResults) -> bool:
    """The post-processing flag that shows the networks themselves: off where scored so, else on."""
    flags = {s.postprocess for s in results.scores}
    return bool(flags) and False not in flags


def selection_class(results: StudyResults) -> str:
    return results.selection_class or MEAN_FOREGROUND


def variants(results: StudyResults) -> list[str]:
    """The single variants (not ensembles) with scores or costs, the baseline first, the rest in ranking order."""
    seen = [s.candidate for s in results.scores if "+" not in s.candidate] + list(results.costs)
    ranked = [r["candidate"] for r in results.ranking if len(r.get("members", [r["candidate"]])) == 1]
    names = list(dict.fromkeys([*ranked, *seen]))
    return sorted(names, key=lambda v: v != results.baseline)  # stable: the baseline moves first


def box_order(results: StudyResults) -> list[tuple[str, bool]]:
    """The boxes of dice_per_case.png, left to right, as (candidate, postprocess): every single variant as the
    network scores it (network_flag), baseline first, the others best first; then the winner, where it is an
    ensemble or post-processed."""
    flag = network_flag(results)
    order = [(v, flag) for v in variants(results)]
    if results.ranking:
        winner = (results.ranking[0]["candidate"], bool(results.ranking[0]["postprocess"]))
        if winner not in order:
            order.append(winner)
    return order


def _has_decoys(results: StudyResults) -> bool:
    return any(s.decoy_confusion is not None for s in results.scores)


def _train_hours(results: StudyResults) -> dict[str, float]:
    hours: dict[str, float] = defaultdict(float)
    for job, seconds in results.seconds.items():
        match = _JOB_ID.fullmatch(job)
        if match:
            hours[match["variant"]] += seconds / 3600
    return hours


# -- report.md ---------------------------------------------------------------------------------------------------


def _missing_section(results: StudyResults, has_scores: bool) -> list[str]:
    if not results.missing_jobs:
        return ["Every job of the study has finished.", ""]
    jobs = ", ".join(f"`{_cell(j)}`" for j in results.missing_jobs)
    return [
        f"> **WARNING: {len(results.missing_jobs)} job(s) have no out-of-fold predictions yet, and the comparison below"
        " leaves them out** (a variant with a missing fold is left out whole). Run `seg3d study` again to finish"
        " them, then rebuild this report.",
        ">",
        f"> Missing: {jobs}",
        "",
        *([] if has_scores else ["**No candidate has out-of-fold scores yet: there is nothing to compare.**", ""]),
    ]


def _class_tables(results: StudyResults, rows: list[dict]) -> list[str]:
    decoys = _has_decoys(results)
    header = ["candidate", "post-processing", "n", "Dice mean ± std [95% CI]", "p vs baseline", "Holm p"]
    header += ["HD95 mm", "NSD"] + (["decoy confusion"] if decoys else [])
    lines: list[str] = []
    for cls in [*results.classes, MEAN_FOREGROUND]:
        mine = [r for r in rows if r["class"] == cls]
        if not mine:
            continue
        mine.sort(key=lambda r: (r["postprocess"], r["candidate"] != results.baseline, -_sortable(r["dice_mean"])))
        title = f"class {cls}"
        if cls == MEAN_FOREGROUND:
            title = "mean foreground (each case's mean over classes" + (
                "; decoys labelled any class)" if decoys else ")"
            )
        marker = " (selects the winner)" if cls == selection_class(results) else ""
        table = []
        for r in mine:
            name = f"{r['candidate']} (baseline)" if r["candidate"] == results.baseline else r["candidate"]
            cells = [name, "on" if r["postprocess"] else "off", r["n"], dice_text(r), _p(r["p_vs_baseline"])]
            cells += [_p(r["p_holm"]), _num(r["hd95_mean"], ".1f"), _num(r["nsd_mean"])]
            table.append(cells + ([_num(r["decoy_confusion"])] if decoys else []))
        lines += [f"### {_cell(title)}{marker}", "", *_table(header, table), ""]
    return lines


def _sortable(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def _costs_table(results: StudyResults) -> list[str]:
    if not results.costs:
        return ["No costs measured yet.", ""]
    hours = _train_hours(results)
    header = ["variant", "parameters", "GFLOPs / patch", "ms / window", "train s / iteration", "peak train MiB"]
    header.append("training h (all jobs)")
    table = []
    for v in [v for v in variants(results) if v in results.costs]:
        c = results.costs[v]
        table.append(
            [
                v,
                f"{int(c.get('parameters', 0)):,}",
                _num(c.get("gflops_per_patch"), ".3g"),
                _num(c.get("ms_per_window"), ".3g"),
                _num(c.get("train_s_per_iteration"), ".3g"),
                _num(c.get("peak_train_mib"), ".4g"),
                _num(hours.get(v), ".2f"),
            ]
        )
    return [*_table(header, table), ""]


def _ranking_table(results: StudyResults) -> list[str]:
    if not results.ranking:
        return ["No candidate ranked yet.", ""]
    what = f"class {results.selection_class} Dice" if results.selection_class else "mean foreground Dice"
    table = []
    for i, r in enumerate(results.ranking, 1):
        name = f"**{r['candidate']}** (winner)" if i == 1 else r["candidate"]
        members = ", ".join(r.get("members", [r["candidate"]]))
        table.append([i, name, "on" if r["postprocess"] else "off", members, _num(r["score"], ".4f")])
    header = ["rank", "candidate", "post-processing", "members", f"{what} (mean over cases)"]
    return [f"Ranked on {what}.", "", *_table(header, table), ""]


def report_text(results: StudyResults, rows: list[dict], figures: list[str]) -> str:
    """report.md for `results`, its summary `rows` (stats.summarize) and the names of the figures written."""
    lines = [
        f"# Study {_cell(results.name)}",
        "",
        f"Date: {results.date or 'unknown'}. Hardware: {results.hardware or 'unknown'}.",
        f"Baseline: `{results.baseline}`.",
        f"Classes: {', '.join(results.classes) or 'none'}. Total training time: "
        f"{sum(results.seconds.values()) / 3600:.2f} h over {len(results.seconds)} job(s).",
        "",
        *_missing_section(results, bool(results.scores)),
    ]
    if results.ranking:
        w = results.ranking[0]
        lines += [
            f"**Winner: {w['candidate']}**, post-processing {'on' if w['postprocess'] else 'off'}, "
            f"{_num(w['score'], '.4f')} on the selection metric (members: {', '.join(w.get('members', []))}).",
            "",
        ]
    lines += ["## Dice, HD95 and NSD per class", "", *_class_tables(results, rows)]
    lines += ["## Costs per variant", "", *_costs_table(results)]
    lines += ["## Ranking of every candidate", "", *_ranking_table(results)]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    lines += ["## How to read this report", "", HOW_TO_READ]
    return "\n".join(lines)


# -- figures -----------------------------------------------------------------------------------------------------


def _png(draw: Callable[[Figure], None], size: tuple[float, float]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        fig = Figure(figsize=size)
        FigureCanvasAgg(fig)
        draw(fig)
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=100)

    return write


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _dice_per_case(results: StudyResults) -> Callable[[Figure], None]:
    cls = results.selection_class
    what = f"{cls} Dice" if cls else "mean foreground Dice"
    boxes = []
    for candidate, pp in box_order(results):
        values = case_values(results, candidate=candidate, postprocess=pp, class_name=cls)
        finite = [v for v in values.values() if math.isfinite(v)]
        if finite:
            boxes.append((_label(candidate, pp), finite))

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        if not boxes:
            return _empty(ax, "no out-of-fold scores yet")
        ax.boxplot([b[1] for b in boxes], showfliers=False)
        jitter = np.random.default_rng(0)
        for i, (name, values) in enumerate(boxes, 1):
            colour = "tab:red" if name == results.baseline else "tab:blue"
            ax.scatter(i + jitter.uniform(-0.15, 0.15, len(values)), values, s=12, alpha=0.6, color=colour)
        ax.set_xticks(range(1, len(boxes) + 1), [b[0] for b in boxes], rotation=30, ha="right")
        ax.set_ylabel(f"per-case {what}")
        ax.set_title(f"{results.name}: per-case {what}, out of fold", fontsize=10)

    return draw


def _dice_vs_cost(results: StudyResults, rows: list[dict]) -> Callable[[Figure], None]:
    flag, cls = network_flag(results), selection_class(results)
    by_candidate = {r["candidate"]: r for r in rows if r["class"] == cls and r["postprocess"] == flag}
    points = [
        (v, results.costs[v]["ms_per_window"], by_candidate[v])
        for v in variants(results)
        if v in results.costs and v in by_candidate and math.isfinite(by_candidate[v]["dice_mean"])
    ]

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        if not points:
            return _empty(ax, "no variant has both scores and costs yet")
        for v, ms, r in points:
            low, high = r["dice_ci_low"], r["dice_ci_high"]
            err = [[r["dice_mean"] - low], [high - r["dice_mean"]]] if math.isfinite(low) else None
            ax.errorbar(ms, r["dice_mean"], yerr=err, fmt="o", capsize=3)
            ax.annotate(v, (ms, r["dice_mean"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("ms per sliding window at inference")
        ax.set_ylabel(f"mean {cls} Dice (95% CI)" if cls != MEAN_FOREGROUND else "mean foreground Dice (95% CI)")
        ax.set_title(f"{results.name}: Dice against inference cost", fontsize=10)

    return draw


def _decoy_confusion(results: StudyResults, rows: list[dict]) -> Callable[[Figure], None]:
    flag = network_flag(results)
    names = variants(results)
    classes = [
        c
        for c in results.classes
        if any(r["class"] == c and r["decoy_confusion"] is not None for r in rows if r["postprocess"] == flag)
    ]
    value = {(r["candidate"], r["class"]): r["decoy_confusion"] for r in rows if r["postprocess"] == flag}

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        width = 0.8 / max(1, len(classes))
        for k, cls in enumerate(classes):
            heights = [math.nan if value.get((v, cls)) is None else value[(v, cls)] for v in names]
            ax.bar(np.arange(len(names)) + k * width, heights, width=width, label=f"labelled {cls}")
        ax.set_xticks(np.arange(len(names)) + width * (len(classes) - 1) / 2, names, rotation=30, ha="right")
        ax.set_ylabel("fraction of decoy voxels")
        ax.set_title(f"{results.name}: decoy confusion (lower: the network uses context)", fontsize=10)
        ax.legend()

    return draw


# -- the files ---------------------------------------------------------------------------------------------------


def _per_case_rows(results: StudyResults) -> list[list[object]]:
    return [
        [s.candidate, s.postprocess, s.case, s.fold, s.class_name, s.dice, s.hd95, s.nsd,
         "" if s.decoy_confusion is None else s.decoy_confusion]
        for s in results.scores
    ]  # fmt: skip


def write_report(results: StudyResults, folder: Path) -> list[Path]:
    """Write report.md, per_case.csv, summary.csv, dice_per_case.png, dice_vs_cost.png and, where the dataset has
    decoy masks, decoy_confusion.png into `folder`, all at once; returns their paths."""
    folder = Path(folder)
    rows = summarize(results)
    figures: list[tuple[str, Callable[[Path], None]]] = [
        (DICE_PER_CASE, _png(_dice_per_case(results), (max(6.0, 0.7 * len(box_order(results)) + 2), 4.5))),
        (DICE_VS_COST, _png(_dice_vs_cost(results, rows), (7.0, 5.0))),
    ]
    if _has_decoys(results):
        figures.append((DECOY_CONFUSION, _png(_decoy_confusion(results, rows), (7.0, 4.5))))
    text = report_text(results, rows, [name for name, _ in figures])
    per_case = csv_text(PER_CASE_COLUMNS, _per_case_rows(results))
    summary = csv_text(SUMMARY_COLUMNS, [["" if r[k] is None else r[k] for k in SUMMARY_COLUMNS] for r in rows])
    writes: list[tuple[Path, Callable[[Path], object]]] = [
        (folder / REPORT, lambda tmp: Path(tmp).write_text(text, newline="")),
        (folder / PER_CASE, lambda tmp: Path(tmp).write_text(per_case, newline="")),
        (folder / SUMMARY, lambda tmp: Path(tmp).write_text(summary, newline="")),
        *((folder / name, write) for name, write in figures),
    ]
    atomic_write_all(writes)
    return [path for path, _ in writes]
