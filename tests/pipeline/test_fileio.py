"""pipeline.fileio: atomic writes, the sweep of what a killed write left, file names."""

from __future__ import annotations

import os

import pytest

from pipeline.fileio import atomic_write, atomic_write_csv, is_nifti, nifti_stem, probe_writable, remove_temporaries


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, lambda p: p.write_bytes(b"old"))

    def broken(p):
        p.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"], "temporary file left behind"


def test_atomic_write_gives_the_file_the_mode_a_plain_write_would(tmp_path):
    """mkstemp makes owner-only files; outputs must be readable by whoever the umask allows (a container's UID writes
    masks that the hospital's users read)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    atomic_write(atomic, lambda tmp: tmp.write_text("x"))
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_targeted_sweep_removes_only_the_named_files_temporaries(tmp_path):
    """An output folder shared with other writers: only the temporaries of our own outputs go."""
    ours, theirs, plain = (
        tmp_path / ".case1.nii.gz.ab12cd34.nii.gz",
        tmp_path / ".other.nii.gz.ab12cd34.nii.gz",
        tmp_path / ".hidden",
    )
    for path in (ours, theirs, plain):
        path.write_text("x")
    assert remove_temporaries(tmp_path, names=["case1.nii.gz"]) == [ours.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([theirs.name, plain.name])
    assert remove_temporaries(tmp_path) == [theirs.name], "a plain hidden file is not a temporary"


def test_csv_round_trip(tmp_path):
    import csv

    atomic_write_csv(tmp_path / "t.csv", ["case", "dice"], [["a", 0.5], ["b, c", 1]])
    with open(tmp_path / "t.csv", newline="") as f:
        assert list(csv.reader(f)) == [["case", "dice"], ["a", "0.5"], ["b, c", "1"]]


@pytest.mark.parametrize(
    ("name", "nifti", "stem"),
    [
        ("a.nii.gz", True, "a"),
        ("A.NII", True, "A"),
        ("a.nii.gz.bak", False, "a.nii.gz.bak"),
        ("x.tar.gz", False, "x.tar.gz"),
    ],
)
def test_nifti_names(name, nifti, stem, tmp_path):
    assert is_nifti(tmp_path / name) is nifti
    assert nifti_stem(tmp_path / name) == stem


def test_writable_makes_a_file_to_find_out(tmp_path):
    assert probe_writable(tmp_path) == (True, f"{tmp_path} writable")
    ok, detail = probe_writable(tmp_path / "new" / "deeper")
    assert ok and f"can be created (in {tmp_path})" in detail
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # nothing left behind
    (tmp_path / "f").write_text("x")
    assert probe_writable(tmp_path / "f")[0] is False
    if os.geteuid() != 0:  # root writes through permission bits, so only a regular user can see this one
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert probe_writable(locked)[0] is False
