"""seg3d command line: parses arguments, then calls a typed function by keyword. User errors are one line
on stderr and exit code 2."""

from __future__ import annotations

import argparse
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.summary import demo_summary

    channels = tuple(int(c) for c in args.channels.split(","))
    s = demo_summary(name=args.model, patch=args.patch, channels=channels, seed=args.seed)
    print(f"seg3d demo: {s['model']} ({s['plug_points']}), {s['params']:,} parameters")
    print(
        f"  input {s['input']} -> logits {s['logits']}, {s['gflops']:.2f} GFLOPs, forward {s['forward_s']:.2f} s (CPU)"
    )
    print(f"  train-mode outputs: {', '.join(s['train_outputs'])}; one backward step, loss {s['loss']:.3f}")
    print("  (the full demo, training on synthetic CT with MLflow tracking, comes with `seg3d train`)")
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

    p = sub.add_parser("demo", help="build a small model and run it once on a random patch")
    p.add_argument("--model", default="attention_unet", help="a registered variant (see `seg3d models`)")
    p.add_argument("--patch", type=int, default=64, help="edge of the cubic patch in voxels")
    p.add_argument("--channels", default="8,16,32,64", help="channels per level, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Seg3dError as err:
        print(f"seg3d {args.command}: error: {err}", file=sys.stderr)
        return 2
