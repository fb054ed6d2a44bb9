"""Small datasets written on disk for the datalist and integrity tests: a CT-like volume with an organ, saved as
NIfTI in images/ and labels/ folders."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.synthetic import synthesize

SHAPE = (24, 20, 12)
AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, -8.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])


def phantom_dataset(root: Path) -> Path:
    """Three training cases (RAS, LPS, RAS) and one test case (LAS) with its label in labelsTs/."""
    synthesize(root, cases=3, seed=0, test_cases=1)
    return root


def ct(seed: int = 0) -> np.ndarray:
    """A small CT-like volume in HU: air around a soft-tissue body."""
    rng = np.random.default_rng(seed)
    image = np.full(SHAPE, -1000, dtype=np.int16)
    image[3:-3, 3:-3, :] = 40 + rng.integers(-20, 20, (SHAPE[0] - 6, SHAPE[1] - 6, SHAPE[2]), dtype=np.int16)
    return image


def organ() -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[8:14, 7:12, 3:8] = 1
    label[10:12, 8:10, 4:6] = 2
    return label


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def write_case(root: Path, case: str, image=None, label=None, image_affine=AFFINE, label_affine=AFFINE) -> None:
    save(root / "images" / f"{case}.nii.gz", ct() if image is None else image, image_affine)
    save(root / "labels" / f"{case}.nii.gz", organ() if label is None else label, label_affine)


def errors(report, case: str) -> list[str]:
    return [f.message for f in report.findings if f.case == case and f.level == "error"]
