"""The GPU check's folder -> the `inference-gpu` and `training-gpu` sections of docs/benchmarks.md.

    python -m benchmarks.gpu.report --results DIR|gpu_check.tar.gz [--docs docs/benchmarks.md]

benchmarks/gpu/check.sh writes everything it measures into one folder on the GPU machine, and the device call brings
it back as $OUT/gpu_check.tar.gz; this script, run anywhere, turns it into the two sections, stamped with the date,
GPU, driver, CUDA and torch of the machine that measured (env.json), not of the one running this. The goals of issue
17 are read off the demo network's run on the 512 x 512 x 200 phantom: seg3d infer under 2 s end to end without TTA,
at least 2x faster than the MONAI pipeline with AMP on the same GPU, the network at least 70% of the wall time.
A folder from a CPU dry run is refused for docs/benchmarks.md (it would pass for GPU figures); any other --docs file
takes it, marked as a dry run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks._report import REPORT, table, write_section

OURS_PREFIX, PEER_AMP = "seg3d infer", "MONAI AttentionUnet, tutorial pipeline + autocast"
GOAL_WALL_S, GOAL_SPEEDUP, GOAL_NETWORK_SHARE = 2.0, 2.0, 0.70


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def measured_on(env: dict) -> str:
    if not env.get("gpu"):
        return f"{env.get('date', '?')} on no GPU (CPU dry run), torch {env.get('torch')}, {env.get('cpu')}"
    return (
        f"{env['date']} on an {env['gpu']} ({env.get('gpu_memory_gib')} GiB), driver {env.get('driver')}, "
        f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, torch {env['torch']}, Python {env.get('python')}, "
        f"{env.get('cpu')}, {env.get('cpu_cores')} cores"
    )


def steps_table(folder: Path) -> str:
    path = folder / "steps.tsv"
    if not path.exists():
        return "No steps.tsv: the check did not start."
    last: dict[str, dict] = {}  # a step rerun with --only: its last run counts
    for line in path.read_text().splitlines()[1:]:
        if line.strip():
            step, code, seconds = line.split("\t")
            runs = last.get(step, {}).get("runs", 0) + 1
            last[step] = {"step": step + (f" (run {runs})" if runs > 1 else ""), "exit": code, "seconds": seconds}
            last[step]["runs"] = runs
    rows = list(last.values())
    return table(rows, [("step", "step"), ("exit", "exit code (124: timed out)"), ("seconds", "seconds")])


def test_summary(folder: Path) -> str:
    path = folder / "gpu_tests.xml"
    if not path.exists():
        return "The gpu tests left no report (gpu_tests.xml)."
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    failed = [
        f"`{case.get('classname')}.{case.get('name')}`"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    text = f"gpu tests: {passed} passed, {count['failures'] + count['errors']} failed, {count['skipped']} skipped"
    return text + (f" (failed: {', '.join(failed)})" if failed else "") + "."


def goals(runs: list[dict]) -> list[dict]:
    """The issue's goals, from benchmarks/inference.py's runs on the CT-sized phantom ('big')."""
    big = [r for r in runs if r["input"] == "big"]
    ours = next((r for r in big if r["pipeline"].startswith(OURS_PREFIX)), None)
    peer = next((r for r in big if r["pipeline"] == PEER_AMP), None)
    if ours is None:
        return []
    share = ours["stages"]["network"] / ours["wall"]
    out = [
        {
            "goal": "seg3d infer, 512 x 512 x 200, no TTA",
            "target": f"< {GOAL_WALL_S:g} s",
            "value": f"{ours['wall']:.2f} s",
        },
        {"goal": "network share of the wall time", "target": f">= {GOAL_NETWORK_SHARE:.0%}", "value": f"{share:.0%}"},
    ]
    out[0]["met"] = "yes" if ours["wall"] < GOAL_WALL_S else "no"
    out[1]["met"] = "yes" if share >= GOAL_NETWORK_SHARE else "no"
    if peer is not None:
        speedup = peer["wall"] / ours["wall"]
        met = "yes" if speedup >= GOAL_SPEEDUP else "no"
        out.insert(
            1, {"goal": "vs MONAI with AMP", "target": f">= {GOAL_SPEEDUP:g}x", "value": f"{speedup:.2f}x", "met": met}
        )
    return out


def variants_table(data: dict) -> str:
    rows = []
    base = next((r for r in data["rows"] if r.get("name") == "default" and "wall_s" in r), None)
    for r in data["rows"]:
        row = {"name": r["name"]}
        if "error" in r:
            row["wall"] = f"failed: {r['error']}"
        else:
            row.update(
                wall=f"{r['wall_s']:.2f}",
                vs=f"{base['wall_s'] / r['wall_s']:.2f}x" if base else "",
                network=f"{r['network_s']:.2f} ({r['network_share']:.0%})",
                windows=f"{r['windows_per_s']:,.1f}" if r.get("windows_per_s") else "",
                peak=f"{r['peak_gib']:.2f}",
                first=f"{r['first_call_s']:.1f}",
            )
        rows.append(row)
    columns = [("name", "setting"), ("wall", "wall (s)"), ("vs", "vs default"), ("network", "network (s, share)")]
    columns += [("windows", "windows/s"), ("peak", "peak GPU memory (GiB)"), ("first", "first call (s)")]
    return table(rows, columns)


def training_table(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        row = {
            "model": r.get("model", r["config"]),
            "patch": " x ".join(map(str, r["patch"])),
            "layout": "channels-last" if r["channels_last"] else "NCDHW",
            "compile": "torch.compile" if r["compile"] else "eager",
            "pam": {True: "fused (SDPA)", False: "manual (N x N)"}.get(r.get("fused"), ""),
        }
        if "error" in r:
            row["its"] = f"failed: {r['error']}"
        else:
            row.update(
                its=f"{r['iterations_per_s']:.2f}", peak=f"{r['peak_gib']:.2f}", first=f"{r['first_step_s']:.1f}"
            )
        rows.append(row)
    columns = [("model", "model"), ("patch", "patch"), ("layout", "layout"), ("compile", "compile"), ("pam", "PAM")]
    columns += [("its", "iterations/s"), ("peak", "peak memory (GiB)"), ("first", "first step (s)")]
    return table(rows, columns)


def sections(folder: Path) -> tuple[str, str, str]:
    """(measured-on line, inference-gpu body, training-gpu body) of a results folder."""
    env = _json(folder / "env.json") or {}
    dry = not env.get("gpu")
    banner = (
        "**CPU dry run of benchmarks/gpu/check.sh: a check of the plumbing, not a measurement.**\n\n" if dry else ""
    )
    parts = [
        banner + "### The GPU check (benchmarks/gpu/check.sh)\n\n" + steps_table(folder) + "\n\n" + test_summary(folder)
    ]
    demo = _json(folder / "inference_demo.json")
    rows = goals(demo["runs"]) if demo else []
    if rows:
        columns = [("goal", "goal"), ("target", "target"), ("value", "measured"), ("met", "met")]
        parts.append("### Goals (issue 17), demo network, CT-sized phantom\n\n" + table(rows, columns))
    for name in ("demo", "attention_unet"):
        md = folder / f"inference_{name}.md"
        parts.append(md.read_text().strip() if md.exists() else f"No inference run for `configs/{name}.yaml`.")
        variants = _json(folder / f"variants_{name}.json")
        if variants:
            parts.append(
                f"#### What the GPU rewards: `configs/{name}.yaml`'s network on `{variants['image']}` "
                "(benchmarks/gpu/variants.py; one setting changed at a time; `predict_file` without writing, median "
                "of 2 after a warm-up)\n\n" + variants_table(variants)
            )
    training = _json(folder / "training.json")
    train_body = banner + (
        "### Training on the GPU (benchmarks/gpu/training.py)\n\n"
        "pipeline/epochs.py's step (model, SegLoss with the auxiliary losses, AdamW, schedule, clipping) in bf16 "
        "autocast on batches already on the GPU (network and optimiser, not the loader), batch of the config; "
        "iterations/s over the timed steps after warm-up; peak memory is `torch.cuda.max_memory_allocated` over "
        "them; first step includes compilation.\n\n" + training_table(training)
        if training
        else "No training results (training.json)."
    )
    return measured_on(env), "\n\n".join(parts), train_body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.report")
    parser.add_argument("--results", type=Path, required=True, help="check.sh's folder, or gpu_check.tar.gz")
    parser.add_argument("--docs", type=Path, default=REPORT, help="the markdown file to write the sections into")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.results
        if folder.is_file():  # $OUT/gpu_check.tar.gz as the device call brought it back
            with tarfile.open(folder) as tar:
                tar.extractall(tmp, filter="data")
            folder = Path(tmp)
        if not (folder / "steps.tsv").exists():
            print(f"report: {args.results} is not a folder of benchmarks/gpu/check.sh (no steps.tsv)", file=sys.stderr)
            return 2
        measured, inference, training = sections(folder)
    if "no GPU" in measured and args.docs.resolve() == REPORT.resolve():
        print(f"report: {args.results} is a CPU dry run; it does not go into {REPORT}", file=sys.stderr)
        return 2
    write_section("inference-gpu", inference, measured=measured, report=args.docs)
    write_section("training-gpu", training, measured=measured, report=args.docs)
    print(f"wrote the inference-gpu and training-gpu sections of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
