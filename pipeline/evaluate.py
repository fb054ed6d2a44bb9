"""Per-case segmentation metrics: the Dice that training validates on, and the report `seg3d evaluate` writes.

Two conventions for an empty structure live here, on purpose:

- `dice_per_class` (training validation, as nnU-Net): a class absent from both reference and prediction has an
  undefined Dice (NaN, left out of means), so that model selection looks only at structures that are there.
- The evaluation report (`evaluate_case`, `evaluate_folders`, what a paper quotes) counts every case and every
  declared class, as the Medical Segmentation Decathlon did. Each (case, class) record carries a `status`:

  =================  =====================  ====  ===  ============  ==============
  status             reference / prediction Dice  NSD  HD95 (mm)     volume diff
  =================  =====================  ====  ===  ============  ==============
  "both_present"     non-empty / non-empty  computed from the masks
  "both_empty"       empty / empty          1     1    0             0
  "missed"           non-empty / empty      0     0    diagonal      -reference
  "false_positive"   empty / non-empty      0     0    diagonal      +prediction
  =================  =====================  ====  ===  ============  ==============

  "diagonal" is the diagonal of the image's field of view, sqrt(sum((n_i * spacing_i)^2)) mm: larger than any
  surface distance between two voxels of the image, so a missed structure always scores worse than the worst real
  prediction. A class declared in --labels but absent from a reference is one of the rows above: reported, never
  dropped. Summary means, medians and standard deviations run over all cases, these included.

Surface metrics follow MONAI (`compute_hausdorff_distance`, `compute_surface_dice`), which this module calls:
the surface of a mask is its voxels with a face neighbour (6-connectivity) outside the mask or the image, and a
distance is the Euclidean distance in mm between voxel centres, with the spacing from the file's affine.

- HD95 is symmetric as MONAI and DeepMind's surface-distance define it: the larger of the two directed 95th
  percentiles (prediction -> reference surface, reference -> prediction surface; linear interpolation). This is
  not medpy's hd95, which takes the 95th percentile of both directions pooled; the two differ when the two
  surfaces differ much in size.
- NSD (normalised surface Dice, Nikolov et al. 2021) at tolerance t: the share of both surfaces' voxels that lie
  within t mm (<= t) of the other surface. MONAI counts surface voxels; DeepMind weights surface elements by area.
- Volume difference: (prediction voxels - reference voxels) * voxel volume, in ml.

Files are paired by case id. An unpaired case is an error by default: a missing prediction silently left out
would flatter the means. With `allow_missing` (--allow-missing) the matched cases are evaluated, the others are
listed in metrics.json under "unmatched" and the CLI warns on stderr; they are not scored as "missed".
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import Seg3dError
from pipeline.metrics import DIGITS, METRICS, STATUSES, evaluate_case

CSV_COLUMNS = ("case", "label", *METRICS)
CSV_NAME, JSON_NAME = "metrics.csv", "metrics.json"


# -- files and folders ----------------------------------------------------------------------------------------


@dataclass
class Report:
    """The records of an evaluation (one per case and class, cases sorted) and how they were made."""

    records: list[dict]
    labels: dict[str, int]  # foreground classes, name -> value
    tolerance_mm: float
    pred: str = ""
    ref: str = ""
    unmatched: dict[str, list[str]] = field(default_factory=lambda: {"pred_only": [], "ref_only": []})

    @property
    def unmatched_text(self) -> str:
        """The left-out case ids, for the warning --allow-missing prints ("" when every case was paired)."""
        return _unmatched_text(self.unmatched)

    @property
    def cases(self) -> list[str]:
        return sorted({r["case"] for r in self.records})

    def summary(self) -> dict[str, dict]:
        """Per class: the cases covered (all of them), mean / median / sample std of each metric, status counts."""
        out = {}
        for name in self.labels:
            rows = [r for r in self.records if r["label"] == name]
            stats = {}
            for metric in METRICS:
                values = np.asarray([r[metric] for r in rows], dtype=float)
                stats[metric] = {
                    "mean": round(float(values.mean()), DIGITS),
                    "median": round(float(np.median(values)), DIGITS),
                    "std": round(float(values.std(ddof=1)), DIGITS) if len(values) > 1 else None,
                }
            counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
            out[name] = {"n": len(rows), "cases": [r["case"] for r in rows], **stats, "status_counts": counts}
        return out

    def to_json(self) -> dict:
        return {
            "pred": self.pred,
            "ref": self.ref,
            "labels": self.labels,
            "tolerance_mm": self.tolerance_mm,
            "conventions": {
                "summary": "mean, median and sample standard deviation (ddof=1; null for one case) over all cases "
                "listed under `cases`, with both_empty, missed and false_positive records included at the "
                "values below",
                "both_empty": "dice 1, nsd 1, hd95_mm 0, volume_diff_ml 0",
                "missed": "reference non-empty, prediction empty: dice 0, nsd 0, hd95_mm = image diagonal",
                "false_positive": "reference empty, prediction non-empty: dice 0, nsd 0, hd95_mm = image diagonal",
                "image_diagonal_mm": "sqrt(sum((voxels_i * spacing_i)^2)), the field of view's diagonal",
                "hd95_mm": "max of the two directed 95th percentiles of surface-voxel distances (MONAI, DeepMind "
                "surface-distance), not the pooled percentile of medpy",
                "nsd": "share of both surfaces' voxels within tolerance_mm of the other surface (MONAI)",
                "volume_diff_ml": "prediction minus reference",
            },
            "unmatched": self.unmatched,
            "summary": self.summary(),
            "cases": self.records,
        }

    def format(self) -> str:
        """The summary as a table for the terminal."""
        lines = [
            f"{len(self.cases)} cases; HD95 = max of directed 95th percentiles; NSD at {self.tolerance_mm:g} mm; "
            "means over all cases (both empty: Dice 1, HD95 0; missed or false positive: Dice 0, HD95 = diagonal)"
        ]
        rows = [("Dice", "dice", "{:.3f}"), ("HD95 mm", "hd95_mm", "{:.2f}"), ("NSD", "nsd", "{:.3f}")]
        rows.append(("vol diff ml", "volume_diff_ml", "{:+.2f}"))
        for name, s in self.summary().items():
            counts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in s["status_counts"].items())
            lines.append(f"{name} ({s['n']} cases: {counts})")
            for title, metric, fmt in rows:
                m = s[metric]
                std = "n/a" if m["std"] is None else fmt.format(m["std"]).lstrip("+")
                lines.append(f"  {title:<12}{fmt.format(m['mean']):>9} ± {std:<8} median {fmt.format(m['median'])}")
        return "\n".join(lines)


def evaluate_folders(
    pred: Path | str,
    ref: Path | str,
    labels: Mapping[str, int] | None = None,
    tolerance_mm: float = 2.0,
    allow_missing: bool = False,
) -> Report:
    """Evaluate predictions against references. Each of `pred` and `ref` is a NIfTI file or a folder of them;
    cases are matched by case id (two single files are paired as given, under the reference's id). A case on
    one side only is an error, or with `allow_missing` left out and listed in `Report.unmatched`. `labels`
    defaults to MSD Task07's pancreas=1, cancer=2."""
    from pipeline.datalists import MSD_PANCREAS_LABELS, case_id
    from pipeline.imageio import read_volume

    classes = {k: int(v) for k, v in (labels or MSD_PANCREAS_LABELS).items() if int(v) != 0}
    if not classes:
        raise Seg3dError("no foreground classes to evaluate; declare them, e.g. --labels pancreas=1,cancer=2")
    pred, ref = Path(pred), Path(ref)
    if pred.is_file() and ref.is_file():
        preds, refs = {case_id(ref): pred}, {case_id(ref): ref}
    else:
        preds, refs = _cases(pred, "prediction"), _cases(ref, "reference")
    unmatched = {"pred_only": sorted(preds.keys() - refs.keys()), "ref_only": sorted(refs.keys() - preds.keys())}
    if any(unmatched.values()) and not allow_missing:
        raise Seg3dError(
            f"unmatched cases ({_unmatched_text(unmatched)}); pair every prediction with its reference "
            "by file name, or pass --allow-missing to evaluate only the matched cases"
        )
    matched = sorted(preds.keys() & refs.keys())
    if not matched:
        raise Seg3dError(
            f"no case id is both in {pred} and in {ref}; predictions and references are matched by "
            "file name (without .nii.gz and _0000)"
        )
    records = []
    for case in matched:
        p = read_volume(preds[case], case=case, kind="label")
        r = read_volume(refs[case], case=case, kind="label")
        _check_geometry(p, r, case)
        records.extend(evaluate_case(p.array, r.array, r.spacing, classes, tolerance_mm, case=case))
    return Report(records, classes, float(tolerance_mm), str(pred), str(ref), unmatched)


def _unmatched_text(unmatched: dict[str, list[str]]) -> str:
    parts = []
    if unmatched["pred_only"]:
        parts.append("predictions without reference: " + ", ".join(unmatched["pred_only"]))
    if unmatched["ref_only"]:
        parts.append("references without prediction: " + ", ".join(unmatched["ref_only"]))
    return "; ".join(parts)


def _cases(path: Path, what: str) -> dict[str, Path]:
    """Case id -> file for a NIfTI file or a folder of NIfTI files (not recursive; hidden files skipped)."""
    from pipeline.datalists import case_id
    from pipeline.errors import shown
    from pipeline.fileio import NIFTI_SUFFIXES
    from pipeline.names import check_case_id

    if not path.exists():
        raise Seg3dError(f"{what} path not found: {path}; give a NIfTI file or a folder of NIfTI files")
    if path.is_file():
        return {case_id(path): path}
    if not path.is_dir():
        raise Seg3dError(f"{what} path {path} is neither a regular file nor a folder (a FIFO or device?)")
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(NIFTI_SUFFIXES)
    )
    if not files:
        raise Seg3dError(f"no NIfTI files (.nii.gz, .nii) in {what} folder {path}")
    out: dict[str, Path] = {}
    for file in files:
        case = check_case_id(case_id(file), f"{what} file {shown(file.name, 80)}")
        if case in out:
            raise Seg3dError(
                f"{what} folder {path} has two files for one case: {out[case].name} and {file.name}; keep one",
                case=case,
            )
        out[case] = file
    return out


