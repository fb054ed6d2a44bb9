"""`seg3d infer`: a model (bundle folder, `runs:/ID/path` or `models:/NAME/VERSION`) on one CT or a batch.

The model may be an ensemble (an ensemble folder, or `--model` given several times: pipeline/ensemble.py), whose
members' class probabilities are averaged; a single bundle runs exactly as it always has.

Batch behaviour, the way a hospital runs it unattended: cases are sorted by id and optionally sharded
(`--shard i/n`, or RANK/WORLD_SIZE under torchrun); a case whose outputs exist is skipped unless `--overwrite`
(outputs are written atomically, so an existing file is a finished one); a failing case is reported on one line
and the rest go on; the exit code is non-zero at the end if any case failed. Inputs are only ever read.

What each case writes is planned before any compute (pipeline/case_outputs.py); a DICOM folder of several series or
a zip is turned into one series first (pipeline/dicom_input.py); the RTSTRUCT, statistics, preview and the run
manifest have modules of their own (rtstruct, statistics, preview, readings, manifest).
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

from pipeline import STARTED, faults
from pipeline.bundle import Bundle
from pipeline.case_outputs import (
    BATCH_STATISTICS,
    CaseOutputs,
    check_output_target,
    plan_outputs,
    refuse_overwriting_inputs,
    refuse_rtstruct_without_dicom,
    remove_new_outputs,
    sweep_temporaries,
)
from pipeline.datalists import Case, case_id, list_images
from pipeline.devices import resolve_device
from pipeline.dicom_input import dicom_input, is_zip_input
from pipeline.engines import check_engine
from pipeline.ensemble import Ensemble, EnsemblePredictor, adhoc_ensemble, load_model, make_predictor, model_name
from pipeline.errors import Seg3dError, one_line, shown
from pipeline.fileio import check_inside, is_nifti
from pipeline.imageio import read_again
from pipeline.manifest import RunInfo, input_geometry, model_identity, write_manifest
from pipeline.predict import Predictor
from pipeline.readings import write_readings
from pipeline.rtstruct import check_rtstruct_sources, write_rtstruct
from pipeline.statistics import write_batch_table
from pipeline.writers import dicom_seg_sources, write_dicom_seg, write_labels, write_probabilities


@dataclass
class InferenceSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case, one-line reason)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # case -> stage -> seconds
    outputs: dict[str, CaseOutputs] = field(default_factory=dict)
    ensemble: int = 0  # members of the ensemble that ran; 0 for a single model
    # Seconds from the process's start (pipeline.STARTED) to the model ready in its engine: imports, the model's
    # download and loading, the engine's set-up (an export, a compile, auto's timing, int8's check where not cached).
    startup: dict[str, float] = field(default_factory=dict)


def collect_inputs(source: Path | str, *, series: str | None = None, staging: Path | None = None) -> list[Case]:
    """A NIfTI file, a DICOM series folder, a folder of NIfTI files, or a datalist (MSD json, CSV). Each case id is
    a safe name (pipeline.datalists.check_case_id), and two inputs that would give one case id are refused. A zip
    of a DICOM series, and the series `series` of a folder of several, are read through `staging`
    (pipeline.dicom_input)."""
    source = Path(source)
    if not source.exists():
        raise Seg3dError(f"input {source} not found")
    if not (source.is_file() or source.is_dir()):
        raise Seg3dError(
            f"input {source} is neither a regular file nor a folder (a FIFO, socket or device?); give a NIfTI file, a"
            " DICOM series folder, a folder of NIfTI files or a datalist"
        )
    if source.is_file():
        if is_zip_input(source):
            return [_dicom_case(source, series, staging)]
        _no_series(series, source)
        if is_nifti(source):
            return [Case(case_id(source), source, None)]
        if source.suffix.lower() in (".json", ".csv"):
            return [Case(c.case, c.image, None) for c in list_images(source)]
        raise Seg3dError(f"input {source} is not a NIfTI file (.nii, .nii.gz), a DICOM folder or zip, or a datalist")
    if (source / "dataset.json").is_file():
        _no_series(series, source)
        return [Case(c.case, c.image, None) for c in list_images(source)]
    niftis = sorted(p for p in source.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
    if niftis:
        _no_series(series, source)
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
    return [_dicom_case(source, series, staging)]  # a DICOM series; read_volume says so if it is none


def _dicom_case(source: Path, series: str | None, staging: Path | None) -> Case:
    case, folder = dicom_input(source, series=series, staging=staging)
    return Case(case, folder, None)


def _no_series(series: str | None, source: Path) -> None:
    if series is not None:
        raise Seg3dError(f"--series picks a series of a DICOM folder or zip, and input {source} is neither; drop it")


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


def run_inference(
    model: str | Path | list[str | Path],
    source: str | Path,
    output: str | Path,
    *,
    tracking_uri: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "torch",
    tta: bool = False,
    postprocess: bool = True,
    overlap: float | None = None,
    save_probabilities: bool = False,
    dicom_seg: bool = False,
    rtstruct: bool = False,
    statistics: bool = False,
    preview: bool = False,
    overlays: bool = False,
    series: str | None = None,
    overwrite: bool = False,
    shard: str | None = None,
    progress: bool | None = None,
    bundle: Bundle | Ensemble | None = None,
) -> InferenceSummary:
    """`model` given as a list of several is an ad-hoc ensemble of them; `bundle` is the model loaded already.
    `series`: the SeriesInstanceUID to read from a DICOM folder or zip holding several."""
    imported = time.perf_counter() - STARTED
    output = Path(output)
    models = [model] if isinstance(model, (str, Path)) else list(model)
    # One private folder for the run: a zip's files or the links to a picked series (input/), the downloads (model-i).
    with tempfile.TemporaryDirectory(prefix="seg3d-infer-") as workdir:
        staging = Path(workdir) / "input"
        staging.mkdir()
        every = sorted(collect_inputs(source, series=series, staging=staging), key=lambda c: c.case)
        if rtstruct:
            refuse_rtstruct_without_dicom(every)
        index, count = parse_shard(shard)
        cases = every[index::count]
        plans = plan_outputs(
            cases,
            output,
            save_probabilities=save_probabilities,
            dicom_seg=dicom_seg,
            overlays=overlays,
            rtstruct=rtstruct,
            statistics=statistics,
            preview=preview,
        )
        refuse_overwriting_inputs(cases, plans, Path(source))
        single = len(cases) == 1 and is_nifti(output)
        if single and output.is_dir():
            raise Seg3dError(
                f"--output {output} is a folder, but names a NIfTI file; give a file name or another folder"
            )
        if not single and output.exists() and not output.is_dir():
            raise Seg3dError(f"--output {output} is a file; for {len(cases)} inputs give a folder")
        if overlap is not None and not 0 <= overlap < 1:
            raise Seg3dError(f"--overlap must be in [0, 1), got {overlap}")
        dev = resolve_device(device)
        check_engine(backend)

        summary = InferenceSummary()
        sweep_temporaries(plans.values())
        todo = [c for c in cases if overwrite or not all(p.exists() for p in plans[c.case].all())]
        summary.skipped = [c.case for c in cases if c not in todo]
        if todo:
            check_output_target(output, single=single, cases=todo, save_probabilities=save_probabilities)
            summary.startup["imports"] = imported
            if bundle is None:  # each download in a folder of its own: two `models:/` URIs would both write bundle/
                folders = [
                    resolve_model(str(m), tracking_uri, Path(workdir) / f"model-{i}") for i, m in enumerate(models)
                ]
                bundle = (
                    load_model(folders[0]) if len(folders) == 1 else adhoc_ensemble(folders, [str(m) for m in models])
                )
            summary.ensemble = len(bundle.members) if isinstance(bundle, Ensemble) else 0
            if precision == "int8" and summary.ensemble:
                raise Seg3dError("--precision int8 runs one model; run an ensemble with --precision bf16 or fp32")

            def say(line: str) -> None:
                tqdm.write(f"seg3d infer: {line}", file=sys.stderr)

            predictor = make_predictor(
                bundle,
                device=dev,
                precision=precision,
                tta=tta,
                postprocess=postprocess,
                overlap=overlap,
                backend=backend,
                notes=say,
            )
            if precision == "int8":  # calibrated on the first cases of the run, checked, cached (pipeline/quantize.py)
                predictor.prepare_int8([(c.case, c.image) for c in todo], notes=say)
            summary.startup["model ready"] = time.perf_counter() - STARTED
            run = _run_info(bundle, predictor, tta=tta, postprocess=postprocess)
            bar = tqdm(todo, desc="infer", unit="case", disable=None if progress is None else not progress)
            for case in bar:
                bar.set_postfix(case=case.case)
                existed = {p for p in plans[case.case].all() if p.exists()}
                try:
                    summary.timings[case.case] = _one_case(predictor, bundle, case, plans[case.case], run)
                    summary.done.append(case.case)
                    summary.outputs[case.case] = plans[case.case]
                except (Seg3dError, OSError) as err:
                    remove_new_outputs(plans[case.case], existed)  # a failed case leaves no output of its own
                    summary.failed.append((case.case, _failure_line(case, err)))
                    tqdm.write(f"seg3d infer: error: {summary.failed[-1][1]}", file=sys.stderr)
                except KeyboardInterrupt:  # Ctrl-C or SIGTERM: this case's outputs are incomplete, so none are kept
                    remove_new_outputs(plans[case.case], existed)
                    raise
        if statistics and not single:  # every case's statistics so far, from all shards and earlier runs
            write_batch_table([output / f"{c.case}_statistics.json" for c in every], output / BATCH_STATISTICS)
    return summary


def _run_info(bundle: Bundle | Ensemble, predictor: Predictor | EnsemblePredictor, **settings) -> RunInfo:
    first = predictor.members[0] if isinstance(predictor, EnsemblePredictor) else predictor
    settings["overlap"] = first.inference.overlap
    settings["engine"] = first.engine_name  # the one that ran the network's windows (pipeline/engines.py)
    return RunInfo(
        model=model_identity(bundle, model_name(bundle)),
        device=str(first.device),
        precision="int8" if getattr(first, "int8_backend", None) else str(first.dtype).removeprefix("torch."),
        settings=settings,
    )


def _failure_line(case: Case, err: Exception) -> str:
    if isinstance(err, Seg3dError):
        return str(err) if err.case else f"{case.case}: {err}"
    # OSError: the output's file system filled up or went away while this case was being written.
    where = f" {err.filename}" if err.filename else ""
    return (
        f"{case.case}: cannot write{where} ({err.strerror or one_line(err)}); nothing of this case was kept: free"
        " space or choose another --output"
    )


def _one_case(
    predictor: Predictor | EnsemblePredictor, bundle: Bundle | Ensemble, case: Case, plan: CaseOutputs, run: RunInfo
) -> dict[str, float]:
    dicom = plan.dicom_seg is not None or plan.rtstruct is not None
    if dicom:  # refuse a series a SEG or an RTSTRUCT cannot reference before computing anything
        sources = dicom_seg_sources(case.image, case=case.case)
        if plan.rtstruct is not None:
            check_rtstruct_sources(sources, case.image, case=case.case)

    def warn(note: str) -> None:
        # Real scans, not errors, but the user must know: which geometry the output follows (qform or sform,
        # oblique), units converted, a HU range worth a look. Said once the input is read, before any compute.
        tqdm.write(f"seg3d infer: warning: {case.case}: {note}", file=sys.stderr)

    gates = plan.overlay is not None and predictor.has_gates
    pred = predictor.predict_file(
        case.image, case=case.case, probabilities=plan.probabilities is not None, gates=gates, notes=warn
    )
    faults.point("infer.case")
    # The outputs are written from what was read (pred.source: the header as read). What must look at the input
    # again, the DICOM datasets and the image for the overlay, statistics and preview, is read first and only if the
    # input is still the file that was read, so that a case refused here has written nothing.
    sources = dicom_seg_sources(case.image, expect=pred.source, case=case.case) if dicom else None
    again = plan.overlay is not None or plan.statistics is not None or plan.preview is not None
    image = read_again(pred.source, case.case) if again else None
    start = time.perf_counter()
    pre, name = bundle.preprocessing, model_name(bundle)
    write_labels(pred, pre, out=plan.labels)
    if plan.probabilities is not None:
        write_probabilities(pred, pre, plan.probabilities)
    if plan.dicom_seg is not None:
        write_dicom_seg(pred, pre, sources=sources, out=plan.dicom_seg, model_name=name)
    if plan.rtstruct is not None:
        write_rtstruct(pred, pre, sources=sources, out=plan.rtstruct, model_name=name)
    if image is not None:
        write_readings(pred, image, plan, case=case.case, pre=pre, model=name)
    pred.timings["write"] = time.perf_counter() - start
    if plan.manifest is not None:
        geometry = input_geometry(pred.labels.shape, pred.affine, series=_series_files(case, pred))
        outputs = [p for p in plan.all() if p != plan.manifest]
        write_manifest(plan.manifest, case=case.case, run=run, timings=pred.timings, geometry=geometry, outputs=outputs)
    return pred.timings


def _series_files(case: Case, pred) -> tuple[str, ...] | None:
    return pred.source.files if case.image.is_dir() and pred.source is not None else None


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
    if summary.startup:
        line += "\nstart-up: " + ", ".join(f"{k} at {v:.1f} s" for k, v in summary.startup.items())
        line += " since the process started"
    return line
