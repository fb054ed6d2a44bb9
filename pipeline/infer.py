"""`seg3d infer`: a model (bundle folder, `runs:/ID/path` or `models:/NAME/VERSION`) on one CT or a batch.

Batch behaviour, the way a hospital runs it unattended: cases are sorted by id and optionally sharded
(`--shard i/n`, or RANK/WORLD_SIZE under torchrun); a case whose outputs exist is skipped unless `--overwrite`
(outputs are written atomically, so an existing file is a finished one); a failing case is reported on one line
and the rest go on; the exit code is non-zero at the end if any case failed. Inputs are only ever read.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline import faults
from pipeline.bundle import Bundle, load_bundle
from pipeline.datalists import Case, case_id, list_images
from pipeline.devices import resolve_device
from pipeline.errors import Seg3dError
from pipeline.fileio import is_nifti, remove_temporaries
from pipeline.imageio import geometry_notes
from pipeline.predict import Predictor
from pipeline.writers import dicom_seg_sources, write_dicom_seg, write_labels, write_probabilities


@dataclass
class CaseOutputs:
    labels: Path
    probabilities: Path | None = None
    dicom_seg: Path | None = None
    overlay: Path | None = None

    def all(self) -> list[Path]:
        return [p for p in (self.labels, self.probabilities, self.dicom_seg, self.overlay) if p is not None]


@dataclass
class InferenceSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, one-line reason)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # case -> stage -> seconds
    outputs: dict[str, CaseOutputs] = field(default_factory=dict)


def collect_inputs(source: Path | str) -> list[Case]:
    """A NIfTI file, a DICOM series folder, a folder of NIfTI files, or a datalist (MSD json, CSV)."""
    source = Path(source)
    if not source.exists():
        raise Seg3dError(f"input {source} not found")
    if source.is_file():
        if is_nifti(source):
            return [Case(case_id(source), source, None)]
        if source.suffix.lower() in (".json", ".csv"):
            return [Case(c.case, c.image, None) for c in list_images(source)]
        raise Seg3dError(f"input {source} is not a NIfTI file (.nii, .nii.gz), a DICOM folder or a datalist")
    if (source / "dataset.json").is_file():
        return [Case(c.case, c.image, None) for c in list_images(source)]
    niftis = sorted(p for p in source.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
    if niftis:
        return [Case(case_id(p), p, None) for p in niftis]
    if not any(p.is_file() for p in source.iterdir()):
        raise Seg3dError(f"input folder {source} is empty or holds only folders; give one DICOM series folder")
    return [Case(source.name, source, None)]  # a DICOM series; read_volume says so if it is none


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`i/n` (0 <= i < n); without one, RANK and WORLD_SIZE from torchrun; else the whole batch (0/1)."""
    if spec is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            return 0, 1
        spec = f"{rank}/{world}"
    index, sep, count = spec.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise Seg3dError(f"--shard {spec!r} must be i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(index), int(count)


def resolve_model(model: str, tracking_uri: str | None, workdir: Path) -> Path:
    """A bundle folder as is; `runs:/` and `models:/` URIs downloaded from MLflow into `workdir`."""
    if model.startswith(("runs:/", "models:/")):
        from pipeline.tracking.store import download_artifacts

        return download_artifacts(model, workdir, tracking_uri)
    path = Path(model)
    if not path.exists():
        raise Seg3dError(f"model {model} not found; give a bundle folder, runs:/RUN_ID/bundle or models:/NAME/VERSION")
    return path


def plan_outputs(cases: list[Case], output: Path, save_probabilities: bool, dicom_seg: bool, overlays: bool):
    """Output paths per case: OUTPUT itself for one case and a .nii.gz OUTPUT, else OUTPUT/<case>.nii.gz, with the
    extras beside the label map."""
    single = len(cases) == 1 and is_nifti(output)
    plans = {}
    for case in cases:
        if single:
            stem = output.name[: -len(".nii.gz")] if output.name.lower().endswith(".nii.gz") else output.stem
            folder, labels = output.parent, output
        else:
            stem, folder = case.case, output
            labels = folder / f"{stem}.nii.gz"
        plans[case.case] = CaseOutputs(
            labels=labels,
            probabilities=folder / f"{stem}_probabilities.npz" if save_probabilities else None,
            dicom_seg=folder / f"{stem}_seg.dcm" if dicom_seg and case.image.is_dir() else None,
            overlay=folder / "overlays" / f"{stem}.png" if overlays else None,
        )
    return plans


def _refuse_overwriting_inputs(cases: list[Case], plans: dict[str, CaseOutputs]) -> None:
    inputs = {c.image.resolve() for c in cases}
    series = [c.image.resolve() for c in cases if c.image.is_dir()]
    for case in cases:
        for path in plans[case.case].all():
            target = path.resolve()
            if target in inputs or any(target.is_relative_to(s) for s in series):
                raise Seg3dError(
                    f"output {path} would overwrite or be written into an input; choose an --output outside the inputs",
                    case=case.case,
                )


def run_inference(
    model: str | Path,
    source: str | Path,
    output: str | Path,
    *,
    tracking_uri: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    tta: bool = False,
    postprocess: bool = True,
    overlap: float | None = None,
    save_probabilities: bool = False,
    dicom_seg: bool = False,
    overlays: bool = False,
    overwrite: bool = False,
    shard: str | None = None,
    progress: bool | None = None,
    bundle: Bundle | None = None,
) -> InferenceSummary:
    output = Path(output)
    cases = sorted(collect_inputs(source), key=lambda c: c.case)
    index, count = parse_shard(shard)
    cases = cases[index::count]
    plans = plan_outputs(cases, output, save_probabilities, dicom_seg, overlays)
    _refuse_overwriting_inputs(cases, plans)
    if overlap is not None and not 0 <= overlap < 1:
        raise Seg3dError(f"--overlap must be in [0, 1), got {overlap}")
    dev = resolve_device(device)

    summary = InferenceSummary()
    _sweep_temporaries(plans.values())
    todo = [c for c in cases if overwrite or not all(p.exists() for p in plans[c.case].all())]
    summary.skipped = [c.case for c in cases if c not in todo]
    if not todo:
        return summary
    with tempfile.TemporaryDirectory(prefix="seg3d-model-") as workdir:
        if bundle is None:
            bundle = load_bundle(resolve_model(str(model), tracking_uri, Path(workdir)))
        predictor = Predictor.from_bundle(
            bundle, device=dev, precision=precision, tta=tta, postprocess=postprocess, overlap=overlap
        )
        bar = tqdm(todo, desc="infer", unit="case", disable=None if progress is None else not progress)
        for case in bar:
            bar.set_postfix(case=case.case)
            try:
                summary.timings[case.case] = _one_case(predictor, bundle, case, plans[case.case], overlays)
                summary.done.append(case.case)
                summary.outputs[case.case] = plans[case.case]
            except Seg3dError as err:
                summary.failed.append((case.case, str(err) if err.case else f"{case.case}: {err}"))
                tqdm.write(f"seg3d infer: error: {summary.failed[-1][1]}", file=sys.stderr)
    return summary


def _sweep_temporaries(plans) -> None:
    """Remove what a process killed in the middle of a write left: the hidden temporaries atomic_write renames onto
    the outputs (.NAME.XXXX...). The outputs themselves are whole or absent, never half written."""
    for plan in plans:
        for path in plan.all():
            remove_temporaries(path.parent, names=[path.name])


def _one_case(predictor: Predictor, bundle: Bundle, case: Case, plan: CaseOutputs, overlays: bool) -> dict[str, float]:
    if plan.dicom_seg is not None:
        dicom_seg_sources(case.image)  # refuse a series a SEG cannot reference before computing anything
    # Real scans, not errors, but the user must know which geometry the output follows: qform or sform, oblique.
    for note in geometry_notes(case.image, case.case):
        tqdm.write(f"seg3d infer: warning: {case.case}: {note}", file=sys.stderr)
    gates = overlays and predictor.has_gates
    pred = predictor.predict_file(case.image, case=case.case, probabilities=plan.probabilities is not None, gates=gates)
    faults.point("infer.case")
    start = time.perf_counter()
    pre = bundle.preprocessing
    write_labels(pred, pre, source=case.image, out=plan.labels)
    if plan.probabilities is not None:
        write_probabilities(pred, pre, plan.probabilities)
    if plan.dicom_seg is not None:
        write_dicom_seg(pred, pre, series=case.image, out=plan.dicom_seg, model_name=bundle.config.model.name)
    pred.timings["write"] = time.perf_counter() - start
    if plan.overlay is not None:
        from pipeline.imageio import read_volume
        from pipeline.plots import overlay_png

        image = read_volume(case.image, case.case)
        found = ", ".join(f"{n} {int((pred.labels == i).sum()):,} voxels" for i, n in enumerate(pre.label_names) if i)
        overlay_png(
            plan.overlay,
            image.array,
            image.affine,
            None,
            pred.labels,
            pre.label_names,
            title=f"{case.case}: {bundle.config.model.name} ({found})",
            extra=pred.gate,
            extra_name="attention gate (finest skip)",
        )
    return pred.timings


def summarize(summary: InferenceSummary) -> str:
    parts = [f"{len(summary.done)} done", f"{len(summary.skipped)} skipped (outputs exist; --overwrite redoes them)"]
    parts.append(f"{len(summary.failed)} failed")
    line = ", ".join(parts)
    if summary.timings:
        stages = ("load", "preprocess", "network", "stitch", "invert", "write")
        totals = {s: float(np.sum([t.get(s, 0.0) for t in summary.timings.values()])) for s in stages}
        whole = sum(totals.values()) or 1.0
        line += "\ntime: " + ", ".join(f"{s} {totals[s]:.1f} s ({100 * totals[s] / whole:.0f}%)" for s in stages)
    return line
