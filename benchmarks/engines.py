"""CPU inference engines, whole processes as a user starts them: `seg3d infer` with each backend (torch,
onnxruntime, openvino, auto) and precision against the MONAI tutorial pipeline (benchmarks/inference.py's, MONAI's
AttentionUnet with the same channels and strides) in fp32 and with bf16 autocast, on the real CT and the
512 x 512 x 200 phantom; best of N runs, the rows interleaved so that a drift of the machine hits all alike. Every
seg3d row's mask is compared with fp32 PyTorch's (Dice per class). Then the network alone: milliseconds per batch of
windows in each engine, its GFLOP/s, and the share of this machine's measured matrix-product peak.

    python -m benchmarks.engines [--bundle RUN/bundle] [--repeats 3] [--write]

--bundle: a trained bundle of the demo network (default: the demo config's network with seeded random weights,
benchmarks/startup.py's). With --write the tables become the section "engines" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from benchmarks._report import ROOT, has_native_bf16, table, write_section
from benchmarks.inference import BIG, QUICK_BIG, REAL_CT
from benchmarks.monai_tutorial import monai_network
from benchmarks.startup import WORK, make_bundle

MONAI = """
import json, sys, time
start = time.perf_counter()
from pathlib import Path
import torch
from benchmarks.monai_tutorial import monai_once
from pipeline.bundle import load_bundle
bundle = load_bundle(sys.argv[1])
result = monai_once(Path(sys.argv[2]), [Path(sys.argv[3])], Path(sys.argv[4]), bundle.preprocessing, bundle.config,
                    torch.device("cpu"), sys.argv[5] == "bf16")
