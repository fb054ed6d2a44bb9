"""seg3d command line: parses arguments, then calls a typed function by keyword. User errors are one line
on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from pipeline.commands import (
    _cmd_check_data,
    _cmd_demo,
    _cmd_doctor,
    _cmd_evaluate,
    _cmd_export,
    _cmd_infer,
    _cmd_model_info,
    _cmd_models,
    _cmd_serve,
    _cmd_study,
    _cmd_synth,
    _cmd_train,
)
from pipeline.errors import Seg3dError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seg3d", description="Attention-based 3D segmentation of CT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered model variants")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser(
        "synth",
        help="write a synthetic CT phantom dataset in Medical Segmentation Decathlon layout",
        description="Write CT phantoms (pancreas and tumour) in Medical Segmentation Decathlon layout, with test"
        " labels in labelsTs/. Decoys, tissue with the pancreas's HU and texture where no pancreas belongs, test"
        " whether a model uses context; each case's decoy mask (1 = decoy voxel, the image's geometry) goes to"
        ' decoysTr/ or decoysTs/, named in dataset.json by the training entries\' "decoy" key.',
    )
    p.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    p.add_argument("--cases", type=int, default=8, help="number of training cases")
    p.add_argument("--test-cases", type=int, default=None, help="number of test cases (default: cases // 4, >= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument(
        "--decoys",
        choices=("classic", "matched"),
        default="classic",
        help="classic (default, the published phantom): short decoys in plain fat, which a network can tell from the"
        " pancreas by their size and surroundings alone. matched: decoys with the pancreas's length, radii and"
        " surroundings (a thin fat plane, soft tissue beyond it), so only their position tells them apart; anatomy"
        " and noise are those of classic for the same seed. Recorded in dataset.json.",
    )
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
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db); `none`: no tracking, "
        "MLflow is not even imported (the run's record is RUN_DIR alone)",
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
        "study",
        help="cross-validate attention variants against a baseline: statistics, costs, ensembles, a champion",
    )
    p.add_argument("--config", type=Path, default=None, help="a study YAML, e.g. configs/study_demo.yaml")
    p.add_argument("--data", type=Path, required=True, help="anything check-data accepts (MSD, folders, CSV)")
    p.add_argument("--output", type=Path, required=True, help="STUDY_DIR: jobs, out-of-fold files, report, champion")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    p.add_argument(
        "--shard", default=None, help="i/n: run every n-th job from the i-th (default: RANK/WORLD_SIZE, else all)"
    )
    p.add_argument(
        "--report-only", action="store_true", help="rebuild the report from STUDY_DIR as it stands; name missing jobs"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="study overrides, e.g. folds=3 budget.epochs=2")
    p.set_defaults(func=_cmd_study)

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
    p.add_argument(
        "--model",
        required=True,
        action="append",
        help="a bundle or ensemble folder, runs:/RUN_ID/bundle, models:/NAME/VERSION or models:/NAME@ALIAS; given"
        " several times, an ensemble that averages their class probabilities (post-processed unless --no-postprocess)",
    )
    p.add_argument(
        "--input",
        type=Path,
        required=True,
        help="a NIfTI file, a DICOM series folder (or a zip of one), a NIfTI folder or a datalist",
    )
    p.add_argument(
        "--output", type=Path, required=True, help="a .nii.gz file for one input, else a folder (<case>.nii.gz)"
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ models")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16", "int8"),
        default="auto",
        help="auto: bf16 on GPUs and on CPUs with AVX512-BF16 or AMX, else fp32; int8 (CPU, with --backend openvino,"
        " onnxruntime or auto): the network quantized on the first cases and used only if its masks stay within Dice"
        " 0.005 of fp32's there (checked once, cached)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "onnxruntime", "openvino"),
        default="torch",
        help="the engine that runs the network on the CPU (PyTorch, ONNX Runtime or OpenVINO, the last two on an ONNX"
        " export of it); auto: the fastest that matches PyTorch, measured once per machine and model and cached"
        " (SEG3D_CACHE, else ~/.cache/seg3d)",
    )
    p.add_argument("--tta", action="store_true", help="average over all 8 mirrorings (8x slower)")
    p.add_argument("--no-postprocess", action="store_true", help="keep every connected component")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default 0.5)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>_probabilities.npz (float16)")
    p.add_argument("--dicom-seg", action="store_true", help="for a DICOM series, also write <case>_seg.dcm")
    p.add_argument(
        "--dicom-rtstruct",
        "--rtstruct",
        dest="rtstruct",
        action="store_true",
        help="for a DICOM series, also write <case>_rtstruct.dcm (RT Structure Set, for radiotherapy planning)",
    )
    p.add_argument(
        "--series",
        default=None,
        metavar="UID",
        help="the SeriesInstanceUID to read from a DICOM folder or zip holding several (without it they are listed)",
    )
    p.add_argument(
        "--statistics",
        action="store_true",
        help="per structure: volume (ml), voxels, HU mean/std/median, bounding box (mm) in <case>_statistics.json"
        " and .csv; for a folder --output also statistics.csv for all cases",
    )
    p.add_argument(
        "--preview",
        action="store_true",
        help="<case>_preview.png: three planes through each structure, outlined, with its name, volume and the model",
    )
    p.add_argument("--overlays", action="store_true", help="PNG overlays (and attention-gate maps) in overlays/")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs exist")
    p.add_argument("--shard", default=None, help="i/n: every n-th case from the i-th (default: RANK/WORLD_SIZE)")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser(
        "serve",
        help="a DICOM node: CT series pushed to it (C-STORE) are segmented, their DICOM SEG sent on",
        description="Receive CT series over DICOM (Storage SCP), segment each complete series with --model as seg3d"
        " infer does, and send its DICOM SEG to --send-to (C-STORE), retried while it is down. Every stage lives in"
        " --spool, so a node killed at any moment and started again finishes what it acknowledged. Logs name a series"
        " by a hash of its Series Instance UID only.",
    )
    p.add_argument("--model", required=True, help="a bundle or ensemble folder, runs:/... or models:/...")
    p.add_argument("--spool", type=Path, required=True, help="the node's state: received series, results, failures")
    p.add_argument("--send-to", required=True, metavar="AET@HOST:PORT", help="where results go, e.g. ORTHANC@pacs:4242")
    p.add_argument("--ae-title", default="SEG3D", help="this node's AE title (default SEG3D)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    p.add_argument(
        "--allow", action="append", metavar="AET", help="a calling AE title to accept (repeat); default: any"
    )
    p.add_argument(
        "--quiet-time",
        type=float,
        default=10.0,
        help="seconds without a new instance after which a series is complete (default 10)",
    )
    p.add_argument(
        "--no-complete-on-release",
        action="store_true",
        help="a series is complete only after --quiet-time, not at the end of the association that brought it (for"
        " routers that send one instance per association)",
    )
    p.add_argument(
        "--health-port", type=int, default=11113, help="/health and /metrics on 127.0.0.1 (default 11113; 0: none)"
    )
    p.add_argument("--rtstruct", action="store_true", help="send an RT Structure Set too")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ models")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime", "openvino"), default="torch")
    p.set_defaults(func=_cmd_serve)

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
        "export",
        help="export a trained network to ONNX or TorchScript (preprocessing in OUTPUT.json), or as a MONAI Bundle",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a bundle folder, runs:/RUN_ID/bundle or models:/NAME/VERSION (of an ensemble, one member:"
        " ENSEMBLE/members/NAME)",
    )
    p.add_argument(
        "--format",
        required=True,
        metavar="{onnx,torchscript,monai-bundle}",
        help="onnx or torchscript (one file), or monai-bundle (a folder MONAI runs as it is, with the preprocessing,"
        " sliding window, inversion and post-processing of `seg3d infer`)",
    )
    p.add_argument(
        "--output",
        type=Path,
        required=True,
        help="file to write, e.g. model.onnx (and model.onnx.json); for monai-bundle a new or empty folder",
    )
    p.add_argument("--patch", default=None, help="input patch X,Y,Z in voxels (default: the bundle's patch size)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ models")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUTPUT and OUTPUT.json (not for monai-bundle)"
    )
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


# Commands that run MONAI code: MONAI is imported without its integrations' libraries (MLflow, matplotlib, pandas,
# scikit-learn, scipy.signal), which they would otherwise pay for at start-up (pipeline.startup); seg3d's own tracking
# and figures import MLflow and matplotlib themselves, normally, when they are used. `train` does the same itself,
# once its config has been read (a hostile YAML is refused before torch loads) and only where it trains.
LEAN_MONAI = frozenset({"infer", "serve", "evaluate", "export", "models", "model-info"})


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, `docker stop`, a scheduler's time limit), handled exactly like Ctrl-C: the same
    clean-up runs (an MLflow run ends KILLED, temporaries go, the last checkpoint stays resumable)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # machines are offline; mlflow reads it on import
    args = build_parser().parse_args(argv)
    if args.command in LEAN_MONAI:
        from pipeline.startup import import_monai_lean

        import_monai_lean()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except Seg3dError as err:
        print(f"seg3d {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        resume = "; --resume continues the run from its last checkpoint" if args.command == "train" else ""
        print(f"seg3d {args.command}: {what}; nothing half-written was left{resume}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # `python -m pipeline.cli`, the entry point torchrun starts on every rank
    sys.exit(main())