def _check_geometry(pred, ref, case: str) -> None:
    """Same shape and affine: `seg3d infer` writes a prediction in its input's geometry, so a mismatch means the
    wrong files were paired, and resampling one onto the other would hide that."""
    from pipeline.imageio import AFFINE_TOL

    if pred.array.shape == ref.array.shape and np.allclose(pred.affine, ref.affine, atol=AFFINE_TOL):
        return
    raise Seg3dError(
        f"prediction and reference geometries differ: prediction {pred.describe()}, reference {ref.describe()}; "
        "evaluate a prediction against the reference of the image it was made from",
        case=case,
    )


# -- outputs --------------------------------------------------------------------------------------------------


def check_output(output: Path | str, overwrite: bool = False) -> tuple[Path, Path]:
    """The paths of metrics.csv and metrics.json in `output`; raises if either exists and not `overwrite`.
    Called before any compute, so a forgotten --overwrite costs nothing."""
    from pipeline.fileio import require_output_folder

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise Seg3dError(f"--output {output} is a file; give a folder for metrics.csv and metrics.json")
    paths = output / CSV_NAME, output / JSON_NAME
    existing = [p.name for p in paths if p.exists()]
    if existing and not overwrite:
        raise Seg3dError(f"{' and '.join(existing)} already in {output}; pass --overwrite or choose another --output")
    require_output_folder(output)
    return paths