print(json.dumps({"network": result["stages"]["network"], "windows": result["windows"]}))
"""


def rows_to_run(native_bf16: bool) -> list[tuple[str, str, str]]:
    """(label, backend, precision); bf16 rows only where bf16 is native (elsewhere it is emulated, and slower)."""
    rows = [("seg3d torch", "torch", "fp32"), ("seg3d onnxruntime", "onnxruntime", "fp32")]
    rows += [("seg3d openvino", "openvino", "fp32")]
    if native_bf16:
        rows += [("seg3d torch", "torch", "bf16"), ("seg3d openvino", "openvino", "bf16")]
    rows += [
        ("seg3d openvino", "openvino", "int8"),
        ("seg3d auto", "auto", "auto"),
        ("MONAI tutorial", "monai", "fp32"),
    ]
    if native_bf16:
        rows += [("MONAI tutorial + autocast", "monai", "bf16")]
    return rows


def run_row(bundle: Path, weights: Path, backend: str, precision: str, source: Path, out: Path) -> float | str:
    """Wall seconds of one whole process, or int8's refusal (its check failed: the line it said)."""
    if backend == "monai":
        cmd = [sys.executable, "-c", MONAI, str(bundle), str(weights), str(source), str(out.parent), precision]
    else:
        cmd = [sys.executable, "-m", "pipeline.cli", "infer", "--model", str(bundle), "--input", str(source),
               "--output", str(out), "--backend", backend, "--precision", precision, "--overwrite",
               "--device", "cpu"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if precision == "int8" and done.returncode == 2 and "--precision int8" in done.stderr:
        return done.stderr.strip().splitlines()[-1].split("error: ", 1)[-1]
    if done.returncode != 0:
        sys.exit(f"{backend} {precision} on {source.name} failed: {done.stderr.strip().splitlines()[-3:]}")
    return wall


def dice_per_class(a: np.ndarray, b: np.ndarray, labels=(1, 2)) -> list[float]:
    out = []
    for label in labels:
        x, y = a == label, b == label
        both = int(x.sum() + y.sum())
        out.append(1.0 if both == 0 else 2 * int((x & y).sum()) / both)
    return out


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of torch's n x n matrix product on this CPU (oneDNN; AMX tiles in bf16 where present)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def network_rows(bundle_dir: Path, native_bf16: bool, peak_bf16: float, peak_fp32: float) -> tuple[list[dict], float]:
    """ms per batch of windows in each engine (the Predictor's own engine objects), GFLOP/s, share of the peak."""
    from pipeline.bundle import load_bundle
    from pipeline.engines import engine_network
    from pipeline.predict import Predictor
    from pipeline.summary import forward_flops

    bundle = load_bundle(bundle_dir)
    patch, batch = tuple(bundle.config.data.patch_size), bundle.config.inference.sw_batch_size
    gflop = forward_flops(bundle.model.eval(), torch.zeros(1, 1, *patch)) * batch / 1e9
    x = torch.randn(batch, 1, *patch, generator=torch.Generator().manual_seed(0))
    rows = []
    for backend in ("torch", "onnxruntime", "openvino"):
        for precision in ("fp32", "bf16") if native_bf16 and backend != "onnxruntime" else ("fp32",):
            predictor = Predictor.from_bundle(bundle, precision=precision, backend=backend)
            network = predictor._network(gates=False)
            with torch.no_grad():
                network(x)
                ms = 1000 * min(_timed(lambda net=network: net(x)) for _ in range(5))
            peak = peak_bf16 if precision == "bf16" else peak_fp32
            speed = gflop * 1000 / ms
            rows.append({"engine": backend, "precision": precision, "ms": f"{ms:.0f}", "gflops": f"{speed:.0f}",
                         "peak": f"{100 * speed / peak:.1f}%"})  # fmt: skip
            print(rows[-1], flush=True)
    int8 = predictor.onnx.with_name("model-int8.onnx")  # quantized by the int8 rows above (pipeline/quantize.py)
    if int8.is_file():
        network = engine_network("openvino", int8, batch, torch.float32)
        with torch.no_grad():
            network(x)
            ms = 1000 * min(_timed(lambda: network(x)) for _ in range(5))
        speed = gflop * 1000 / ms
        rows.append({"engine": "openvino", "precision": "int8 (convolutions)", "ms": f"{ms:.0f}",
                     "gflops": f"{speed:.0f}", "peak": f"{100 * speed / peak_bf16:.1f}% (of bf16's)"})  # fmt: skip
        print(rows[-1], flush=True)
    return rows, gflop / batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: ct_small and a 96 x 96 x 40 phantom")
    args = parser.parse_args()
    if args.quick:
        args.write = False
    if not REAL_CT.is_file():
        sys.exit(f"the real CT is missing: {REAL_CT}")
    bundle = args.bundle.resolve() if args.bundle else make_bundle()
    from pipeline.bundle import load_bundle
    from pipeline.synthetic import make_phantom, save_atomic, to_nifti

    loaded = load_bundle(bundle)
    weights = WORK / "monai_attention_unet.pt"  # the peer's network, seeded random weights (timing only)
    torch.manual_seed(0)
    torch.save(monai_network(loaded.config).state_dict(), weights)
    spec = QUICK_BIG if args.quick else BIG
    phantom = WORK / f"phantom_{'x'.join(map(str, spec.shape))}.nii.gz"
    if not phantom.exists():
        image, _, affine = make_phantom(np.random.default_rng(123), spec)
        save_atomic(to_nifti(image, affine, "RAS"), phantom)
    ct = REAL_CT.with_name("ct_small.nii.gz") if args.quick else REAL_CT
    inputs = {f"real CT `{ct.name}`": ct, f"phantom {' x '.join(map(str, spec.shape))}": phantom}
    native = has_native_bf16()
    rows = rows_to_run(native)
    out = WORK / "engines"
    out.mkdir(exist_ok=True)

    def target(i: int, name: str) -> Path:
        return out / f"row{i}" / f"{'ct' if name.startswith('real') else 'phantom'}.nii.gz"

    first, source = next(iter(inputs.items()))
    for i, (_, backend, precision) in enumerate(rows):  # warm-up: exports, engine choices, int8's check made once
        if backend not in ("monai", "torch"):  # (on the real CT: int8 calibrates on the run's own cases)
            target(i, first).parent.mkdir(exist_ok=True)
            run_row(bundle, weights, backend, precision, source, target(i, first))
    walls: dict[tuple[int, str], list[float]] = {}
    refused: dict[tuple[int, str], str] = {}  # int8 where its check failed: the line seg3d infer said
    for _ in range(args.repeats):
        for i, (label, backend, precision) in enumerate(rows):
            for name, source in inputs.items():
                target(i, name).parent.mkdir(exist_ok=True)
                wall = run_row(bundle, weights, backend, precision, source, target(i, name))
                if isinstance(wall, str):
                    refused[(i, name)] = wall
                    print(f"{label} {precision} {name}: refused: {wall}", flush=True)
                    continue
                walls.setdefault((i, name), []).append(wall)
                print(f"{label} {precision} {name}: {wall:.1f} s", flush=True)

    reference = {name: np.asanyarray(nib.load(target(0, name)).dataobj) for name in inputs}  # seg3d torch fp32
    monai = {p: next(i for i, r in enumerate(rows) if r[1] == "monai" and r[2] == p) for p in ("fp32", "bf16") if any(
        r[1] == "monai" and r[2] == p for r in rows)}  # fmt: skip
    table_rows = []
    for i, (label, backend, precision) in enumerate(rows):
        r = {"row": label, "precision": precision}
        for name in inputs:
            short = "ct" if name.startswith("real") else "ph"
            if (i, name) in refused:
                r[f"{short}_wall"] = "refused: " + refused[(i, name)].split("; run with")[0].split(": ", 1)[-1]
                continue
            best = min(walls[(i, name)])
            r[f"{short}_wall"] = f"{best:.1f}"
            for p, j in monai.items():
                r[f"{short}_vs_{p}"] = f"{min(walls[(j, name)]) / best:.2f}x"
            if backend != "monai":
                mask = np.asanyarray(nib.load(target(i, name)).dataobj)
                r[f"{short}_dice"] = ", ".join(f"{d:.4f}" for d in dice_per_class(mask, reference[name]))
        table_rows.append(r)
        print(r, flush=True)

    peak_bf16 = matmul_peak(torch.bfloat16) if native else float("nan")
    peak_fp32 = matmul_peak(torch.float32)
    print(f"matrix-product peak: bf16 {peak_bf16:.0f}, fp32 {peak_fp32:.0f} GFLOP/s", flush=True)
    net_rows, gflop_window = network_rows(bundle, native, peak_bf16 if native else peak_fp32, peak_fp32)

    cols = [("row", "pipeline"), ("precision", "precision")]
    for short, name in (("ct", "real CT"), ("ph", "phantom")):
        cols += [(f"{short}_wall", f"{name}: best wall (s)")]
        cols += [(f"{short}_vs_{p}", f"{name}: x MONAI {p}") for p in monai]
        cols += [(f"{short}_dice", f"{name}: Dice vs seg3d torch fp32 (pancreas, cancer)")]
    net_cols = [("engine", "engine"), ("precision", "precision"), ("ms", "ms per batch"), ("gflops", "GFLOP/s"),
                ("peak", "share of the matrix-product peak")]  # fmt: skip
    body = (
        "### CPU inference engines: seg3d infer's backends against the MONAI tutorial pipeline (whole processes)\n\n"
        f"`python -m benchmarks.engines{' --bundle ' + str(args.bundle) if args.bundle else ''} --repeats"
        f" {args.repeats}`: each row a whole process as a user starts it (`seg3d infer --backend B --precision P`, or"
        ' the MONAI tutorial pipeline of section "inference" with MONAI\'s AttentionUnet of the same channels and'
        f" strides), best of {args.repeats} runs, rows interleaved; the engines' exports and `auto`'s choice were made"
        " by one run before (cached, as on a user's second case). Model: "
        + (f"`{args.bundle}`" if args.bundle else "the demo config's network, seeded random weights")
        + f" (patch {' x '.join(map(str, loaded.config.data.patch_size))},"
        f" batch {loaded.config.inference.sw_batch_size},"
        f" {gflop_window:.2f} GFLOP per window). Dice: each class's mask against `--backend torch --precision fp32`'s."
        "\n\n" + table(table_rows, cols) + "\n\nThe network alone, in-process, one batch of windows (best of 5): "
        f"this machine's matrix-product peak (torch.matmul 4096 x 4096) is {peak_bf16:.0f} GFLOP/s in bf16 and"
        f" {peak_fp32:.0f} in fp32; each row's share is of the peak at its own precision.\n\n"
        + table(net_rows, net_cols)
    )
    print(body)
    if args.write:
        write_section("engines", body)


if __name__ == "__main__":
    main()
