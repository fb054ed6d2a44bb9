"""Datalists: which cases a dataset holds, where their files are, what their labels mean (the split: splits.py).

A dataset comes as an MSD `dataset.json` (or its folder), a folder with images/ and labels/ (nnU-Net's `_0000`
channel suffix allowed, DICOM series as sub-folders) or a CSV `case,image,label`. Reading the voxels and checking
them is `pipeline.integrity`'s job; this module only lists."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import Seg3dError, one_line, shown
from pipeline.fileio import NIFTI_SUFFIXES, inside, is_nifti, nifti_stem
from pipeline.names import check_case_id, check_class_name

MSD_PANCREAS_LABELS = {"background": 0, "pancreas": 1, "cancer": 2}
DATASET_FORMS = (
    "an MSD dataset.json (or the folder holding it), a folder with images/ and labels/ sub-folders "
    "(or imagesTr/ and labelsTr/), or a CSV file with the header case,image,label"
)


@dataclass(frozen=True)
class Case:
    case: str  # a safe name (check_case_id): outputs are named after it
    image: Path  # a NIfTI file or a DICOM series folder
    label: Path | None
    # Where the case's decoys are (uint8 mask, 1 = decoy voxel, the image's geometry): pancreas-like tissue where no
    # pancreas belongs, as `seg3d synth` writes; read only to count context errors (pipeline/study/decoys.py).
    decoy: Path | None = None

    def __post_init__(self) -> None:
        check_case_id(self.case, f"image {shown(str(self.image), 80)}")


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
    unknown = undeclared_values(label, labels.values()) if exhaustive else []
    if unknown:
        raise Seg3dError(undeclared_message(unknown, labels), case=case)
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
    name = nifti_stem(path)
    return name[:-5] if name.endswith("_0000") else name


def _add_label(labels: dict[str, int], name: str, value: int, where: str) -> int:
    check_class_name(name, where)
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


MAX_DATALIST_BYTES = 64 * 1024 * 1024  # a datalist of 100,000 cases is a few MB; more is not a datalist


def _read_bounded(path: Path) -> str:
    """The text of a datalist, refused before reading when it is not a regular file or absurdly large."""
    if not path.is_file():
        raise Seg3dError(f"{path} is not a regular file; a datalist is a JSON or CSV file")
    size = path.stat().st_size
    if size > MAX_DATALIST_BYTES:
        raise Seg3dError(
            f"{path} is {size:,} bytes; a datalist is at most {MAX_DATALIST_BYTES:,}: is it the right file?"
        )
    return path.read_text(encoding="utf-8-sig")


def _subdir(root: Path, *names: str) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _resolve(base: Path, p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else base / p


def _load_msd(path: Path) -> tuple[list[Case], list[Case], dict[str, int]]:
    try:
        doc = json.loads(_read_bounded(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise Seg3dError(f"cannot read {path}: {one_line(err, 200)}; it must be an MSD dataset.json") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("labels"), dict):
        raise Seg3dError(f'{path} has no "labels" mapping; it must be an MSD dataset.json')
    for key, kind in (("training", list), ("test", list)):
        if key in doc and not isinstance(doc[key], kind):
            raise Seg3dError(f'{path}: "{key}" must be a list of cases, got {type(doc[key]).__name__}')
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
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) and entry[k] for k in ("image", "label")
        ):
            raise Seg3dError(
                f'{path}: training entry {i} must be {{"image": "path", "label": "path"}}, got {shown(str(entry))}'
            )
        image = _resolve(root, entry["image"])
        decoy = _decoy(root, entry, f"{path}: training entry {i}")
        cases.append(Case(case_id(image), image, _resolve(root, entry["label"]), decoy=decoy))
    test = []
    for i, entry in enumerate(doc.get("test", [])):
        image_path = entry.get("image") if isinstance(entry, dict) else entry
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(image_path, str) or not image_path or not isinstance(label, str | None):
            raise Seg3dError(
                f'{path}: test entry {i} must be "path" or {{"image": "path", "label": "path"}},'
                f" got {shown(str(entry))}"
            )
        image = _resolve(root, image_path)
        label = _resolve(root, label) if label else _test_label(root, image)
        where = f"{path}: test entry {i}"
        has_decoy = isinstance(entry, dict) and "decoy" in entry
        decoy = _decoy(root, entry, where) if has_decoy else _test_decoy(root, image, where)
        test.append(Case(case_id(image), image, label, decoy=decoy))
    return cases, test, labels


def _test_label(root: Path, image: Path) -> Path | None:
    """MSD withholds test labels; `seg3d synth` and many in-house sets keep them in labelsTs/."""
    name = case_id(image)
    candidates = [root / "labelsTs" / f"{name}{suffix}" for suffix in NIFTI_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def _decoy(root: Path, entry: dict, where: str) -> Path | None:
    """An entry's "decoy" mask, which must be a file inside the dataset folder: it is found from the datalist alone,
    so a hostile list must not make the study read (and report on) a file elsewhere."""
    if "decoy" not in entry:
        return None
    raw = entry["decoy"]
    if not isinstance(raw, str) or not raw:
        raise Seg3dError(f'{where}: "decoy" must be a path to the case\'s decoy mask, got {shown(raw)}')
    return _checked_decoy(root, _resolve(root, raw), where)


def _test_decoy(root: Path, image: Path, where: str) -> Path | None:
    """A test entry that names no "decoy" has its mask, if any, in decoysTs/ (as `seg3d synth` writes), found by
    name as its label in labelsTs/ is."""
    name = case_id(image)
    found = next((c for c in (root / "decoysTs" / f"{name}{s}" for s in NIFTI_SUFFIXES) if c.exists()), None)
    return None if found is None else _checked_decoy(root, found, where)


def _checked_decoy(root: Path, decoy: Path, where: str) -> Path:
    if not inside(root, decoy):
        raise Seg3dError(
            f"{where}: decoy mask {shown(str(decoy), 200)} resolves outside the dataset folder {root}; keep decoy"
            ' masks inside it (as decoysTr/) or remove the "decoy" key'
        )
    if not decoy.is_file():
        raise Seg3dError(
            f'{where}: decoy mask {shown(str(decoy), 200)} not found (or not a file); fix the "decoy" path or run'
            " seg3d synth again"
        )
    return decoy


def _msd_labels(raw: dict, path: Path) -> dict[str, int]:
    """MSD writes {"0": "background", "1": "pancreas"}; nnU-Net v2 writes {"background": 0, "pancreas": 1}."""
    expected = f'"labels" must map values to names ({{"0": "background", "1": "pancreas"}}), got {shown(str(raw))}'
    try:
        pairs = [(int(k), v) for k, v in raw.items()]
    except (TypeError, ValueError):
        try:
            pairs = [(int(v), k) for k, v in raw.items() if not isinstance(v, bool | float)]
        except (TypeError, ValueError, OverflowError):
            raise Seg3dError(f"{path}: {expected}") from None
    if any(not isinstance(name, str) for _, name in pairs) or len(pairs) != len(raw):
        raise Seg3dError(f"{path}: {expected}")
    pairs.sort()
    if not pairs or pairs[0][0] != 0:
        raise Seg3dError(f'{path}: "labels" must declare value 0 (background), got {shown(str(raw))}')
    if any(not 0 <= value <= 255 for value, _ in pairs):
        raise Seg3dError(f'{path}: "labels" values must be 0..255 (label maps are 8-bit), got {shown(str(raw))}')
    labels = {pairs[0][1]: 0}
    for value, name in pairs[1:]:
        labels[name] = _add_label(labels, name, value, str(path))
    return labels


def _nifti_or_series(folder: Path, series_allowed: bool) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):  # macOS "._x.nii.gz" resource forks ship inside the MSD tarballs
            continue
        if p.is_file() and is_nifti(p):
            name = case_id(p)
        elif p.is_dir() and series_allowed:
            name = p.name
        else:
            continue
        if name in found:
            raise Seg3dError(
                f"two files for case {shown(name)} in {folder}: {shown(found[name].name)} and {shown(p.name)} (both"
                " give that case id, the file name without .nii.gz, .nii and _0000); keep one",
            )
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
        # utf-8-sig (in _read_bounded): spreadsheets write a byte-order mark
        reader = csv.DictReader(io.StringIO(_read_bounded(path), newline=""))
        rows = list(reader)
        header = [(h or "").strip() for h in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise Seg3dError(f"cannot read {path}: {one_line(err, 200)}") from None
    if not {"case", "image"} <= set(header):
        raise Seg3dError(f"{path} has the header {shown(','.join(header))}; it must be case,image,label")
    cases, test = [], []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str | None)}
        if not any(row.values()):
            continue
        if not row.get("case") or not row.get("image"):
            raise Seg3dError(f"{path} line {line}: case and image must not be empty")
        image = _resolve(path.parent, row["image"])
        label = _resolve(path.parent, row["label"]) if row.get("label") else None
        try:
            case = Case(row["case"], image, label)
        except Seg3dError as err:
            raise Seg3dError(f"{path} line {line}: {err}") from None
        (cases if label else test).append(case)
    return cases, test


def undeclared_values(label: np.ndarray, declared) -> list:
    known = np.isin(label, np.fromiter(declared, dtype=np.float64))
    return [] if known.all() else np.unique(label[~known]).tolist()


def undeclared_message(values: list, labels: dict[str, int]) -> str:
    listed = ", ".join(f"{v:g}" for v in values[:20]) + (f" and {len(values) - 20} more" if len(values) > 20 else "")
    declared = ", ".join(f"{k}={v}" for k, v in labels.items())
    return (
        f"label values {listed} are not declared ({declared}); fix the label files or the dataset's labels, "
        "or pass --labels NAME=VALUE to select classes and treat every other value as background"
    )
