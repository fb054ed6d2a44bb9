"""The run manifest: one JSON per case, written last beside the mask, saying how each output was made.

It holds the versions (seg3d, torch, MONAI, Python, NumPy, and the DICOM libraries when a DICOM output was
written), the model (its name, its folder's name and a SHA-256 over its files, so that two runs can be shown to
have used the same weights), the device and precision, the seconds per stage, the input's geometry (shape, voxel
size, orientation, affine, and for a DICOM series its slice count and modality) and every output with its size and
SHA-256. It names the case by its case id only: no patient name, id or birth date, and no input path (hospitals
name folders after patients).
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.fileio import atomic_write_text, sha256_file

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # the model as outputs name it (pipeline.ensemble.model_name)
    folder: str  # the bundle's or ensemble's folder name, not its path
    sha256: str  # over the files of the bundle (or of every member), by relative name and content
    members: int  # 0 for a single bundle


@dataclass(frozen=True)
class RunInfo:
    """What every case of one `seg3d infer` run shares in its manifest."""

    model: ModelIdentity
    device: str  # e.g. "cpu", "cuda:0"
    precision: str  # the autocast type the network ran in: "float32", "bfloat16", "float16"
    settings: dict  # tta, overlap, postprocess, engine: what changes the result besides the model


def model_identity(model, name: str) -> ModelIdentity:
    """`model`: a Bundle or an Ensemble (pipeline.ensemble), loaded from folders that still exist."""
    bundles = list(model.members.values()) if hasattr(model, "members") else [model]
    digest = hashlib.sha256()
    for bundle in bundles:
        folder = Path(bundle.path)
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(folder).as_posix()}\0{sha256_file(file)}\n".encode())
    path = getattr(model, "path", None) or bundles[0].path
    return ModelIdentity(
        name=name,
        folder=Path(path).name,
        sha256=digest.hexdigest(),
        members=len(bundles) if hasattr(model, "members") else 0,
    )


def versions(dicom: bool) -> dict[str, str]:
    names = ["seg3d", "torch", "monai", "numpy", "nibabel", "SimpleITK"]
    if dicom:
        names += ["pydicom", "highdicom", "rt-utils", "opencv-python"]
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def input_geometry(shape: tuple[int, ...], affine: np.ndarray, *, series: tuple[str, ...] | None) -> dict:
    """The voxel grid of the input as read; `series`: the files of a DICOM series (None for NIfTI)."""
    geometry = {
        "kind": "DICOM series" if series is not None else "NIfTI",
        "shape": [int(n) for n in shape],
        "spacing_mm": [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "orientation": "".join(nib.aff2axcodes(affine)),
        "affine_ras_mm": [[round(float(v), 6) for v in row] for row in affine],
    }
    if series is not None:
        import pydicom

        geometry["slices"] = len(series)
        try:
            first = pydicom.dcmread(series[0], stop_before_pixels=True, specific_tags=["Modality"])
            geometry["modality"] = str(first.get("Modality", "") or "")
        except Exception:  # the series was read a moment ago; a file gone since is no reason to lose the case
            geometry["modality"] = ""
    return geometry


def write_manifest(
    path: Path,
    *,
    case: str,
    run: RunInfo,
    timings: dict[str, float],
    geometry: dict,
    outputs: list[Path],
) -> Path:
    """Every path of `outputs` exists; each is listed by its name relative to the manifest's folder."""
    document = {
        "manifest_format": MANIFEST_FORMAT,
        "case": case,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(dicom=geometry.get("kind") == "DICOM series"),
        "model": {
            "name": run.model.name,
            "folder": run.model.folder,
            "sha256": run.model.sha256,
            "members": run.model.members,
        },
        "device": run.device,
        "precision": run.precision,
        "settings": run.settings,
        "timings_s": {stage: round(float(s), 4) for stage, s in timings.items()},
        "input": geometry,
        "outputs": [
            {"file": _relative(p, path.parent), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in outputs
        ],
    }
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    return path


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.name
