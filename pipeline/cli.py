"""seg3d command line: parses arguments, then calls a typed function by keyword. User errors are one line
on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if args.labels:
        from pipeline.datalists import parse_labels

        selected = {k: v for k, v in parse_labels(args.labels).items() if k != "background"}
        overrides.append("data.labels={" + ", ".join(f"{k}: {v}" for k, v in selected.items()) + "}")
    cfg = None
    if args.config is not None or not args.resume:
        if args.config is None:
            raise Seg3dError("--config is required for a new run (e.g. --config configs/attention_unet.yaml)")
        cfg = load_config(args.config, overrides)
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
    from pipeline.train import train  # after the relaunch: the launching process needs none of it

    result = train(
        cfg, args.data, args.output, tracking_uri=args.tracking_uri, resume=args.resume, config_path=args.config
    )
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports for all
    best = f"best mean foreground Dice {result.best_dice:.3f} at epoch {result.best_epoch + 1}"
    print(f"done: {result.epochs} epochs, {best}" if result.best_epoch >= 0 else f"done: {result.epochs} epochs")
    print(f"bundle: {result.bundle}")
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
        tta=args.tta,
        postprocess=not args.no_postprocess,
        overlap=args.overlap,
        save_probabilities=args.save_probabilities,
        dicom_seg=args.dicom_seg,
        overlays=args.overlays,
        overwrite=args.overwrite,
        shard=args.shard,
    )
    if len(summary.done) + len(summary.skipped) + len(summary.failed) > 1 or not summary.failed:
        print(summarize(summary))
    return 2 if summary.failed else 0


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
        out=args.out, cases=args.cases, seed=args.seed, test_cases=args.test_cases, overwrite=args.overwrite
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
    from pipeline.export import export_model, parse_patch

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


def _cmd_doctor(args: argparse.Namespace) -> int:
    from pipeline.doctor import run_checks

    report = run_checks(output=args.output, tracking_uri=args.tracking_uri)
    print(report.format())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seg3d", description="Attention-based 3D segmentation of CT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered model variants")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("synth", help="write a synthetic CT phantom dataset in Medical Segmentation Decathlon layout")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    p.add_argument("--cases", type=int, default=8, help="number of training cases")
    p.add_argument("--test-cases", type=int, default=None, help="number of test cases (default: cases // 4, >= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("check-data", help="read every case of a dataset and report every problem, with its case id")
    p.add_argument(
        "dataset", type=Path, help="an MSD dataset.json or its folder, a folder with images/ and labels/, or a CSV"
    )
    p.add_argument(
        "--labels", default=None, help="select classes by label value, e.g. pancreas=7; other values become background"
    )
    p.add_argument("--no-test", action="store_true", help="skip the test cases")
    p.set_defaults(func=_cmd_check_data)

    p = sub.add_parser("train", help="train a model on a dataset, tracked in MLflow")
    p.add_argument("--config", type=Path, default=None, help="a YAML config, e.g. configs/attention_unet.yaml")
    p.add_argument("--data", type=Path, required=True, help="anything check-data accepts (MSD, folders, CSV)")
    p.add_argument("--output", type=Path, required=True, help="RUN_DIR: checkpoints, bundle (RUN_DIR/bundle), plots")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--labels", default=None, help="select classes by label value, e.g. pancreas=7 (sets data.labels)")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="data-parallel training on N processes (one per GPU) of this machine, via torchrun",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        help="with --nproc: restart the whole job up to K times when a process dies, from the last checkpoint",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=50")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "evaluate", help="Dice, HD95, NSD and volume difference per case and class, against reference labels"
    )
    p.add_argument("--pred", type=Path, required=True, help="a predicted label map (NIfTI) or a folder of them")
    p.add_argument("--ref", type=Path, required=True, help="the reference label map or folder, matched by case id")
    p.add_argument("--output", type=Path, required=True, help="folder for metrics.csv and metrics.json")
    p.add_argument(
        "--labels", default=None, help="classes as NAME=VALUE pairs (default: MSD Task07, pancreas=1,cancer=2)"
    )
    p.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default: 2.0)")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="evaluate the matched cases only, with a warning, instead of failing on unmatched case ids",
    )
    p.add_argument("--overwrite", action="store_true", help="replace metrics.csv and metrics.json in --output")
    p.add_argument("--mlflow-run", default=None, metavar="RUN_ID", help="also log the results to this MLflow run")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI of --mlflow-run (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("infer", help="segment CT scans with a trained model, in each scan's own geometry")
    p.add_argument("--model", required=True, help="a bundle folder, runs:/RUN_ID/bundle or models:/NAME/VERSION")
    p.add_argument(
        "--input", type=Path, required=True, help="a NIfTI file, a DICOM series folder, a NIfTI folder or a datalist"
    )
    p.add_argument(
        "--output", type=Path, required=True, help="a .nii.gz file for one input, else a folder (<case>.nii.gz)"
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ models")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 on GPUs and on CPUs with AVX512-BF16 or AMX, else fp32",
    )
    p.add_argument("--tta", action="store_true", help="average over all 8 mirrorings (8x slower)")
    p.add_argument("--no-postprocess", action="store_true", help="keep every connected component")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default 0.5)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>_probabilities.npz (float16)")
    p.add_argument("--dicom-seg", action="store_true", help="for a DICOM series, also write <case>_seg.dcm")
    p.add_argument("--overlays", action="store_true", help="PNG overlays (and attention-gate maps) in overlays/")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    p.add_argument("--shard", default=None, help="i/n: every n-th case from the i-th (default: RANK/WORLD_SIZE)")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser(
        "demo", help="synthesise CT, train an Attention U-Net for a few minutes, evaluate, log to MLflow"
    )
    p.add_argument("--output", type=Path, default=None, help="demo folder (default: runs/demo-<timestamp>)")
    p.add_argument("--cases", type=int, default=12, help="training phantoms")
    p.add_argument("--test-cases", type=int, default=4, help="held-out test phantoms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of configs/demo.yaml")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("model-info", help="build a small model, run one forward and backward pass, report")
    p.add_argument("--model", default="attention_unet", help="a registered variant (see `seg3d models`)")
    p.add_argument("--patch", type=int, default=64, help="edge of the cubic patch in voxels")
    p.add_argument("--channels", default="8,16,32,64", help="channels per level, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_model_info)

    p = sub.add_parser(
        "export", help="export a trained network to ONNX or TorchScript, with its preprocessing in OUTPUT.json"
    )
    p.add_argument("--model", required=True, help="a bundle folder, runs:/RUN_ID/bundle or models:/NAME/VERSION")
    p.add_argument("--format", required=True, metavar="{onnx,torchscript}", help="onnx or torchscript")
    p.add_argument("--output", type=Path, required=True, help="file to write, e.g. model.onnx (and model.onnx.json)")
    p.add_argument("--patch", default=None, help="input patch X,Y,Z in voxels (default: the bundle's patch size)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ models")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT and OUTPUT.json")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("doctor", help="check versions, devices, tracking store and folders; exit 1 if one is missing")
    p.add_argument("--output", type=Path, default=None, help="the folder results go to (default: the working one)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    p.set_defaults(func=_cmd_doctor)
    return parser


# Commands that run MONAI code but no MLflow run: MONAI is imported without its integrations' libraries (MLflow,
# matplotlib, pandas, scikit-learn), which they would otherwise pay for at start-up (pipeline.startup).
LEAN_MONAI = frozenset({"infer", "evaluate", "export", "models", "model-info"})


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # machines are offline; mlflow reads it on import
    args = build_parser().parse_args(argv)
    if args.command in LEAN_MONAI:
        from pipeline.startup import import_monai_lean

        import_monai_lean()
    try:
        return args.func(args)
    except Seg3dError as err:
        print(f"seg3d {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seg3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m pipeline.cli`, the entry point torchrun starts on every rank
    sys.exit(main())
