"""What `seg3d infer` writes for each case, planned before any compute: the paths, checked to lie inside --output,
distinct between cases and never onto an input; the room they need; and the clean-up of a case that failed.

Per case: the label map, and beside it what was asked for: class probabilities, a DICOM SEG, an RTSTRUCT, the
statistics (JSON and CSV), a preview PNG, an overlay (overlays/), and always the run manifest, written last, so that a
case whose manifest exists is a finished one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datalists import Case
from pipeline.errors import Seg3dError, shown
from pipeline.fileio import check_inside, is_nifti, nifti_stem, remove_temporaries, require_output_folder
from pipeline.limits import GZIP_MAX_RATIO

BATCH_STATISTICS = "statistics.csv"  # in a folder --output: one table for all its cases


@dataclass
class CaseOutputs:
    labels: Path
    probabilities: Path | None = None
    dicom_seg: Path | None = None
    overlay: Path | None = None
    rtstruct: Path | None = None
    statistics: Path | None = None  # JSON; statistics_csv beside it
    statistics_csv: Path | None = None
    preview: Path | None = None
    manifest: Path | None = None

    def all(self) -> list[Path]:
        paths = (
            self.labels,
            self.probabilities,
            self.dicom_seg,
            self.rtstruct,
            self.statistics,
            self.statistics_csv,
            self.preview,
            self.overlay,
            self.manifest,
        )
        return [p for p in paths if p is not None]


def plan_outputs(
    cases: list[Case],
    output: Path,
    *,
    save_probabilities: bool,
    dicom_seg: bool,
    overlays: bool,
    rtstruct: bool = False,
    statistics: bool = False,
    preview: bool = False,
    manifest: bool = True,
) -> dict[str, CaseOutputs]:
    """Output paths per case: OUTPUT itself for one case and a .nii.gz or .nii OUTPUT, else OUTPUT/<case>.nii.gz,
    with the extras beside the label map. Every path is checked to lie inside the output folder (case ids are data),
    and two cases that would write one file are refused."""
    single = len(cases) == 1 and is_nifti(output)
    root = output.parent if single else output
    plans: dict[str, CaseOutputs] = {}
    owner: dict[Path, str] = {}
    if statistics and not single:
        owner[check_inside(root, output / BATCH_STATISTICS).resolve()] = "the batch table"
    for case in cases:
        if single:
            stem, folder, labels = nifti_stem(output), output.parent, output
        else:
            stem, folder = case.case, output
            labels = folder / f"{stem}.nii.gz"
        dicom = case.image.is_dir()
        plan = CaseOutputs(
            labels=labels,
            probabilities=folder / f"{stem}_probabilities.npz" if save_probabilities else None,
            dicom_seg=folder / f"{stem}_seg.dcm" if dicom_seg and dicom else None,
            overlay=folder / "overlays" / f"{stem}.png" if overlays else None,
            rtstruct=folder / f"{stem}_rtstruct.dcm" if rtstruct and dicom else None,
            statistics=folder / f"{stem}_statistics.json" if statistics else None,
            statistics_csv=folder / f"{stem}_statistics.csv" if statistics else None,
            preview=folder / f"{stem}_preview.png" if preview else None,
            manifest=folder / f"{stem}_manifest.json" if manifest else None,
        )
        for path in plan.all():
            check_inside(root, path)
            key = path.resolve()
            if key in owner:
                raise Seg3dError(
                    f"cases {shown(owner[key])} and {shown(case.case)} would both write {path}; give the inputs"
                    " distinct names"
                )
            owner[key] = case.case
        plans[case.case] = plan
    return plans


def refuse_rtstruct_without_dicom(cases: list[Case]) -> None:
    """An RT Structure Set references the slices of a DICOM series; a NIfTI input has none."""
    nifti = [c for c in cases if not c.image.is_dir()]
    if nifti:
        more = f" (and {len(nifti) - 1} more)" if len(nifti) > 1 else ""
        raise Seg3dError(
            f"--dicom-rtstruct needs a DICOM series, and {shown(nifti[0].case)}{more} is a NIfTI file: an RTSTRUCT "
            "references the series' slices; give the DICOM series (a folder or a zip), or drop --dicom-rtstruct"
        )


def check_output_target(output: Path, *, single: bool, cases: list[Case], save_probabilities: bool) -> None:
    """Before any compute: the output can be made and written there, and its file system has room for the largest
    case's outputs (their uncompressed size: an upper bound)."""
    voxels = max((_voxel_count(c.image) for c in cases), default=0)
    need = voxels * (1 + (2 * 16 if save_probabilities else 0))  # uint8 labels; float16 probabilities, <= 16 classes
    require_output_folder(output.parent if single else output, need_bytes=need)


def _voxel_count(image: Path) -> int:
    """The voxels of an input from its header alone (a DICOM series: its pixel bytes, 2 per voxel), never more than
    its file can hold (a header can lie; reading the case says so with the case named); 0 if unreadable."""
    try:
        if image.is_dir():
            return sum(f.stat().st_size for f in image.iterdir() if f.is_file()) // 2
        import nibabel as nib

        declared = int(np.prod(nib.load(image).shape[:3], dtype=np.int64))
        size = image.stat().st_size
        return min(declared, size * GZIP_MAX_RATIO if image.name.lower().endswith(".gz") else size)
    except Exception:  # a broken header is read_volume's to report, with the case, when the case runs
        return 0


def refuse_overwriting_inputs(cases: list[Case], plans: dict[str, CaseOutputs], source: Path) -> None:
    """No output onto an input file or into an input series' folder (`source`: the input as given, which a picked
    series or an extracted zip is read through)."""
    source = source.resolve()
    inputs = {c.image.resolve() for c in cases} | {source}
    series = [c.image.resolve() for c in cases if c.image.is_dir()]
    if source.is_dir() and any(c.image.is_dir() for c in cases):
        series.append(source)
    for case in cases:
        for path in plans[case.case].all():
            target = path.resolve()
            if target in inputs or any(target.is_relative_to(s) for s in series):
                raise Seg3dError(
                    f"output {path} would overwrite or be written into an input; choose an --output outside the inputs",
                    case=case.case,
                )


def remove_new_outputs(plan: CaseOutputs, existed: set[Path]) -> None:
    for path in plan.all():
        if path not in existed:
            path.unlink(missing_ok=True)


def sweep_temporaries(plans) -> None:
    """Remove what a process killed in the middle of a write left: the hidden temporaries atomic_write renames onto
    the outputs (.NAME.XXXX...). The outputs themselves are whole or absent, never half written."""
    for plan in plans:
        for path in plan.all():
            remove_temporaries(path.parent, names=[path.name])
