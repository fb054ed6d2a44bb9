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
from pipeline.errors import Seg3dError

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
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, newline=""))


# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...), +cmd|...), whatever the CSV
# quoting; OWASP's advice is to prefix such a text cell with a single quote, which the spreadsheet shows as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """`value` as a CSV cell a spreadsheet will not execute: text that starts like a formula gets a leading quote.
    Numbers stay numbers (a negative volume difference is not a formula)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_text(header: Iterable, rows: Iterable[Iterable]) -> str:
    """CSV text (one header row, then `rows`) with every text cell made safe for spreadsheets (csv_cell)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)  # RFC 4180's CRLF: a CR or LF inside a cell is then always quoted
    writer.writerow([csv_cell(v) for v in header])
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return buffer.getvalue()


def atomic_write_csv(path: Path, header: Iterable, rows: Iterable[Iterable]) -> None:
    """A CSV file (csv_text), written atomically."""
    atomic_write_text(path, csv_text(header, rows))


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


def move_folder_into_place(tmp: Path, folder: Path) -> None:
    """Replace `folder` by the finished folder `tmp` (made by make_temporary_dir beside it): the old one is renamed
    aside first and removed after, so a crash leaves the old or the new folder whole, never a mix."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    faults.point(f"write.{folder.name}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


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


# -- where outputs may go ------------------------------------------------------------------------------------------


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, with every symlink and `..` resolved, lies in the folder `root` (resolved likewise)."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def check_inside(root: Path, path: Path, what: str = "--output") -> Path:
    """`path` if it lies inside `root`, else a Seg3dError: names taken from data (case ids, class names) must never
    write outside the output folder, whatever they hold and whatever symlinks the folder holds."""
    if not inside(root, path):
        raise Seg3dError(
            f"refusing to write {str(path)[:200]!r}: it resolves outside {what} {root} (a name from the data with a"
            " path in it, or a symlink in the output folder); nothing was written"
        )
    return Path(path)


def nearest_existing(folder: Path) -> Path:
    """`folder` itself, or the nearest of its parents that exists: where a missing folder would be created."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def probe_writable(folder: Path) -> tuple[bool, str]:
    """Whether files can be made in `folder` (or, if it is missing, in the folder that would hold it), found by
    making one: permission bits do not tell for root, nor for a read-only mount. Creates no folder."""
    folder = Path(folder).absolute()
    probe_in = nearest_existing(folder)
    ready = (
        f"{folder} writable"
        if probe_in == folder
        else f"{folder} does not exist yet and can be created (in {probe_in})"
    )
    if not probe_in.is_dir():
        return False, f"{folder} cannot be created: {probe_in} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".seg3d-probe-", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        return False, f"{folder} cannot be written: no file can be made in {probe_in} ({err.strerror or err})"
    return True, ready


def require_output_folder(folder: Path, *, need_bytes: int = 0, what: str = "--output") -> Path:
    """Refuse, before any compute, an output folder that cannot be made or written, or whose file system has less
    than `need_bytes` free (plus a margin for the temporaries of atomic writes)."""
    ok, detail = probe_writable(folder)
    if not ok:
        raise Seg3dError(f"{what} {detail}; choose another {what}")
    free = shutil.disk_usage(nearest_existing(folder)).free
    need = int(need_bytes) + FREE_SPACE_MARGIN
    if free < need:
        raise Seg3dError(
            f"{what} {folder}: only {free / 2**20:,.1f} MiB free on its file system, and about {need / 2**20:,.1f} MiB"
            f" are needed; free some space or choose another {what}"
        )
    return Path(folder)


FREE_SPACE_MARGIN = 16 * 2**20  # temporaries, figures, metadata: more than any small output needs


def atomic_write_all(writes: list[tuple[Path, Callable[[Path], object]]]) -> None:
    """Several files that belong together (metrics.csv and metrics.json): every temporary is written and synced
    first, and only then are they renamed into place, so a full disk or an error while writing leaves none of them,
    not one without the other. (Renames need no space; only a crash between two renames can split the pair.)"""
    done: list[tuple[Path, Path]] = []
    try:
        for path, write in writes:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            done.append((path, Path(tmp_name)))
            write(Path(tmp_name))
            with open(tmp_name, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o666 & ~umask())
        for path, tmp in done:
            faults.point(f"write.{path.name}")
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        for _, tmp in done:
            tmp.unlink(missing_ok=True)
