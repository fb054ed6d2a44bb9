"""The evidence for attention on the phantom: `seg3d study --config configs/study_demo.yaml` on a decoy phantom.

Synthesises the phantom (18 training cases by default, with decoy masks), runs the study (every variant, 3 folds,
the demo's network and budget), and with --write puts the report's tables, the wall time and the hardware in the
section "study" of docs/benchmarks.md. The study folder is kept (default /tmp/seg3d-study-bench): rerunning resumes
it, so an interrupted benchmark costs only the job it was in.

    python -m benchmarks.study --write                     # the whole study
    python -m benchmarks.study --out DIR key=value ...     # another folder, study overrides (e.g. folds=5)
    python -m benchmarks.study --decoys classic --write    # the phantom before its decoys were matched

The section is "study" for the matched-decoy phantom (`seg3d synth --decoys matched`, the one that tests context)
and "study-classic" for the classic one, whose decoys differ from the pancreas in local cues as well.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

from benchmarks._report import ROOT, write_section
from pipeline.infer import parse_shard
from pipeline.study.config import load_study_config
from pipeline.study.runner import run_study
from pipeline.synthetic import synthesize

CONFIG = ROOT / "configs" / "study_demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/seg3d-study-bench"))
    parser.add_argument("--cases", type=int, default=18)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--decoys", choices=["matched", "classic"], default="matched")
    parser.add_argument("--shard", default=None, metavar="i/n", help="run every n-th job (shards may run side by side)")
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    data = args.out / "data"
    if not (data / "dataset.json").exists():
        synthesize(data, cases=args.cases, seed=0, test_cases=0, decoys=args.decoys)
    cfg = load_study_config(args.config, args.overrides)
    started = time.perf_counter()
    shard = parse_shard(args.shard)
    uri = f"sqlite:///{args.out}/mlflow.db"
    outcome = run_study(cfg, data=data, study_dir=args.out / "study", tracking_uri=uri, shard=shard)
    wall = time.perf_counter() - started
    timing = args.out / "wall_seconds.json"
    spent = json.loads(timing.read_text()) if timing.exists() else {"runs": []}
    spent["runs"].append(round(wall, 1))
    timing.write_text(json.dumps(spent))
    if outcome.missing:
        print(f"{len(outcome.missing)} job(s) missing; rerun to finish the study")
        return
    report = (args.out / "study" / "report" / "report.md").read_text()
    body = (
        f"`python -m benchmarks.study --decoys {args.decoys}` ({args.cases} phantom cases, {args.decoys} decoys, "
        f"`{args.config.relative_to(ROOT)}`"
        f"{', ' + ' '.join(args.overrides) if args.overrides else ''}): the whole study took "
        f"{sum(spent['runs']) / 60:.1f} min of wall time in {len(spent['runs'])} run(s) of the command.\n\n"
        + report.split("\n", 1)[1].replace("\n# ", "\n#### ").replace("\n## ", "\n#### ")
    )
    if args.write:
        section = "study" if args.decoys == "matched" else "study-classic"
        figures = ROOT / "docs" / section  # the report's figures beside the page that shows them
        figures.mkdir(exist_ok=True)
        for png in sorted((args.out / "study" / "report").glob("*.png")):
            shutil.copyfile(png, figures / png.name)
        body = re.sub(r"\]\(([\w.-]+\.png)\)", rf"]({section}/\1)", body)
        write_section(section, body)
    print(body)


if __name__ == "__main__":
    main()
