"""DICOM input as hospitals send it (pipeline/dicom_input.py): a folder of several series (picked by --series, or
refused with the list), a zip of a series (and hostile zips), slices in any order, a gantry tilt and an uneven gap.
Every refusal is one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline import dicom_input
from pipeline.cli import main
from pipeline.errors import Seg3dError
from pipeline.imageio import read_volume
from pipeline.infer import run_inference
from tests.pipeline._ct_series import files_under, phantom_hu, write_ct_series, zip_folder


@pytest.fixture(scope="module")
def two_series(tmp_path_factory) -> tuple[Path, dict, dict]:
    """One folder holding a 8-slice and a 6-slice series of one study (as a PACS export puts them)."""
    folder = tmp_path_factory.mktemp("export") / "study"
    first = write_ct_series(folder, phantom_hu(), description="CT Abdomen 2.5", prefix="A")
    second = write_ct_series(
        folder, phantom_hu((40, 36, 6), seed=1), description="Scout", study=first["study"], prefix="B"
    )
    return folder, first, second


def _refused(argv: list[str], capsys, out: Path) -> str:
    """Runs seg3d; asserts exit 2, one line on stderr and nothing at `out`; returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("seg3d infer: error: "), err
    assert files_under(out) == [], "nothing written"
    return err


def test_a_folder_of_two_series_is_refused_with_their_uids_descriptions_and_slice_counts(
    two_series, bundle_dir, tmp_path, capsys
):
    folder, first, second = two_series
    out = tmp_path / "out"
    line = _refused(["infer", "--model", str(bundle_dir), "--input", str(folder), "--output", str(out)], capsys, out)
    assert "2 DICOM series" in line and "--series UID" in line
    assert f"{first['series']} (CT, 'CT Abdomen 2.5', 8 files)" in line
    assert f"{second['series']} (CT, 'Scout', 6 files)" in line


def test_an_unknown_series_uid_is_refused_with_the_list(two_series, bundle_dir, tmp_path, capsys):
    folder, first, _ = two_series
    out = tmp_path / "out"
    argv = ["infer", "--model", str(bundle_dir), "--input", str(folder), "--output", str(out), "--series", "1.2.3"]
    line = _refused(argv, capsys, out)
    assert "--series '1.2.3' is not in" in line and first["series"] in line


def test_series_picks_one_series_and_gives_what_that_series_alone_gives(two_series, bundle_dir, tmp_path):
    folder, _, second = two_series
    alone = tmp_path / "alone" / "study"
    alone.mkdir(parents=True)
    for path in folder.glob("B*.dcm"):
        shutil.copy(path, alone / path.name)
    picked = run_inference(bundle_dir, folder, tmp_path / "picked", series=second["series"], progress=False)
    reference = run_inference(bundle_dir, alone, tmp_path / "ref", progress=False)
    assert picked.done == reference.done == ["study"], "the case id is the folder's name"
    a, b = nib.load(tmp_path / "picked" / "study.nii.gz"), nib.load(tmp_path / "ref" / "study.nii.gz")
    assert a.shape == (40, 36, 6)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in folder.iterdir() if p.is_file())


def test_a_zip_of_a_series_gives_what_the_folder_gives(bundle_dir, tmp_path):
    series = tmp_path / "series"
    write_ct_series(series, phantom_hu())
    archive = zip_folder(series, tmp_path / "scan 7.zip")
    from_zip = run_inference(bundle_dir, archive, tmp_path / "z", progress=False)
    from_folder = run_inference(bundle_dir, series, tmp_path / "f", progress=False)
    assert from_zip.done == ["scan 7"] and from_folder.done == ["series"]
    a, b = nib.load(tmp_path / "z" / "scan 7.nii.gz"), nib.load(tmp_path / "f" / "series.nii.gz")
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine)


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _two_series_zip(tmp_path: Path) -> Path:
    folder = tmp_path / "two"
    first = write_ct_series(folder, phantom_hu(), prefix="A")
    write_ct_series(folder, phantom_hu((40, 36, 5)), study=first["study"], prefix="B")
    return zip_folder(folder, tmp_path / "two.zip")


def _symlink_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("DICOM/IM0001")
        info.external_attr = (0o120777 << 16) | 0  # a symbolic link entry, as `zip -y` stores one
        zf.writestr(info, "/etc/passwd")
    return path


