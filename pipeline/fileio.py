"""Files that are whole or absent: atomic writes, the sweep of what a killed write left, and file names.

Every output seg3d writes (masks, probabilities, checkpoints, bundles, reports, figures) goes through
`atomic_write`: a temporary file beside the target, fsync, rename, fsync of the folder. A crash at any moment leaves
the old file or the new one, never half of one, plus at most a hidden temporary that `remove_temporaries` sweeps
on the next run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline import faults

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# What atomic_write (.NAME.XXXXXXXX[suffix]) and save_bundle (.NAME.XXXXXXXX/, .NAME.old-PID/) leave behind when the
# process is killed in the middle of a write.
_TEMPORARY = re.compile(r"\.[^/]+\.(?:[a-z0-9_]{8}(?:\..+)?|old-\d+)")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(path: Path, write: Callable[[Path], object], suffix: str = ".tmp") -> None:
    """Call `write(tmp_path)`, fsync the result, then rename it onto `path` (same folder, so the rename is atomic).
    `suffix` ends the temporary name, for writers that choose the format by extension (".nii.gz")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if tmp.is_file():  # mkstemp makes the file owner-only; give it the mode a plain open() would (umask)
            os.chmod(tmp, 0o666 & ~umask())
        faults.point(f"write.{path.name}")  # a crash here leaves the old file whole and a stray temporary
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_csv(path: Path, header: Iterable, rows: Iterable[Iterable]) -> None:
    """A CSV file (one header row, then `rows`), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def remove_temporaries(folder: Path, names: Iterable[str] | None = None) -> list[str]:
    """Delete the temporaries a killed write left in `folder` (not recursive); returns their names. With `names`,
    only the temporaries of those files (an output folder shared with others); without, every one, which is only
    for a folder this process owns, such as a run folder under its lock: another live writer's would go too."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if names is None else {str(n) for n in names}
    removed = []
    for path in folder.glob(".*"):
        if not _TEMPORARY.fullmatch(path.name):
            continue
        if wanted is not None and not any(path.name.startswith(f".{n}.") for n in wanted):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def make_temporary_dir(target: Path) -> Path:
    """An empty hidden folder beside `target` (named as remove_temporaries recognises), with the mode a plain
    mkdir would give it, for building a folder that is then renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it owner-only
    return tmp


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_nifti(path: Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """The file name without .nii.gz or .nii."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
