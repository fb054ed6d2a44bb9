"""What torchrun starts in the distributed tests: `python -m tests.pipeline._rank_report REPORT_DIR train ARGS...`
runs `seg3d train ARGS` on this rank (pipeline.cli.main, the path `python -m pipeline.cli` takes) and, when train()
returns, writes REPORT_DIR/rank<R>.json from what it returned on this rank: the cases this rank trained and
validated on, and a SHA-256 of its own network's final weights. So the tests compare the ranks' own parameters, not
rank 0's copy of them. A rank whose train() raised writes nothing."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import torch

import pipeline.train
from pipeline.cli import main
from pipeline.distributed import restart_count
from pipeline.fileio import atomic_write_text


def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, raw bytes) of every tensor in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def reporting(train, folder: Path):
    """`train` that, when it returns, writes this rank's report into `folder`."""

    @functools.wraps(train)
    def wrapped(*args, **kwargs):
        result = train(*args, **kwargs)
        report = {
            "rank": result.rank,
            "world": result.world,
            "epochs": result.epochs,
            "attempt": restart_count(),
            "train_cases": sorted(result.train_cases),
            "val_cases": sorted(result.val_cases),
            "state_sha256": digest(result.model.state_dict()),
        }
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"rank{result.rank}.json", json.dumps(report, indent=2))
        return result

    return wrapped


if __name__ == "__main__":
    # The CLI imports train from pipeline.train when the command runs, so it calls the reporting one.
    pipeline.train.train = reporting(pipeline.train.train, Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
