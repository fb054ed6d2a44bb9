"""Peak memory of `seg3d infer` on a long CT on CPU: a 512 x 512 x 1000 phantom (0.8 x 0.8 x 1.0 mm), run as a user
runs it (the console script, in a process of its own) with --save-probabilities, the most memory-hungry option.
Target: within 24 GiB of RAM. Uses the demo-config bundle of benchmarks/inference.py (run that first).

    python -m benchmarks.memory [--slices N]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._report import ROOT, table, write_section
from pipeline.synthetic import CaseSpec, make_phantom, save_atomic, to_nifti

BUNDLE = ROOT / ".bench" / "inference" / "models" / "bundle"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=1000, help="slices of 512 x 512 (fewer: a check of the script)")
    args = parser.parse_args()
    if not BUNDLE.exists():
        sys.exit(f"no bundle at {BUNDLE}: run `python -m benchmarks.inference` first")
    work = ROOT / ".bench" / "memory"
    spec = CaseSpec(shape=(512, 512, args.slices), spacing=(0.8, 0.8, 1.0), orientation="RAS", tumour=True, decoys=3)
    image = work / f"long_{args.slices}.nii.gz"
    if not image.exists():
        work.mkdir(parents=True, exist_ok=True)
        array, _, affine = make_phantom(np.random.default_rng(7), spec)
        save_atomic(to_nifti(array, affine, "RAS"), image)
        del array
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    seg3d = Path(sys.executable).with_name("seg3d")
    cmd = [str(seg3d), "infer", "--model", str(BUNDLE), "--input", str(image), "--output", str(out)]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--save-probabilities"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"seg3d infer failed: {proc.stderr.strip().splitlines()[-1:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the one child; Linux reports KiB
    row = {
        "input": f"phantom 512 x 512 x {args.slices} at 0.8 x 0.8 x 1.0 mm",
        "options": "--save-probabilities (bf16 on this CPU)",
        "wall": f"{wall:.0f}",
        "peak": f"{peak / 2**30:.1f}",
        "ok": "yes" if peak <= 24 * 2**30 else "no",
    }
    print(row, proc.stdout.strip().splitlines()[-1], flush=True)
    body = (
        "### Peak memory of seg3d infer on a long CT (CPU)\n\n"
        "`seg3d infer` as a console script in a process of its own, on the demo-config bundle, with "
        "`--save-probabilities` (float32 class probabilities resampled onto the input grid, then written as float16). "
        "Peak is the process's maximum resident set size. Target: within 24 GiB.\n\n"
        + table(
            [row],
            [
                ("input", "input"),
                ("options", "options"),
                ("wall", "wall (s)"),
                ("peak", "peak RSS (GiB)"),
                ("ok", "<= 24 GiB"),
            ],
        )
        + f"\n\nseg3d's own timing line: `{proc.stdout.strip().splitlines()[-1]}`"
    )
    if args.slices == 1000:
        write_section("memory", body)


if __name__ == "__main__":
    main()
