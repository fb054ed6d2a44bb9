"""`seg3d infer`: a model (bundle folder, `runs:/ID/path` or `models:/NAME/VERSION`) on one CT or a batch.

The model may be an ensemble (an ensemble folder, or `--model` given several times: pipeline/ensemble.py), whose
members' class probabilities are averaged; a single bundle runs exactly as it always has.

Batch behaviour, the way a hospital runs it unattended: cases are sorted by id and optionally sharded
(`--shard i/n`, or RANK/WORLD_SIZE under torchrun); a case whose outputs exist is skipped unless `--overwrite`
(outputs are written atomically, so an existing file is a finished one); a failing case is reported on one line
and the rest go on; the exit code is non-zero at the end if any case failed. Inputs are only ever read.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline import faults
from pipeline.bundle import Bundle
from pipeline.datalists import Case, case_id, list_images
from pipeline.devices import resolve_device
from pipeline.ensemble import Ensemble, EnsemblePredictor, adhoc_ensemble, load_model, make_predictor, model_name
from pipeline.errors import Seg3dError, one_line, shown
from pipeline.fileio import check_inside, is_nifti, nifti_stem, remove_temporaries, require_output_folder
from pipeline.imageio import read_again
from pipeline.limits import GZIP_MAX_RATIO
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
    ensemble: int = 0  # members of the ensemble that ran; 0 for a single model


def collect_inputs(source: Path | str) -> list[Case]:
    """A NIfTI file, a DICOM series folder, a folder of NIfTI files, or a datalist (MSD json, CSV). Each case id is
    a safe name (pipeline.datalists.check_case_id), and two inputs that would give one case id are refused."""
    source = Path(source)
    if not source.exists():
        raise Seg3dError(f"input {source} not found")
    if not (source.is_file() or source.is_dir()):
        raise Seg3dError(
            f"input {source} is neither a regular file nor a folder (a FIFO, socket or device?); give a NIfTI file, a"
            " DICOM series folder, a folder of NIfTI files or a datalist"
        )
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
        by_id: dict[str, list[Path]] = {}
        for p in niftis:
            by_id.setdefault(case_id(p), []).append(p)
        clashes = {cid: files for cid, files in by_id.items() if len(files) > 1}
        if clashes:
            cid, files = next(iter(clashes.items()))
            names = ", ".join(shown(f.name) for f in files)
            raise Seg3dError(
                f"{len(files)} files in {source} give the case id {shown(cid)}: {names} (the id is the file name"
                " without .nii.gz, .nii and _0000) and would write one output; keep one of them, or move the others"
                + (f" ({len(clashes)} such ids in all)" if len(clashes) > 1 else "")
            )
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


# MLflow run ids are 32 hex digits (other stores: letters, digits, '-', '_'); registered names and aliases are names.
_RUN_URI = re.compile(r"runs:/([0-9A-Za-z_-]{1,64})/([^\\]+)")
_MODEL_URI = re.compile(r"models:/(\w[\w .+-]{0,127})(?:/\d{1,9}|@\w[\w.+-]{0,63})")


def check_model_uri(uri: str) -> str:
    """`uri` if it names a run's artifact folder or a registered model version, else a Seg3dError. An artifact path
    that climbs out of its run (`runs:/ID/bundle/../../..`) or is absolute would make MLflow copy an arbitrary
    local folder or file as the bundle: refused."""
    how = "runs:/RUN_ID/bundle, models:/NAME/VERSION or models:/NAME@ALIAS"
    if uri.startswith("runs:/"):
        match = _RUN_URI.fullmatch(uri)
        parts = match.group(2).split("/") if match else []
        if not match or any(part in ("", ".", "..") for part in parts):
            raise Seg3dError(
                f"model URI {shown(uri, 120)} is not a run's artifact folder (no '..', '.', empty or absolute parts"
                f" after the run id); give {how}"
            )
    elif not _MODEL_URI.fullmatch(uri):
        raise Seg3dError(f"model URI {shown(uri, 120)} is not a registered model version; give {how}")
    return uri


def resolve_model(model: str, tracking_uri: str | None, workdir: Path) -> Path:
    """A bundle folder as is; `runs:/` and `models:/` URIs downloaded from MLflow into `workdir` (and only there)."""
    if model.startswith(("runs:/", "models:/")):
        from pipeline.tracking.store import download_artifacts

        local = download_artifacts(check_model_uri(model), workdir, tracking_uri)
        return check_inside(workdir, local, what="the download folder")
    path = Path(model)
    if not path.exists():
        raise Seg3dError(f"model {model} not found; give a bundle folder, runs:/RUN_ID/bundle or models:/NAME/VERSION")
    return path


def plan_outputs(
    cases: list[Case], output: Path, *, save_probabilities: bool, dicom_seg: bool, overlays: bool
) -> dict[str, CaseOutputs]:
    """Output paths per case: OUTPUT itself for one case and a .nii.gz or .nii OUTPUT, else OUTPUT/<case>.nii.gz,
    with the extras beside the label map. Every path is checked to lie inside the output folder (case ids are data),
    and two cases that would write one file are refused."""
    single = len(cases) == 1 and is_nifti(output)
    root = output.parent if single else output
    plans: dict[str, CaseOutputs] = {}
    owner: dict[Path, str] = {}
    for case in cases:
        if single:
            stem, folder, labels = nifti_stem(output), output.parent, output
        else:
            stem, folder = case.case, output
            labels = folder / f"{stem}.nii.gz"
        plan = CaseOutputs(
            labels=labels,
            probabilities=folder / f"{stem}_probabilities.npz" if save_probabilities else None,
            dicom_seg=folder / f"{stem}_seg.dcm" if dicom_seg and case.image.is_dir() else None,
            overlay=folder / "overlays" / f"{stem}.png" if overlays else None,
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
    model: str | Path | list[str | Path],
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
    bundle: Bundle | Ensemble | None = None,
) -> InferenceSummary:
    """`model` given as a list of several is an ad-hoc ensemble of them; `bundle` is the model loaded already."""
    output = Path(output)
    models = [model] if isinstance(model, (str, Path)) else list(model)
    cases = sorted(collect_inputs(source), key=lambda c: c.case)
    index, count = parse_shard(shard)
    cases = cases[index::count]
    plans = plan_outputs(cases, output, save_probabilities=save_probabilities, dicom_seg=dicom_seg, overlays=overlays)
    _refuse_overwriting_inputs(cases, plans)
    single = len(cases) == 1 and is_nifti(output)
    if single and output.is_dir():
        raise Seg3dError(f"--output {output} is a folder, but names a NIfTI file; give a file name or another folder")
    if not single and output.exists() and not output.is_dir():
        raise Seg3dError(f"--output {output} is a file; for {len(cases)} inputs give a folder")
    if overlap is not None and not 0 <= overlap < 1:
        raise Seg3dError(f"--overlap must be in [0, 1), got {overlap}")
    dev = resolve_device(device)

    summary = InferenceSummary()
    _sweep_temporaries(plans.values())
    todo = [c for c in cases if overwrite or not all(p.exists() for p in plans[c.case].all())]
    summary.skipped = [c.case for c in cases if c not in todo]
    if not todo:
        return summary
    check_output_target(
        output, single=len(cases) == 1 and is_nifti(output), cases=todo, save_probabilities=save_probabilities
    )
    with tempfile.TemporaryDirectory(prefix="seg3d-model-") as workdir:
        if bundle is None:  # each download in a folder of its own: two `models:/` URIs would both write bundle/
            folders = [resolve_model(str(m), tracking_uri, Path(workdir) / str(i)) for i, m in enumerate(models)]
            bundle = load_model(folders[0]) if len(folders) == 1 else adhoc_ensemble(folders, [str(m) for m in models])
        summary.ensemble = len(bundle.members) if isinstance(bundle, Ensemble) else 0
        predictor = make_predictor(
            bundle, device=dev, precision=precision, tta=tta, postprocess=postprocess, overlap=overlap
        )
        bar = tqdm(todo, desc="infer", unit="case", disable=None if progress is None else not progress)
        for case in bar:
            bar.set_postfix(case=case.case)
            existed = {p for p in plans[case.case].all() if p.exists()}
            try:
                summary.timings[case.case] = _one_case(predictor, bundle, case, plans[case.case], overlays)
                summary.done.append(case.case)
                summary.outputs[case.case] = plans[case.case]
            except (Seg3dError, OSError) as err:
                _remove_new_outputs(plans[case.case], existed)  # a failed case leaves no output of its own
                summary.failed.append((case.case, _failure_line(case, err)))
                tqdm.write(f"seg3d infer: error: {summary.failed[-1][1]}", file=sys.stderr)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: this case's outputs are incomplete, so none are kept
                _remove_new_outputs(plans[case.case], existed)
                raise
    return summary


def _failure_line(case: Case, err: Exception) -> str:
    if isinstance(err, Seg3dError):
        return str(err) if err.case else f"{case.case}: {err}"
    # OSError: the output's file system filled up or went away while this case was being written.
    where = f" {err.filename}" if err.filename else ""
    return (
        f"{case.case}: cannot write{where} ({err.strerror or one_line(err)}); nothing of this case was kept: free"
        " space or choose another --output"
    )


def _remove_new_outputs(plan: CaseOutputs, existed: set[Path]) -> None:
    for path in plan.all():
        if path not in existed:
            path.unlink(missing_ok=True)


def _sweep_temporaries(plans) -> None:
    """Remove what a process killed in the middle of a write left: the hidden temporaries atomic_write renames onto
    the outputs (.NAME.XXXX...). The outputs themselves are whole or absent, never half written."""
    for plan in plans:
        for path in plan.all():
            remove_temporaries(path.parent, names=[path.name])


def _one_case(
    predictor: Predictor | EnsemblePredictor, bundle: Bundle | Ensemble, case: Case, plan: CaseOutputs, overlays: bool
) -> dict[str, float]:
    if plan.dicom_seg is not None:
        dicom_seg_sources(case.image)  # refuse a series a SEG cannot reference before computing anything

    def warn(note: str) -> None:
        # Real scans, not errors, but the user must know: which geometry the output follows (qform or sform,
        # oblique), units converted, a HU range worth a look. Said once the input is read, before any compute.
        tqdm.write(f"seg3d infer: warning: {case.case}: {note}", file=sys.stderr)

    gates = overlays and predictor.has_gates
    pred = predictor.predict_file(
        case.image, case=case.case, probabilities=plan.probabilities is not None, gates=gates, notes=warn
    )
    faults.point("infer.case")
    # The outputs are written from what was read (pred.source: the header as read). What must look at the input
    # again, the SEG's source datasets and the overlay's image, is read first and only if the input is still the
    # file that was read, so that a case refused here has written nothing.
    sources = dicom_seg_sources(case.image, expect=pred.source, case=case.case) if plan.dicom_seg is not None else None
    image = read_again(pred.source, case.case) if plan.overlay is not None else None
    start = time.perf_counter()
    pre = bundle.preprocessing
    write_labels(pred, pre, out=plan.labels)
    if plan.probabilities is not None:
        write_probabilities(pred, pre, plan.probabilities)
    if plan.dicom_seg is not None:
        write_dicom_seg(pred, pre, sources=sources, out=plan.dicom_seg, model_name=model_name(bundle))
    pred.timings["write"] = time.perf_counter() - start
    if image is not None:
        from pipeline.plots import overlay_png

        found = ", ".join(f"{n} {int((pred.labels == i).sum()):,} voxels" for i, n in enumerate(pre.label_names) if i)
        overlay_png(
            plan.overlay,
            image.array,
            image.affine,
            None,
            pred.labels,
            pre.label_names,
            title=f"{case.case}: {model_name(bundle)} ({found})",
            extra=pred.gate,
            extra_name="attention gate (finest skip)",
        )
    return pred.timings


def summarize(summary: InferenceSummary) -> str:
    parts = [f"{len(summary.done)} done", f"{len(summary.skipped)} skipped (outputs exist; --overwrite redoes them)"]
    parts.append(f"{len(summary.failed)} failed")
    many = f"ensemble of {summary.ensemble} model{'s' if summary.ensemble > 1 else ''}: " if summary.ensemble else ""
    line = many + ", ".join(parts)
    if summary.timings:
        stages = ("load", "preprocess", "network", "stitch", "invert", "write")
        totals = {s: float(np.sum([t.get(s, 0.0) for t in summary.timings.values()])) for s in stages}
        whole = sum(totals.values()) or 1.0
        line += "\ntime: " + ", ".join(f"{s} {totals[s]:.1f} s ({100 * totals[s] / whole:.0f}%)" for s in stages)
    return line
