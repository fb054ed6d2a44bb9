"""Does the phantom test context? Pancreas against decoys, measured on the cases `seg3d synth` writes.

Issue 13 asks that decoys be locally indistinguishable from the pancreas (same HU, texture and size) and differ only
in where they are. This script measures, over N phantom cases drawn exactly as `seg3d synth --seed S` draws them:
HU (all voxels and the core, one voxel in from the border), texture (mean HU gradient in the core), tube radius (the
distance to the border along the tube's medial ridge), volume per connected piece, and the HU of shells outside the
border at 0-1.5, 1.5-3 and 3-6 mm with the fraction of fat-like voxels there (the gland has a painted fat plane
around it; a decoy without one would be a local cue). Prints a markdown table; changes nothing. `--decoys matched`
measures the phantom `seg3d synth --decoys matched` writes (decoys matched in length and surroundings too).

    python -m benchmarks.phantom_context [--cases 20] [--seed 0] [--decoys classic|matched]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from pipeline.synthetic import DECOY_KINDS, draw_spec, make_case

SHELLS_MM = ((0.0, 1.5), (1.5, 3.0), (3.0, 6.0))
FAT_BELOW_HU = -30.0  # fat is -95 HU in the phantom; partial volume with soft tissue stays well below this


def region_stats(image: np.ndarray, region: np.ndarray, others: np.ndarray, spacing) -> dict[str, float]:
    """Local appearance of `region` and of its surroundings; `others` (labelled or decoy tissue) is left out of the
    shells so that a decoy touching the gland does not count the gland as its surroundings."""
    hu = image.astype(np.float32)
    core = ndimage.binary_erosion(region)
    grad = np.sqrt(sum(g**2 for g in np.gradient(hu, *spacing)))  # HU/mm
    inside_mm = ndimage.distance_transform_edt(region, sampling=spacing)
    ridge = region & (inside_mm == ndimage.maximum_filter(inside_mm, size=3))  # the tube's medial ridge
    pieces, n = ndimage.label(region)
    volumes_ml = np.bincount(pieces.ravel())[1:] * float(np.prod(spacing)) / 1000.0
    out = {
        "hu_mean": float(hu[region].mean()),
        "hu_std": float(hu[region].std()),
        "core_hu_mean": float(hu[core].mean()) if core.any() else np.nan,
        "core_hu_std": float(hu[core].std()) if core.any() else np.nan,
        "core_gradient": float(grad[core].mean()) if core.any() else np.nan,
        "radius_mm": float(np.median(inside_mm[ridge])),
        "pieces": float(n),
        "piece_ml": float(volumes_ml.mean()),
        "total_ml": float(volumes_ml.sum()),
    }
    outside_mm = ndimage.distance_transform_edt(~region, sampling=spacing)
    for lo, hi in SHELLS_MM:
        shell = (outside_mm > lo) & (outside_mm <= hi) & ~others
        out[f"shell_{lo:g}_{hi:g}_hu"] = float(hu[shell].mean())
        out[f"shell_{lo:g}_{hi:g}_fat"] = float((hu[shell] < FAT_BELOW_HU).mean())
    return out


ROWS = [
    ("hu_mean", "HU, all voxels: mean"),
    ("hu_std", "HU, all voxels: std"),
    ("core_hu_mean", "HU, core (1 voxel in): mean"),
    ("core_hu_std", "HU, core: std"),
    ("core_gradient", "texture: mean HU gradient in the core (HU/mm)"),
    ("radius_mm", "tube radius (mm, median along the ridge)"),
    ("pieces", "connected pieces per case"),
    ("piece_ml", "volume per piece (mL)"),
    ("total_ml", "volume per case (mL)"),
    *[(f"shell_{lo:g}_{hi:g}_hu", f"shell {lo:g}-{hi:g} mm outside: mean HU") for lo, hi in SHELLS_MM],
    *[
        (f"shell_{lo:g}_{hi:g}_fat", f"shell {lo:g}-{hi:g} mm outside: fraction fat (< {FAT_BELOW_HU:g} HU)")
        for lo, hi in SHELLS_MM
    ],
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="as `seg3d synth --seed`")
    parser.add_argument("--decoys", choices=DECOY_KINDS, default="classic", help="as `seg3d synth --decoys`")
    args = parser.parse_args()
    start = time.perf_counter()
    stats: dict[str, list[dict]] = {"pancreas": [], "decoys": []}
    for index in range(args.cases):
        rng = np.random.default_rng([args.seed, index])  # as synthesize() seeds case `index`
        spec = draw_spec(rng, index)
        case = make_case(rng, spec, decoys=args.decoys)
        pancreas, decoys = case.label == 1, case.decoys.astype(bool)
        tissue = (case.label > 0) | decoys
        if decoys.any():
            stats["decoys"].append(region_stats(case.image, decoys, tissue, spec.spacing))
        stats["pancreas"].append(region_stats(case.image, pancreas, tissue, spec.spacing))
    print(
        f"{args.cases} phantom cases (seed {args.seed}, {args.decoys} decoys;"
        f" {len(stats['decoys'])} with decoys in the field of view),"
        f" {time.perf_counter() - start:.0f} s. Mean ± std over cases of each case's value.\n"
    )
    print("| measure | pancreas (label 1) | decoys |")
    print("|---|---|---|")
    for key, name in ROWS:
        cells = []
        for region in ("pancreas", "decoys"):
            values = np.array([s[key] for s in stats[region]], dtype=float)
            cells.append(f"{np.nanmean(values):.3g} ± {np.nanstd(values):.2g}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
