"""Datalists and their integrity check.

A dataset comes as an MSD `dataset.json` (or its folder), a folder with images/ and labels/ (nnU-Net's
`_0000` channel suffix allowed, DICOM series as sub-folders) or a CSV `case,image,label`. `check_dataset`
reads every case and reports every problem with its case id, in the manner of nnU-Net's
`verify_dataset_integrity`, so a user fixes a dataset in one pass rather than one crash at a time.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import Seg3dError
from pipeline.imageio import AFFINE_TOL, Volume, read_volume, to_ras

MSD_PANCREAS_LABELS = {"background": 0, "pancreas": 1, "cancer": 2}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DATASET_FORMS = (
    "an MSD dataset.json (or the folder holding it), a folder with images/ and labels/ sub-folders "
    "(or imagesTr/ and labelsTr/), or a CSV file with the header case,image,label"
)
HU_MIN, HU_MAX = -2048.0, 32767.0  # beyond these no CT scanner stores HU: a wrong rescale or not CT
FOREGROUND_SAMPLE = 10_000  # intensities kept per case for dataset-wide statistics, as nnU-Net does


@dataclass(frozen=True)
class Case:
    case: str
    image: Path  # a NIfTI file or a DICOM series folder
    label: Path | None


@dataclass
class Dataset:
    cases: list[Case]  # labelled training cases
    test: list[Case]  # test cases; label None where none is given
    labels: dict[str, int]  # class name -> value in the label files, background first
    exhaustive: bool  # True: a value not in `labels` is an error; False: a selection, other values are background
    source: Path

    @property
    def class_names(self) -> list[str]:
        return list(self.labels)

    def remap(self, label: np.ndarray, case: str | None = None) -> np.ndarray:
        return remap_labels(label, self.labels, self.exhaustive, case)

    def fingerprint(self) -> str:
        """Identifies the datalist (not the voxels) for experiment tracking: the same cases, files and labels
        give the same fingerprint wherever the dataset folder is moved."""
        base = self.source if self.source.is_dir() else self.source.parent

        def rel(p: Path | None) -> str | None:
            return None if p is None else Path(os.path.relpath(p, base)).as_posix()

        doc = {
            "cases": [[c.case, rel(c.image), rel(c.label)] for c in self.cases],
            "test": [[c.case, rel(c.image), rel(c.label)] for c in self.test],
            "labels": list(self.labels.items()),
            "exhaustive": self.exhaustive,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def remap_labels(label: np.ndarray, labels: dict[str, int], exhaustive: bool, case: str | None = None) -> np.ndarray:
    """Label-file values -> class indices 0..K-1 (uint8), so that a selection such as pancreas=7 of a
    TotalSegmentator map trains as class 1. Exhaustive labels make any other value an error."""
    if label.dtype.kind == "f" and not (np.isfinite(label).all() and np.array_equal(label, np.round(label))):
        raise Seg3dError("label map holds non-integer values; a label map stores whole class ids", case=case)
    unknown = _undeclared_values(label, labels.values()) if exhaustive else []
    if unknown:
        raise Seg3dError(_undeclared_message(unknown, labels), case=case)
    out = np.zeros(label.shape, dtype=np.uint8)
    for index, value in enumerate(labels.values()):
        if value != 0:
            out[label == value] = index
    return out


def parse_labels(spec: str) -> dict[str, int]:
    """ "pancreas=7,liver=5" -> {"background": 0, "pancreas": 7, "liver": 5}: classes 1, 2 in the given order."""
    labels = {"background": 0}
    for item in (s.strip() for s in spec.split(",")):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not re.fullmatch(r"\d+", value):
            raise Seg3dError(
                f"bad label selection {item!r} in {spec!r}; write NAME=VALUE pairs separated by commas, "
                "e.g. --labels pancreas=7,liver=5"
            )
        labels[name] = _add_label(labels, name, int(value), spec)
    if len(labels) == 1:
        raise Seg3dError(f"no classes in --labels {spec!r}; name at least one, e.g. --labels pancreas=7")
    return labels


def load_dataset(path: Path | str, labels: dict[str, int] | None = None) -> Dataset:
    """Build the datalist from any of the accepted forms (see DATASET_FORMS). `labels` selects classes
    (non-exhaustive: other values become background) instead of the declared ones."""
    path = Path(path)
    if not path.exists():
        raise Seg3dError(f"dataset not found: {path}; DATASET may be {DATASET_FORMS}")
    if path.is_dir() and (path / "dataset.json").is_file():
        path = path / "dataset.json"
    if path.is_file() and path.suffix.lower() == ".json":
        cases, test, declared = _load_msd(path)
    elif path.is_file() and path.suffix.lower() == ".csv":
        cases, test, declared = *_load_csv(path), None
    elif path.is_dir() and _subdir(path, "images", "imagesTr") and _subdir(path, "labels", "labelsTr"):
        cases, test, declared = *_load_folders(path), None
    else:
        raise Seg3dError(f"{path} is not a dataset; DATASET may be {DATASET_FORMS}")

    if labels is not None:
        exhaustive, labels = False, _checked_selection(labels)
    else:
        exhaustive, labels = True, declared or dict(MSD_PANCREAS_LABELS)
    if not cases:
        raise Seg3dError(f"no labelled cases in {path}; a dataset needs at least one image with its label")
    duplicates = sorted(name for name, n in Counter(c.case for c in cases + test).items() if n > 1)
    if duplicates:
        raise Seg3dError(f"case ids used more than once in {path}: {', '.join(duplicates)}; make them unique")
    return Dataset(cases=cases, test=test, labels=labels, exhaustive=exhaustive, source=path)


def list_images(path: Path | str) -> list[Case]:
    """Every image of a datalist (an MSD dataset.json or a CSV), labelled or not, for inference: unlike
    load_dataset, a list of images without labels is fine here."""
    path = Path(path)
    if path.is_dir() and (path / "dataset.json").is_file():
        path = path / "dataset.json"
    if path.suffix.lower() == ".json":
        cases, test, _ = _load_msd(path)
    elif path.suffix.lower() == ".csv":
        cases, test = _load_csv(path)
    else:
        raise Seg3dError(f"{path} is not a datalist; give an MSD dataset.json or a CSV with the header case,image")
    duplicates = sorted(name for name, n in Counter(c.case for c in cases + test).items() if n > 1)
    if duplicates:
        raise Seg3dError(f"case ids used more than once in {path}: {', '.join(duplicates)}; make them unique")
    return cases + test


def case_id(path: Path) -> str:
    """The file name without .nii.gz/.nii and without nnU-Net's single-channel suffix _0000."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if name.endswith("_0000") else name


