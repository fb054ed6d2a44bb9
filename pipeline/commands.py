"""The handlers of seg3d's commands (pipeline/cli.py parses): each calls a typed function by keyword and prints
what a user reads. Their imports are made inside them, so that `seg3d --help` and each command import only what
they use."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.errors import Seg3dError


def _cmd_models(args: argparse.Namespace) -> int:
    from pipeline.summary import models_table

    rows = models_table()
    print(f"{'model':<16}{'params':>10}  {'attention plug points':<28}aux outputs (train mode)")
    for r in rows:
        print(f"{r['model']:<16}{r['params_M']:>9.2f}M  {r['plug_points']:<28}{r['aux_outputs']}")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from pipeline.summary import demo_summary

    channels = tuple(int(c) for c in args.channels.split(","))
    s = demo_summary(name=args.model, patch=args.patch, channels=channels, seed=args.seed)
    print(f"{s['model']} ({s['plug_points']}), {s['params']:,} parameters")
    print(
        f"  input {s['input']} -> logits {s['logits']}, {s['gflops']:.2f} GFLOPs, forward {s['forward_s']:.2f} s (CPU)"
    )
    print(f"  train-mode outputs: {', '.join(s['train_outputs'])}; one backward step, loss {s['loss']:.3f}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.yamlio import raw_config  # YAML only: a broken or hostile config is refused before torch loads

    overrides = list(args.overrides)
    if args.labels:
        from pipeline.datalists import parse_labels

        selected = {k: v for k, v in parse_labels(args.labels).items() if k != "background"}
        overrides.append("data.labels={" + ", ".join(f"{k}: {v}" for k, v in selected.items()) + "}")
    cfg = None
    if args.config is not None or not args.resume:
        if args.config is None:
            raise Seg3dError("--config is required for a new run (e.g. --config configs/attention_unet.yaml)")
        raw, source = raw_config(args.config, overrides)
        from pipeline.config import config_from_dict

        cfg = config_from_dict(raw, source)
    elif overrides:
        raise Seg3dError("--resume without --config takes no overrides: a resumed run keeps its stored config")
    if args.nproc is not None or args.max_restarts is not None:
        from pipeline.distributed import relaunch_under_torchrun

        forwarded = ["--data", str(args.data), "--output", str(args.output)]
        named = {"--config": args.config, "--tracking-uri": args.tracking_uri, "--labels": args.labels}
        for flag, value in named.items():
            forwarded += [flag, str(value)] if value is not None else []
        forwarded += ["--resume"] if args.resume else []
        return relaunch_under_torchrun(
            nproc=1 if args.nproc is None else args.nproc,
            max_restarts=0 if args.max_restarts is None else args.max_restarts,
            train_args=[*forwarded, *args.overrides],
        )
    from pipeline.startup import import_monai_lean

    import_monai_lean()  # every training process, a study's jobs and torchrun's ranks included (pipeline/cli.py)
    from pipeline.train import train  # after the relaunch: the launching process needs none of it

    result = train(
        cfg, args.data, args.output, tracking_uri=args.tracking_uri, resume=args.resume, config_path=args.config
    )
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports for all
    best = f"best mean foreground Dice {result.best_dice:.3f} at epoch {result.best_epoch + 1}"
    print(f"done: {result.epochs} epochs, {best}" if result.best_epoch >= 0 else f"done: {result.epochs} epochs")
    print(f"bundle: {result.bundle}")
    if result.run_id is None:  # --tracking-uri none
        print("not tracked (--tracking-uri none): the run's record is RUN_DIR alone")
        return 0
    print(
        f"MLflow run {result.run_id} at {result.tracking_uri}"
        + (f"; registered as version {result.registered_version}" if result.registered_version else "")
    )
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from pipeline.infer import run_inference, summarize

    summary = run_inference(
        args.model,
        args.input,
        args.output,
        tracking_uri=args.tracking_uri,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        tta=args.tta,
        postprocess=not args.no_postprocess,
        overlap=args.overlap,
        save_probabilities=args.save_probabilities,
        dicom_seg=args.dicom_seg,
        rtstruct=args.rtstruct,
        statistics=args.statistics,
        preview=args.preview,
        overlays=args.overlays,
        series=args.series,
        overwrite=args.overwrite,
        shard=args.shard,
    )
    if len(summary.done) + len(summary.skipped) + len(summary.failed) > 1 or not summary.failed:
        print(summarize(summary))
    return 2 if summary.failed else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.serve import options, serve

    return serve(options(args))


def _cmd_study(args: argparse.Namespace) -> int:
    from pipeline.infer import parse_shard
    from pipeline.study.config import load_study_config
    from pipeline.study.runner import run_study

    cfg = load_study_config(args.config, args.overrides)
    outcome = run_study(
        cfg,
        data=args.data,
        study_dir=args.output,
        tracking_uri=args.tracking_uri,
        shard=parse_shard(args.shard),
        report_only=args.report_only,
    )
    print(
        f"study {cfg.name}: {len(outcome.ran)} job(s) run, {len(outcome.skipped)} already done, "
        f"{len(outcome.missing)} missing; MLflow parent run {outcome.parent_run_id}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.datalists import parse_labels
    from pipeline.evaluate import CSV_NAME, JSON_NAME, evaluate

    report = evaluate(
        pred=args.pred,
        ref=args.ref,
        output=args.output,
        labels=parse_labels(args.labels) if args.labels else None,
        tolerance_mm=args.tolerance,
        allow_missing=args.allow_missing,
        overwrite=args.overwrite,
        mlflow_run=args.mlflow_run,
        tracking_uri=args.tracking_uri,
    )
    if report.unmatched_text:
        print(f"seg3d evaluate: warning: left out {report.unmatched_text}", file=sys.stderr)
    print(report.format())
    print(f"wrote {args.output / CSV_NAME} and {args.output / JSON_NAME}")
    if args.mlflow_run:
        print(f"logged the means and both files to MLflow run {args.mlflow_run}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    run_demo(
        output=args.output,
        cases=args.cases,
        test_cases=args.test_cases,
        seed=args.seed,
        tracking_uri=args.tracking_uri,
        overrides=args.overrides,
    )
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    import time

    from pipeline.synthetic import synthesize

    start = time.perf_counter()
    manifest = synthesize(
        out=args.out,
        cases=args.cases,
        seed=args.seed,
        test_cases=args.test_cases,
        overwrite=args.overwrite,
        decoys=args.decoys,
    )
    print(f"wrote {manifest} ({args.cases} training cases, seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from pipeline.datalists import load_dataset, parse_labels
    from pipeline.integrity import check_dataset

    labels = parse_labels(args.labels) if args.labels else None
    dataset = load_dataset(args.dataset, labels=labels)
    report = check_dataset(dataset, include_test=not args.no_test)
    print(report.format())
    return 0 if report.ok else 2


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import FOLDER_FORMATS, check_format, export_model, parse_patch

    if check_format(args.format, folders=True) in FOLDER_FORMATS:
        return _export_monai_bundle(args)
    result = export_model(
        args.model,
        args.output,
        fmt=args.format,
        patch=parse_patch(args.patch) if args.patch else None,
        tracking_uri=args.tracking_uri,
        overwrite=args.overwrite,
    )
    x, y, z = result.patch
    print(
        f"wrote {result.path} ({result.model}, {result.format}, input (batch, C, {x}, {y}, {z})) in"
        f" {result.seconds:.1f} s; max |difference| to PyTorch {result.max_abs_error:.2g} (logits up to"
        f" {result.logit_scale:.2g})"
    )
    print(f"preprocessing, patch size and labels: {result.sidecar}")
    if result.preprocessing is not None:
        print(f"the bundle's preprocessing: {result.preprocessing}")
    return 0


def _export_monai_bundle(args: argparse.Namespace) -> int:
    from pipeline.export import parse_patch
    from pipeline.monai_bundle import export_monai_bundle

    if args.overwrite:
        raise Seg3dError(
            "--overwrite does not apply to --format monai-bundle: a bundle is written only into a new or empty folder"
        )
    result = export_monai_bundle(
        args.model,
        args.output,
        patch=parse_patch(args.patch) if args.patch else None,
        tracking_uri=args.tracking_uri,
    )
    x, y, z = result.patch
    print(
        f"wrote MONAI Bundle {result.path} ({result.model}, patch {x}, {y}, {z}) in {result.seconds:.1f} s; max"
        f" |difference| of its network_def to PyTorch {result.max_abs_error:.2g}"
        f" (logits up to {result.logit_scale:.2g})"
    )
    print(
        f"run it: cd {result.path} && python -m monai.bundle run --config_file configs/inference.json"
        " --dataset_dir IN --output_dir OUT"
    )
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from pipeline.doctor import run_checks

    report = run_checks(output=args.output, tracking_uri=args.tracking_uri)
    print(report.format())
    return 0 if report.ok else 1