HOSTILE = {
    "empty": (lambda p: _zip(p / "x.zip", {}), "is empty"),
    "only folders": (lambda p: _zip(p / "x.zip", {"DICOM/": b""}), "is empty"),
    "parent path": (lambda p: _zip(p / "x.zip", {"../../evil.dcm": b"x"}), "points outside the archive"),
    "absolute path": (lambda p: _zip(p / "x.zip", {"/tmp/evil.dcm": b"x"}), "points outside the archive"),
    "windows path": (lambda p: _zip(p / "x.zip", {"..\\..\\evil.dcm": b"x"}), "points outside the archive"),
    "link": (lambda p: _symlink_zip(p / "x.zip"), "has a link"),
    "not a zip": (lambda p: (p / "x.zip").write_bytes(b"PK\x03\x04 not really") and p / "x.zip", "not a readable zip"),
    "no dicom": (lambda p: _zip(p / "x.zip", {"README.txt": b"hello"}), "no DICOM series in"),
    "two series": (_two_series_zip, "2 DICOM series in"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_zip_is_one_line_exit_2_and_nothing_written_anywhere(kind, bundle_dir, tmp_path, capsys):
    make, expected = HOSTILE[kind]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    archive = make(inputs)
    before = files_under(tmp_path)
    out = tmp_path / "out"
    line = _refused(["infer", "--model", str(bundle_dir), "--input", str(archive), "--output", str(out)], capsys, out)
    assert expected in line
    assert files_under(tmp_path) == before, "nothing extracted beside the zip or anywhere under the test folder"


def test_a_zip_bomb_is_refused_before_a_byte_is_extracted(bundle_dir, tmp_path, capsys, monkeypatch):
    """4 MiB of zeros deflate to 4 KiB; with the limit at 1 MiB the declared size alone refuses it (the real limit,
    8 GiB and the free space, works the same way on declared sizes)."""
    archive = _zip(tmp_path / "bomb.zip", {"a.dcm": bytes(4 << 20)})
    assert archive.stat().st_size < 64 << 10
    monkeypatch.setattr(dicom_input, "MAX_ZIP_BYTES", 1 << 20)
    staged = []
    monkeypatch.setattr(dicom_input, "_extract_member", lambda *a: staged.append(a))
    out = tmp_path / "out"
    line = _refused(["infer", "--model", str(bundle_dir), "--input", str(archive), "--output", str(out)], capsys, out)
    assert "would expand to 4,194,304 bytes" in line and "zip bomb" in line and staged == []


def test_a_member_longer_than_it_declares_is_refused(tmp_path):
    """A central directory that understates a member's size: the copy stops at the declared size and zipfile's
    length/CRC check refuses the rest."""
    archive = _zip(tmp_path / "lie.zip", {"a.dcm": b"x" * 5000})
    data = bytearray(archive.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (100).to_bytes(4, "little")  # uncompressed size in the central directory
    archive.write_bytes(bytes(data))
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(Seg3dError, match=r"not a readable zip \(Bad CRC|holds more than it declares"):
        dicom_input.extract_zip(archive, staging=staging)


def test_series_with_a_nifti_input_is_refused(real_ct, bundle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["infer", "--model", str(bundle_dir), "--input", str(real_ct / "ct_small.nii.gz"), "--output", str(out)]
    assert "--series picks a series of a DICOM folder or zip" in _refused([*argv, "--series", "1.2.3"], capsys, out)


def test_slices_in_any_order_read_as_the_ordered_series(tmp_path):
    hu = phantom_hu()
    write_ct_series(tmp_path / "ordered", hu)
    write_ct_series(tmp_path / "shuffled", hu, shuffle=True)
    names = sorted(p.name for p in (tmp_path / "shuffled").iterdir())
    import pydicom

    positions = [float(pydicom.dcmread(tmp_path / "shuffled" / n).ImagePositionPatient[2]) for n in names]
    assert positions != sorted(positions), "the files really are out of order"
    a, b = read_volume(tmp_path / "ordered"), read_volume(tmp_path / "shuffled")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)
    np.testing.assert_array_equal(a.array, hu.astype(np.float32))  # (x, y, z) with z along ImagePositionPatient


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"tilt_mm_per_slice": 0.9}, "gantry tilt of about"), ({"gap_after": 3}, "uneven slice gaps, 2.5 to 5 mm")],
)
def test_a_tilted_or_gapped_series_is_refused_naming_the_problem(options, expected, bundle_dir, tmp_path, capsys):
    series = tmp_path / "series"
    write_ct_series(series, phantom_hu(), **options)
    out = tmp_path / "out"
    assert main(["infer", "--model", str(bundle_dir), "--input", str(series), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err
    assert files_under(out) == []


def test_a_picked_series_is_read_through_links_to_the_original_files(two_series, tmp_path):
    folder, first, _ = two_series
    staging = tmp_path / "staging"
    staging.mkdir()
    case, picked = dicom_input.dicom_input(folder, series=first["series"], staging=staging)
    assert case == "study" and picked.parent == staging
    targets = sorted(os.path.realpath(p) for p in picked.iterdir())
    assert targets == sorted(os.path.realpath(p) for p in folder.glob("A*.dcm"))