def _add_label(labels: dict[str, int], name: str, value: int, where: str) -> int:
    if name in labels:
        raise Seg3dError(f"class {name!r} named twice in {where}; name each class once")
    if value == 0:
        raise Seg3dError(f"class {name!r} has value 0 in {where}; 0 is background, give the class its label value")
    if value in labels.values():
        raise Seg3dError(f"label value {value} given to two classes in {where}; use one value per class")
    if value > 255:
        raise Seg3dError(f"label value {value} of {name!r} in {where} is above 255; label maps are 8-bit")
    return value


def _checked_selection(labels: dict[str, int]) -> dict[str, int]:
    out = {"background": 0}
    for name, value in labels.items():
        if name == "background" and value == 0:
            continue
        out[name] = _add_label(out, name, int(value), "--labels")
    if len(out) == 1:
        raise Seg3dError("the label selection names no class; select at least one, e.g. --labels pancreas=7")
    return out


def _subdir(root: Path, *names: str) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _resolve(base: Path, p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else base / p


def _load_msd(path: Path) -> tuple[list[Case], list[Case], dict[str, int]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Seg3dError(f"cannot read {path}: {err}; it must be an MSD dataset.json") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("labels"), dict):
        raise Seg3dError(f'{path} has no "labels" mapping; it must be an MSD dataset.json')
    labels = _msd_labels(doc["labels"], path)
    root = path.parent
    if "training" not in doc:
        # nnU-Net v2's dataset.json lists no cases: they are whatever imagesTr/ and labelsTr/ hold.
        if not (_subdir(root, "imagesTr") and _subdir(root, "labelsTr")):
            raise Seg3dError(f'{path} has no "training" list and no imagesTr/ and labelsTr/ beside it')
        cases, test = _load_folders(root)
        return cases, test, labels
    cases = []
    for i, entry in enumerate(doc["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise Seg3dError(f'{path}: training entry {i} must be {{"image": ..., "label": ...}}, got {entry!r}')
        image = _resolve(root, entry["image"])
        cases.append(Case(case_id(image), image, _resolve(root, entry["label"])))
    test = []
    for entry in doc.get("test", []):
        image = _resolve(root, entry["image"] if isinstance(entry, dict) else entry)
        label = entry.get("label") if isinstance(entry, dict) else None
        label = _resolve(root, label) if label else _test_label(root, image)
        test.append(Case(case_id(image), image, label))
    return cases, test, labels


def _test_label(root: Path, image: Path) -> Path | None:
    """MSD withholds test labels; `seg3d synth` and many in-house sets keep them in labelsTs/."""
    name = case_id(image)
    candidates = [root / "labelsTs" / f"{name}{suffix}" for suffix in NIFTI_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def _msd_labels(raw: dict, path: Path) -> dict[str, int]:
    """MSD writes {"0": "background", "1": "pancreas"}; nnU-Net v2 writes {"background": 0, "pancreas": 1}."""
    try:
        pairs = [(int(k), str(v)) for k, v in raw.items()]
    except ValueError:
        try:
            pairs = [(int(v), str(k)) for k, v in raw.items()]
        except (TypeError, ValueError) as err:
            raise Seg3dError(
                f'{path}: "labels" must map values to names ({{"0": "background", "1": "pancreas"}}), got {raw!r}'
            ) from err
    pairs.sort()
    if not pairs or pairs[0][0] != 0:
        raise Seg3dError(f'{path}: "labels" must declare value 0 (background), got {raw!r}')
    labels = {pairs[0][1]: 0}
    for value, name in pairs[1:]:
        labels[name] = _add_label(labels, name, value, str(path))
    return labels


def _nifti_or_series(folder: Path, series_allowed: bool) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):  # macOS "._x.nii.gz" resource forks ship inside the MSD tarballs
            continue
        if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES):
            name = case_id(p)
        elif p.is_dir() and series_allowed:
            name = p.name
        else:
            continue
        if name in found:
            raise Seg3dError(f"two files for case {name} in {folder}: {found[name].name} and {p.name}; keep one")
        found[name] = p
    return found


def _load_folders(root: Path) -> tuple[list[Case], list[Case]]:
    images_dir, labels_dir = _subdir(root, "images", "imagesTr"), _subdir(root, "labels", "labelsTr")
    images = _nifti_or_series(images_dir, series_allowed=True)
    labels = _nifti_or_series(labels_dir, series_allowed=False)
    no_label, no_image = sorted(images.keys() - labels.keys()), sorted(labels.keys() - images.keys())
    if no_label or no_image:
        parts = []
        if no_label:
            parts.append(f"images without a label in {labels_dir.name}/: {', '.join(no_label)}")
        if no_image:
            parts.append(f"labels without an image in {images_dir.name}/: {', '.join(no_image)}")
        raise Seg3dError(
            f"{root}: {'; '.join(parts)}; image and label files must share the case id "
            "(file name without .nii.gz and _0000)"
        )
    cases = [Case(name, images[name], labels[name]) for name in sorted(images)]
    test = []
    if (images_ts := _subdir(root, "imagesTs")) is not None:
        test_labels = _nifti_or_series(root / "labelsTs", False) if (root / "labelsTs").is_dir() else {}
        test = [Case(n, p, test_labels.get(n)) for n, p in _nifti_or_series(images_ts, series_allowed=True).items()]
    return cases, test


def _load_csv(path: Path) -> tuple[list[Case], list[Case]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a byte-order mark
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [(h or "").strip() for h in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise Seg3dError(f"cannot read {path}: {err}") from err
    if not {"case", "image"} <= set(header):
        raise Seg3dError(f"{path} has the header {','.join(header)!r}; it must be case,image,label")
    cases, test = [], []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str | None)}
        if not any(row.values()):
            continue
        if not row.get("case") or not row.get("image"):
            raise Seg3dError(f"{path} line {line}: case and image must not be empty")
        image = _resolve(path.parent, row["image"])
        label = _resolve(path.parent, row["label"]) if row.get("label") else None
        (cases if label else test).append(Case(row["case"], image, label))
    return cases, test


# ----------------------------------------------------------------------------------------------------------
# Integrity check


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


def check_dataset(dataset: Dataset, include_test: bool = True) -> Report:
    """Read every case and report every problem, each with its case id; nothing stops at the first."""
    findings: list[Finding] = []
    infos: list[CaseInfo] = []
    for case in dataset.cases + (dataset.test if include_test else []):
        info = _check_case(dataset, case, findings)
        if info is not None:
            infos.append(info)
    return Report(findings=findings, infos=infos)


def _geometry(v: Volume) -> str:
    sp = " x ".join(f"{s:.4g}" for s in v.spacing)
    origin = ", ".join(f"{o:.2f}" for o in v.affine[:3, 3])
    return f"shape {tuple(v.array.shape)}, spacing {sp} mm, origin ({origin}) mm RAS, axes {v.axcodes}"


def _undeclared_values(label: np.ndarray, declared) -> list:
    known = np.isin(label, np.fromiter(declared, dtype=np.float64))
    return [] if known.all() else np.unique(label[~known]).tolist()


def _undeclared_message(values: list, labels: dict[str, int]) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:20]) + (f" and {len(values) - 20} more" if len(values) > 20 else "")
    declared = ", ".join(f"{k}={v}" for k, v in labels.items())
    return (
        f"label values {shown} are not declared ({declared}); fix the label files or the dataset's labels, "
        "or pass --labels NAME=VALUE to select classes and treat every other value as background"
    )


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
        hu_range = _check_intensities(image.array, report)
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
                f"image {_geometry(image)}; label {_geometry(label)}; the label must lie on the image's voxel grid "
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


def _check_intensities(array: np.ndarray, report) -> tuple[float, float]:
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
        unknown = _undeclared_values(label, dataset.labels.values())
        if unknown:
            report("error", _undeclared_message(unknown, dataset.labels))
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
