"""Shared by the hostile-input suites: run a command as a user would and demand a clean refusal; fingerprints of a
folder tree (to prove nothing was written or changed); real small file systems (tmpfs, read-only or full) where
root may mount them."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.synthetic import CaseSpec, make_phantom, to_nifti

SEG3D = str(Path(sys.executable).with_name("seg3d"))


def refused(argv: list[str], capfd, prefix: str | None = None) -> str:
    """Run `seg3d ARGV` in-process; assert exit 2, exactly one line on stderr and no traceback; return the line."""
    code = main(argv)
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert "Traceback" not in captured.out + captured.err, captured.err[-2000:]
    assert code == 2 and len(err) == 1, (code, err)
    prefix = prefix or f"seg3d {argv[0]}: error: "
    assert err[0].startswith(prefix), err[0]
    return err[0]


def tree(root: Path) -> dict[str, str]:
    """Every file below `root` (symlinks not followed) -> its SHA-256; folders as entries of their own."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def small_ct(path: Path, seed: int = 3, shape=(64, 64, 24), spacing=(2.0, 2.0, 4.0)) -> Path:
    """A small phantom CT (a body with organs, in HU) written as NIfTI."""
    spec = CaseSpec(shape=shape, spacing=spacing, orientation="RAS", tumour=False, decoys=2)
    image, _, affine = make_phantom(np.random.default_rng(seed), spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(to_nifti(image, affine, "RAS"), path)
    return path


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of `size` at `mount_point` (root only; the test skips with the reason otherwise)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'}); it needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(folder: Path, leave_bytes: int = 0) -> None:
    """Fill the file system of `folder` until at most `leave_bytes` are free."""
    import shutil

    free = shutil.disk_usage(folder).free
    block = b"\0" * (1 << 16)
    with open(folder / "filler", "wb") as f:
        try:
            while free > leave_bytes:
                f.write(block[: min(len(block), free - leave_bytes)])
                f.flush()
                free = shutil.disk_usage(folder).free
        except OSError:
            pass
