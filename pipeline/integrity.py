"""The integrity check of a dataset: every case read, every problem reported with its case id.

In the manner of nnU-Net's `verify_dataset_integrity`, `check_dataset` does not stop at the first problem, so a
user fixes a dataset in one pass rather than one crash at a time; it also gathers the dataset-wide numbers
(spacing, sizes, foreground intensities) that decide the preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.datalists import Case, Dataset, undeclared_message, undeclared_values
from pipeline.errors import Seg3dError
from pipeline.imageio import AFFINE_TOL, Volume, read_volume, to_ras

HU_MIN, HU_MAX = -2048.0, 32767.0  # beyond these no CT scanner stores HU: a wrong rescale or not CT
FOREGROUND_SAMPLE = 10_000  # intensities kept per case for dataset-wide statistics, as nnU-Net does


@dataclass
class Finding:
    level: str  # "error" | "warning" | "info"
    case: str
    message: str


@dataclass
class CaseInfo:
    case: str
    shape_ras: tuple[int, int, int]
    spacing_ras: tuple[float, float, float]
    orientation: str  # axis codes as stored, e.g. "LPS"
    hu_range: tuple[float, float]
    label_voxels: dict[str, int]  # per class name, after remap; empty without a label
    foreground_sample: np.ndarray = field(repr=False)  # float32, <= FOREGROUND_SAMPLE intensities under the label


_TAGS = {"error": "ERROR", "warning": "WARN", "info": "INFO"}


@dataclass
class Report:
    findings: list[Finding]
    infos: list[CaseInfo]

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def summary(self) -> dict:
        """Dataset-wide numbers in RAS, the way nnU-Net's fingerprint reports them: they decide target
        spacing, patch size and intensity normalisation."""
        counts = {level: sum(f.level == level for f in self.findings) for level in _TAGS}
        out: dict = {
            "cases": len({i.case for i in self.infos} | {f.case for f in self.findings}),
            "readable": len(self.infos),
            "errors": counts["error"],
            "warnings": counts["warning"],
            "notes": counts["info"],
            "median_spacing": None,
            "size_min": None,
            "size_max": None,
            "label_voxels": {},
            "foreground_hu": None,
        }
        if self.infos:
            shapes = np.array([i.shape_ras for i in self.infos])
            out["median_spacing"] = tuple(float(s) for s in np.median([i.spacing_ras for i in self.infos], axis=0))
            out["size_min"] = tuple(int(s) for s in shapes.min(0))
            out["size_max"] = tuple(int(s) for s in shapes.max(0))
            for info in self.infos:
                for name, n in info.label_voxels.items():
                    out["label_voxels"][name] = out["label_voxels"].get(name, 0) + n
        sample = np.concatenate([i.foreground_sample for i in self.infos]) if self.infos else np.zeros(0)
        if sample.size:
            p = np.percentile(sample, [0.5, 50, 99.5])
            out["foreground_hu"] = {
                "mean": float(sample.mean()),
                "std": float(sample.std()),
                "p0.5": float(p[0]),
                "median": float(p[1]),
                "p99.5": float(p[2]),
            }
        return out

    def format(self) -> str:
        lines = [f"{_TAGS[f.level]:<5}  {f.case}: {f.message}" for f in self.findings]
        s = self.summary()
        if lines:
            lines.append("")
        lines.append(f"cases: {s['cases']} ({s['readable']} readable)")
        if s["median_spacing"]:
            lines.append("median spacing (RAS, mm): " + " x ".join(f"{v:.3g}" for v in s["median_spacing"]))
            lines.append(
                "size range (RAS, voxels): "
                + " x ".join(f"{lo}..{hi}" if lo != hi else f"{lo}" for lo, hi in zip(s["size_min"], s["size_max"]))
            )
        if s["label_voxels"]:
            lines.append("voxels per label: " + ", ".join(f"{k} {v:,}" for k, v in s["label_voxels"].items()))
        if s["foreground_hu"]:
            hu = s["foreground_hu"]
            lines.append(
                f"foreground HU: mean {hu['mean']:.1f}, sd {hu['std']:.1f}, median {hu['median']:.1f}, "
                f"0.5-99.5% {hu['p0.5']:.1f}..{hu['p99.5']:.1f}"
            )
        verdict = "usable" if self.ok else "NOT usable"
        lines.append(f"{verdict}: {s['errors']} errors, {s['warnings']} warnings, {s['notes']} notes")
        return "\n".join(lines)


def training_dataset(data: Path, labels: dict[str, int] | None) -> tuple[Dataset, Report]:
    """The dataset a training reads (`labels`: a config's data.labels selection, background added) and check-data's
    report of it; refused in one line, before any compute, when check-data finds an error in a training case."""
    from pipeline.datalists import load_dataset

    if labels:
        labels = labels if "background" in labels else {"background": 0, **labels}
    dataset = load_dataset(data, labels=dict(labels) if labels else None)
    report = check_dataset(dataset, include_test=False)
    if not report.ok:
        errors = [f for f in report.findings if f.level == "error"]
        raise Seg3dError(
            f"dataset {data} has {len(errors)} problem(s), first: {errors[0].case}: {errors[0].message}; "
            f"run `seg3d check-data {data}` for all of them"
        )
    return dataset, report


def check_dataset(dataset: Dataset, include_test: bool = True) -> Report:
    """Read every case and report every problem, each with its case id; nothing stops at the first."""
    findings: list[Finding] = []
    infos: list[CaseInfo] = []
    for case in dataset.cases + (dataset.test if include_test else []):
        info = _check_case(dataset, case, findings)
        if info is not None:
            infos.append(info)
    return Report(findings=findings, infos=infos)


def _check_case(dataset: Dataset, case: Case, findings: list[Finding]) -> CaseInfo | None:
    cid = case.case

    def report(level: str, message: str) -> None:
        findings.append(Finding(level, cid, message))

    def read(path: Path, kind: str) -> Volume | None:
        try:
            volume = read_volume(path, case=cid, kind=kind)
        except Seg3dError as err:
            report("error", str(err).removeprefix(f"{cid}: "))
            return None
        for note in volume.notes:
            report(getattr(note, "level", "info"), str(note))
        return volume

    image = read(case.image, "image")
    label = read(case.label, "label") if case.label is not None else None

    hu_range = (float("nan"), float("nan"))
    if image is not None:
        hu_range = check_intensities(image.array, report)
        if image.axcodes != "RAS":
            report("info", f"image stored {image.axcodes}; reoriented to RAS for training (no resampling)")
        if min(image.array.shape) < 2:
            report("warning", f"image has a single slice along an axis, shape {image.array.shape}")

    remapped = None
    if label is not None:
        remapped = _check_label(dataset, label.array, report)
    if image is None:
        return None

    image_ras = to_ras(image)
    label_voxels: dict[str, int] = {}
    sample = np.zeros(0, dtype=np.float32)
    if label is not None:
        label_ras = to_ras(label)
        differs = _grid_differences(image, label, image_ras, label_ras)
        if differs:
            report(
                "error",
                f"image and label grids differ ({', '.join(differs)}) after reorientation to RAS: "
                f"image {image.describe()}; label {label.describe()}; the label must lie on the image's voxel grid "
                "(resample it with nearest neighbour onto the image, or fix the header that is wrong)",
            )
        elif remapped is not None:
            remapped_ras = to_ras(Volume(remapped, label.affine)).array
            counts = np.bincount(remapped_ras.ravel(), minlength=len(dataset.labels))
            label_voxels = {name: int(n) for name, n in zip(dataset.class_names, counts)}
            sample = _foreground_sample(image_ras.array, remapped_ras)
    return CaseInfo(
        case=cid,
        shape_ras=tuple(int(n) for n in image_ras.array.shape),
        spacing_ras=tuple(round(float(s), 6) for s in image_ras.spacing),
        orientation=image.axcodes,
        hu_range=hu_range,
        label_voxels=label_voxels,
        foreground_sample=sample,
    )


def check_intensities(array: np.ndarray, report: Callable[[str, str], None]) -> tuple[float, float]:
    """The one HU rule, of check-data and of inference alike: `report(level, message)` for each finding ("error":
    this is not a CT in HU, refuse it; "warning": usable, but say so). Returns the finite range."""
    finite = np.isfinite(array)
    if not finite.all():
        n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        report("error", f"image has {n_nan} NaN and {n_inf} Inf voxels; re-export it from the original scan")
        if not finite.any():
            return float("nan"), float("nan")
        array = array[finite]
    lo, hi = float(array.min()), float(array.max())
    if lo > -100 and hi < 100:
        report(
            "error",
            f"intensities {lo:.3g}..{hi:.3g} look normalised, not HU (CT has air near -1000); "
            "give the original HU image: the pipeline normalises itself",
        )
    elif lo < HU_MIN or hi > HU_MAX:
        report(
            "error",
            f"intensities {lo:.6g}..{hi:.6g} lie beyond [{HU_MIN:g}, {HU_MAX:g}], which no CT stores as HU; "
            "check the rescale slope/intercept or that this is CT",
        )
    elif lo >= 0:
        # Every CT of a body holds air (-1000 HU) or at least fat (-100 HU); raw scanner values (0..4095) and MR
        # intensities are never negative.
        report(
            "error",
            f"intensities {lo:.6g}..{hi:.6g} hold no negative value, so no air or fat: raw scanner values without "
            "the rescale, or not a CT (MR?); give the CT in HU (HU = stored value x RescaleSlope + RescaleIntercept)",
        )
    elif lo > -900:
        report("warning", f"no air below -900 HU (range {lo:.0f}..{hi:.0f}); a tight crop, or not HU?")
    return lo, hi


def _check_label(dataset: Dataset, label: np.ndarray, report) -> np.ndarray | None:
    """Value checks on the label alone, so they are reported even when the image is unreadable."""
    if np.issubdtype(label.dtype, np.floating):
        bad = ~np.isfinite(label) | (label != np.round(label))
        if bad.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(label[bad])[:5])
            report(
                "error",
                f"label has {int(bad.sum())} non-integer voxels (e.g. {examples}); a label map holds class values "
                "only: was it resampled with linear interpolation? Use nearest neighbour",
            )
            return None
    if dataset.exhaustive:
        unknown = undeclared_values(label, dataset.labels.values())
        if unknown:
            report("error", undeclared_message(unknown, dataset.labels))
            return None
    remapped = dataset.remap(label)
    if not remapped.any():
        selected = ", ".join(f"{k}={v}" for k, v in dataset.labels.items() if v)
        report("warning", f"no foreground: the label holds background only (classes {selected})")
    return remapped


def _grid_differences(image: Volume, label: Volume, image_ras: Volume, label_ras: Volume) -> list[str]:
    """What differs between the two voxel grids once both are in RAS; empty when they coincide, whatever
    orientation each file is stored in."""
    if image_ras.array.shape == label_ras.array.shape and np.allclose(
        image_ras.affine, label_ras.affine, atol=AFFINE_TOL
    ):
        return []
    directions = [v.affine[:3, :3] / np.linalg.norm(v.affine[:3, :3], axis=0) for v in (image_ras, label_ras)]
    checks = {
        "shape": image_ras.array.shape != label_ras.array.shape,
        "spacing": not np.allclose(image_ras.spacing, label_ras.spacing, atol=AFFINE_TOL),
        "direction": image.axcodes != label.axcodes or not np.allclose(*directions, atol=AFFINE_TOL),
        "origin": not np.allclose(image_ras.affine[:3, 3], label_ras.affine[:3, 3], atol=AFFINE_TOL),
    }
    return [name for name, differs in checks.items() if differs]


def _foreground_sample(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    values = image[label > 0]
    if values.size > FOREGROUND_SAMPLE:
        rng = np.random.default_rng(0)
        values = values[np.sort(rng.choice(values.size, FOREGROUND_SAMPLE, replace=False))]
    return values.astype(np.float32)
