"""Start-up of the command line as whole processes, as a user starts them: `seg3d --help`, `seg3d infer` of the real
CT, and the imports `seg3d infer` does before its first window; with `--baseline DIR` the same commands run from
another checkout of seg3d (e.g. a git worktree of an older commit), interleaved with this one, so that both are
measured in one run on one machine state. Also reports which heavy libraries each command imported.

    git worktree add /tmp/seg3d-before <commit>
    python -m benchmarks.startup [--repeats 5] [--baseline /tmp/seg3d-before] [--write]

The bundle is the demo config's network with seeded random weights: start-up does not depend on what the weights
learned. With --write the table becomes the section "startup" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._report import ROOT, table, write_section

REAL_CT = ROOT.parent / "shared" / "data" / "real_ct" / "ct.nii.gz"
WORK = ROOT / ".bench" / "startup"
HEAVY = ("mlflow", "SimpleITK", "matplotlib", "pandas", "sklearn", "scipy.signal", "scipy.stats", "highdicom")

# Runs the CLI in-process, then prints which heavy modules it imported: the console script's code path.
_CLI = """
import json, sys
from pipeline.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("SEG3D-IMPORTS " + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
sys.exit(code)
"""
# What `seg3d infer` imports before it reads the scan: the lean MONAI import where the checkout has it.
_IMPORTS = """
import json, sys
import pipeline.cli
if "infer" in getattr(pipeline.cli, "LEAN_MONAI", ()):
    from pipeline.startup import import_monai_lean
    import_monai_lean()
import pipeline.infer
print("SEG3D-IMPORTS " + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


def make_bundle() -> Path:
    import torch

    from attention3d import create_model
    from pipeline.bundle import save_bundle
    from pipeline.config import load_config
    from pipeline.transforms import Preprocessing

    folder = WORK / "bundle"
    if folder.is_dir():
        return folder
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    torch.manual_seed(0)
    model = create_model(cfg.model.name, out_channels=3, **cfg.model.overrides())
    pre = Preprocessing(
        target_spacing=tuple(cfg.data.target_spacing),
        intensity_mode="foreground",
        clip=(-60.0, 240.0),
        mean=100.0,
        std=45.0,
        foreground_crop=True,
        body_threshold_hu=-500.0,
        label_names=["background", "pancreas", "cancer"],
        label_values=[0, 1, 2],
        exhaustive=True,
    )
    return save_bundle(folder, model.eval(), cfg, pre)


def run_once(cmd: list[str], tree: Path) -> tuple[float, list[str]]:
    """Wall time of `cmd` run with `tree` first on the import path, and the heavy modules it imported."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[3:])} failed in {tree}: {proc.stderr.strip().splitlines()[-1:]}")
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("SEG3D-IMPORTS ")), "SEG3D-IMPORTS []")
    return wall, json.loads(line.removeprefix("SEG3D-IMPORTS "))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, help="another seg3d checkout, measured interleaved")
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    if not REAL_CT.is_file():
        sys.exit(f"the real CT is missing: {REAL_CT}")
    bundle = make_bundle()
    cli = [sys.executable, "-c", _CLI.format(heavy=HEAVY)]
    infer = ["infer", "--model", str(bundle), "--input", str(REAL_CT), "--output", str(WORK / "out.nii.gz")]
    commands = {
        "seg3d --help": [*cli, "--help"],
        "imports of seg3d infer (before the scan is read)": [sys.executable, "-c", _IMPORTS.format(heavy=HEAVY)],
        "seg3d infer, real CT (NIfTI), whole process": [*cli, *infer, "--overwrite"],
    }
    trees = {"this checkout": ROOT}
    if args.baseline is not None:
        trees = {f"baseline ({args.baseline.name})": args.baseline.resolve(), **trees}
    walls: dict[tuple[str, str], list[float]] = {}
    imported: dict[tuple[str, str], list[str]] = {}
    for _ in range(args.repeats):  # interleaved, so that a drift of the machine's speed hits both alike
        for name, cmd in commands.items():
            for label, tree in trees.items():
                wall, mods = run_once(cmd, tree)
                walls.setdefault((label, name), []).append(wall)
                imported[(label, name)] = mods
    rows = []
    for (label, name), times in walls.items():
        times = sorted(times)
        row = {
            "tree": label,
            "command": name,
            "best": f"{times[0]:.2f}",
            "median": f"{times[len(times) // 2]:.2f}",
            "imports": ", ".join(imported[(label, name)]) or "none of them",
        }
        rows.append(row)
        print(row, flush=True)
    if not args.write:
        return
    body = (
        "### Start-up of the command line (whole processes)\n\n"
        f"Each command {args.repeats} times as a process of its own, the checkouts interleaved (Python started"
        " through the CLI's `main`, as the console script does). The bundle is the demo config's network with random"
        " weights (start-up does not depend on the weights); `seg3d infer` runs the whole real CT `ct.nii.gz`, in"
        f" bf16 on this CPU. Heavy libraries looked for: {', '.join(HEAVY)}.\n\n"
        + table(
            sorted(rows, key=lambda r: (r["command"], r["tree"])),
            [
                ("command", "command"),
                ("tree", "checkout"),
                ("best", "best (s)"),
                ("median", "median (s)"),
                ("imports", "heavy libraries imported"),
            ],
        )
    )
    write_section("startup", body)


if __name__ == "__main__":
    main()
