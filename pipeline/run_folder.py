"""RUN_DIR, the folder one training owns: its lock, what it holds, and the checks made on it before a run starts.

    .lock                  held while a training runs in the folder (RunLock)
    config.yaml            the resolved config; config.source.yaml, the file it came from
    split.json             the fold's training and validation cases
    preprocessing.json     target spacing, intensity statistics, label values
    run.json               the MLflow run id and tracking URI, so that --resume continues the same run
    checkpoints/           last.pt and best.pt (pipeline/epochs.py)
    bundle/, per_case_dice.csv, training_curves.png, overlay_<case>.png   the end of the run (pipeline/run_end.py)

A new run refuses a folder that already holds one; --resume refuses a folder without one, and a config that differs
from the stored one. The run's files are written only once nothing is left to refuse (pipeline/run_start.py), and a
run refused before that leaves no folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from pipeline.bundle import load_checkpoint
from pipeline.config import Config, load_config
from pipeline.errors import Seg3dError
from pipeline.fileio import atomic_write_all, atomic_write_text, remove_temporaries

CHECKPOINTS = "checkpoints"
LOCK = ".lock"


class RunLock:
    """An exclusive lock on RUN_DIR: a second training pointed at the same folder is refused, not interleaved.

    filelock's FileLock takes flock(2) on RUN_DIR/.lock, which the kernel drops when the holder dies, even by
    SIGKILL: a killed run never blocks the next one (torch imports filelock anyway, so it costs no start-up time).
    The file stays in the folder on release and holds the process id of the last holder, for whoever wonders who
    has the folder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._lock = FileLock(self.path, timeout=0)

    def __enter__(self) -> RunLock:
        try:
            self._lock.acquire()
        except Timeout:
            raise Seg3dError(
                f"{self.path.parent} is in use by another training (lock {self.path}); "
                "wait for it to end or choose another --output"
            ) from None
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


@contextmanager
def removed_if_refused(run_dir: Path, *, owner: bool) -> Iterator[None]:
    """A folder that did not exist before is removed again when the run is refused (Seg3dError) before it wrote
    anything but its lock, so that a mistake does not leave a folder that looks like a run. Only the owner (rank 0)
    removes."""
    created = owner and not run_dir.exists()
    try:
        yield
    except Seg3dError:
        if created and run_dir.exists() and {p.name for p in run_dir.iterdir()} <= {LOCK}:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def sweep_temporaries(run_dir: Path) -> None:
    """Remove what a killed attempt's atomic writes left half-written (call it under the lock)."""
    for folder in (run_dir, run_dir / CHECKPOINTS):
        remove_temporaries(folder)


def prepare_run_dir(cfg: Config | None, run_dir: Path, resume: bool) -> tuple[Config, dict | None, dict]:
    """The run's config, last checkpoint (None for a fresh run, or one killed before its first checkpoint) and
    run.json, after refusing a folder that does not fit: a fresh run in a folder that holds one, --resume in a folder
    that holds none, --resume with a config that differs from the stored one."""
    stored_cfg = run_dir / "config.yaml"
    last = run_dir / CHECKPOINTS / "last.pt"
    run_info_path = run_dir / "run.json"
    if not resume:
        if stored_cfg.exists() or last.exists():
            raise Seg3dError(
                f"{run_dir} already holds a training run; pass --resume to continue it or choose another --output"
            )
        if cfg is None:
            raise Seg3dError("no config given; pass --config configs/NAME.yaml")
        return cfg, None, {}
    if not stored_cfg.exists():
        raise Seg3dError(f"--resume: {run_dir} holds no training run (no config.yaml); start it without --resume")
    stored = load_config(stored_cfg)
    if cfg is not None and cfg.to_dict() != stored.to_dict():
        a, b = _flat(cfg.to_dict()), _flat(stored.to_dict())
        key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise Seg3dError(
            f"--resume: the given config differs from the run's stored config at '{key}' "
            f"({a.get(key)!r} vs {b.get(key)!r}); resume without --config or with the same one"
        )
    run_info = json.loads(run_info_path.read_text()) if run_info_path.exists() else {}
    state = load_checkpoint(last) if last.exists() else None
    return stored, state, run_info


def _flat(d: dict, prefix: str = "") -> dict:
    """Dotted keys with the values as they are (a config diff must compare values, not their text)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def write_run_files(
    run_dir: Path,
    *,
    cfg: Config,
    split: dict[str, Any],
    preprocessing: str,
    config_path: Path | str | None,
    run_info: dict[str, Any],
    fresh: bool,
) -> None:
    """run.json every time; for a fresh run also the config, the split and the preprocessing (a resumed run keeps
    the ones it started with)."""
    if fresh:
        # All or none: a full disk while writing them must not leave a config.yaml that makes the folder look like
        # a started run (refused without --resume) while the split or preprocessing it needs to resume is missing.
        texts = {
            "config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
            "split.json": json.dumps(split, indent=2),
            "preprocessing.json": preprocessing,
        }
        if config_path is not None:
            texts["config.source.yaml"] = Path(config_path).read_text()
        atomic_write_all([(run_dir / name, _writer(text)) for name, text in texts.items()])
    atomic_write_text(run_dir / "run.json", json.dumps(run_info, indent=2))


def _writer(text: str):
    return lambda tmp: Path(tmp).write_text(text)


def git_commit() -> str:
    """The commit the code runs from, with "-dirty" for uncommitted changes; "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
