"""`seg3d infer --statistics`: the numbers a clinician reads off a segmentation, per structure and case.

For every foreground class of the model: the voxel count and the volume in ml (voxels x the voxel's volume from the
affine), the CT values inside it in HU (mean, standard deviation over the voxels, median, minimum, maximum), and
the bounding box of its voxel centres in patient coordinates (RAS+ mm, the NIfTI convention; a DICOM viewer shows
LPS: x and y negated), with its size. A class the model did not find is a row with 0 voxels and empty HU values.
TotalSegmentator's statistics give the volume and mean HU; these add the spread, the median and the extent.

Written beside the mask as `<case>_statistics.json` and `<case>_statistics.csv`, and, for a folder --output, one
table for all its cases (`statistics.csv`), gathered from the per-case JSON files, so that a batch run in shards or
resumed later still gets one complete table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.fileio import atomic_write_csv, atomic_write_text

COLUMNS = [
    "case",
    "structure",
    "label",
    "voxels",
    "volume_ml",
    "hu_mean",
    "hu_std",
    "hu_median",
    "hu_min",
    "hu_max",
    "bbox_min_x_mm",
    "bbox_min_y_mm",
    "bbox_min_z_mm",
    "bbox_max_x_mm",
    "bbox_max_y_mm",
    "bbox_max_z_mm",
    "extent_x_mm",
    "extent_y_mm",
    "extent_z_mm",
]


def structure_statistics(
    image: np.ndarray, labels: np.ndarray, affine: np.ndarray, *, names: list[str], values: list[int]
) -> list[dict]:
    """One row per foreground class (index >= 1 of `names`): `labels` holds class indices on `image`'s voxel grid,
    `values` are the label values written to the mask (the `label` column)."""
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} are not on one grid")
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    flat = labels.ravel()
    rows = []
    for index in range(1, len(names)):
        where = np.flatnonzero(flat == index)  # indices of the structure's voxels only: a structure, not the scan
        row: dict = {"structure": names[index], "label": int(values[index]), "voxels": int(where.size)}
        row["volume_ml"] = round(where.size * voxel_ml, 4)
        if where.size:
            index_arrays = np.unravel_index(where, labels.shape)
            hu = image[index_arrays].astype(np.float64)  # by index: no C-ordered copy of a Fortran-ordered scan
            row.update(
                hu_mean=round(float(hu.mean()), 2),
                hu_std=round(float(hu.std()), 2),
                hu_median=round(float(np.median(hu)), 2),
                hu_min=round(float(hu.min()), 2),
                hu_max=round(float(hu.max()), 2),
            )
            ijk = np.stack(index_arrays, axis=1).astype(np.float64)  # (N, 3) voxel indices
            xyz = ijk @ affine[:3, :3].T + affine[:3, 3]  # (N, 3) RAS mm of the voxel centres
            low, high = xyz.min(axis=0), xyz.max(axis=0)
            for axis, lo, hi in zip("xyz", low, high):
                row[f"bbox_min_{axis}_mm"], row[f"bbox_max_{axis}_mm"] = round(float(lo), 2), round(float(hi), 2)
                row[f"extent_{axis}_mm"] = round(float(hi - lo), 2)
        rows.append({k: row.get(k) for k in COLUMNS if k != "case"})
    return rows


def write_case_statistics(rows: list[dict], *, case: str, json_path: Path, csv_path: Path) -> None:
    """The rows as JSON ({"case", "units", "structures"}) and as CSV (one row per structure), atomically."""
    document = {
        "case": case,
        "units": {"volume": "ml", "hu": "Hounsfield units", "bbox": "mm, RAS+ (x left->right, y post.->ant., z up)"},
        "structures": rows,
    }
    atomic_write_text(json_path, json.dumps(document, indent=2) + "\n")
    atomic_write_csv(csv_path, COLUMNS, ([case, *(_cell(r[k]) for k in COLUMNS[1:])] for r in rows))


def write_batch_table(json_paths: list[Path], out: Path) -> int:
    """One CSV of every structure of every case whose statistics JSON exists; returns the number of cases."""
    rows, cases = [], 0
    for path in json_paths:
        if not path.is_file():
            continue
        document = json.loads(path.read_text())
        cases += 1
        rows += [[document["case"], *(_cell(r.get(k)) for k in COLUMNS[1:])] for r in document["structures"]]
    atomic_write_csv(out, COLUMNS, rows)
    return cases


def _cell(value):
    return "" if value is None else value