def write_outputs(report: Report, output: Path | str, overwrite: bool = False) -> tuple[Path, Path]:
    """Write metrics.csv (CSV_COLUMNS, one row per case and class) and metrics.json as a pair: both or neither (a
    full disk while writing the second leaves neither, not a CSV without its JSON)."""
    from pipeline.fileio import atomic_write_all, csv_text

    csv_path, json_path = check_output(output, overwrite)
    table = csv_text(CSV_COLUMNS, ([r[c] for c in CSV_COLUMNS] for r in report.records))
    document = json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n"
    atomic_write_all(
        [(csv_path, lambda tmp: tmp.write_text(table, newline="")), (json_path, lambda tmp: tmp.write_text(document))]
    )
    return csv_path, json_path


@contextlib.contextmanager
def _mlflow_run(run_id: str, tracking_uri: str | None, run_dir: Path) -> Iterator:
    """An existing (training) run, opened before any compute so a wrong id fails at once. Attached, not resumed:
    its status (FINISHED, FAILED, ...) stays what training left."""
    from pipeline.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment="seg3d-evaluate", run_dir=run_dir)
    tracker.check()
    tracker.attach(run_id)
    try:
        yield tracker
    finally:
        tracker.end("FINISHED")


def _log_report(tracker, report: Report, csv_path: Path, json_path: Path) -> None:
    summary = report.summary()
    metrics = {f"eval_{m}_{name}": s[m]["mean"] for name, s in summary.items() for m in METRICS}
    tracker.log_metrics(metrics, step=0)
    tracker.log_artifact(csv_path, "eval")
    tracker.log_artifact(json_path, "eval")
    table = {column: [r[column] for r in report.records] for column in (*CSV_COLUMNS, "status")}
    tracker.log_table(table, "eval/metrics_table.json")


def evaluate(
    pred: Path | str,
    ref: Path | str,
    output: Path | str,
    *,
    labels: Mapping[str, int] | None = None,
    tolerance_mm: float = 2.0,
    allow_missing: bool = False,
    overwrite: bool = False,
    mlflow_run: str | None = None,
    tracking_uri: str | None = None,
) -> Report:
    """`seg3d evaluate`: evaluate_folders, write_outputs and, with `mlflow_run`, log the summary means
    (eval_<metric>_<label>), both files (under eval/) and the per-case table to that existing run. Every check
    that can fail (output files, run id) runs before the compute; nothing is written when anything fails."""
    check_output(output, overwrite)
    with contextlib.ExitStack() as stack:
        tracker = stack.enter_context(_mlflow_run(mlflow_run, tracking_uri, Path(output))) if mlflow_run else None
        report = evaluate_folders(pred, ref, labels, tolerance_mm, allow_missing)
        csv_path, json_path = write_outputs(report, output, overwrite)
        if tracker is not None:
            _log_report(tracker, report, csv_path, json_path)
    return report
