"""Hostile files (issue 12, classes 4, 9, 10 and 11), through the console script as a user meets them.

- Memory follows the file, not the header (4): header bombs (a 66-byte gzip declaring 32767 x 32767 x 2 voxels, a
  header over the voxel limit, DICOM files declaring 40000 x 40000 pixels) and an image whose 500 mm voxels would
  resample to 1e10 voxels, each run by `seg3d infer` / `seg3d check-data` in a child process: exit 2, one line naming
  both numbers, nothing written, the input unchanged, and the child's peak memory (its own rusage, ru_maxrss in KiB,
  from os.wait4) under 1 GiB.
- Units and ranges (10): a metre and a micrometre copy of the real CT give the mm original's mask in world
  coordinates, and a label map in the input's own unit that overlays it; raw scanner values and an MR-like image are
  refused by infer in one line, by check-data's own rule.
- The input read once (11): the input replaced or rewritten while the network runs (the fault point infer.case)
  gives the mask in the geometry of the file as read, exit 0; what must look at the input again (an overlay, a DICOM
  SEG's sources) refuses the case in one line, before anything is written.
- Names that do not lie (9): `--output x.nii` is an uncompressed NIfTI-1 file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline import faults
from pipeline.cli import main
from pipeline.imageio import read_volume
from tests.pipeline.test_dicomio import write_series
from tests.pipeline.test_infer import _series_with_uids

SEG3D = str(Path(sys.executable).with_name("seg3d"))
GIB_KIB = 1 << 20  # ru_maxrss is in KiB on Linux
TIMEOUT_S = 300
AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, -8.0], [0, 0, 2.5, -15.0], [0, 0, 0, 1]])


def ct(shape=(40, 36, 12)) -> np.ndarray:
    """A small CT in HU: air around a soft-tissue body with some fat."""
    rng = np.random.default_rng(0)
    image = np.full(shape, -1000, dtype=np.int16)
    image[5:-5, 5:-5, :] = 40 + rng.integers(-20, 20, (shape[0] - 10, shape[1] - 10, shape[2]), dtype=np.int16)
    image[5:8, 5:-5, :] = -100
    return image


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def sha(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def one_line(code: int, err: list[str], prefix: str) -> str:
    assert code == 2 and len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


# -- class 4: header bombs and huge spacings, in a child process with its peak memory ---------------------------------


def header_blob(shape, dtype=np.int16) -> bytes:
    """A NIfTI-1 header declaring `shape`, followed by 64 bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(AFFINE, code=1)
    header.set_qform(AFFINE, code=1)
    return header.binaryblock + b"\x00" * 4 + b"\x00" * 64


def gzip_bomb(root: Path) -> Path:
    path = root / "images" / "bad.nii.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(header_blob((32767, 32767, 2))))  # 92 bytes declaring 4.3 GB
    return path


def plain_bomb(root: Path) -> Path:
    path = root / "images" / "bad.nii"
    path.parent.mkdir(parents=True)
    path.write_bytes(header_blob((512, 512, 2000)))  # 416 bytes declaring 1 GB
    return path


def over_the_limit(root: Path) -> Path:
    path = root / "images" / "bad.nii.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(header_blob((32767, 32767, 8))))  # 8.6e9 voxels, over 2**31 whatever the file
    return path


def dicom_bomb(root: Path) -> Path:
    hu = np.full((16, 12, 3), -1000, np.int16)
    hu[4:12, 3:9] = 40
    return write_series(root / "images" / "bad", hu, rows=40000, cols=40000)  # ITK would allocate 9.6 GB


def huge_spacing(root: Path) -> Path:
    return save(root / "images" / "bad.nii.gz", ct((20, 20, 10)), np.diag([500.0, 500.0, 500.0, 1.0]))


def _label(root: Path) -> None:
    save(root / "labels" / "bad.nii.gz", np.zeros((4, 4, 4), np.uint8))


BOMBS = {
    # name: (builder, commands, words of the one line)
    "gzip header bomb": (
        gzip_bomb,
        ("infer", "check-data"),
        ("declares 2.15e+09 voxels, 4.29e+09 bytes", "-byte gzip file holds at most", "(deflate: 1032:1)"),
    ),
    "plain header bomb": (plain_bomb, ("infer",), ("declares 524,288,000 voxels", "but the file is 416 bytes")),
    "over the voxel limit": (over_the_limit, ("infer", "check-data"), ("8.59e+09 voxels, over the limit of 2.15e+09",)),
    "DICOM header bomb": (
        dicom_bomb,
        ("infer", "check-data"),
        ("3 files of 40000 x 40000", "declares 4.8e+09 voxels, over the limit of 2.15e+09"),
    ),
    "500 mm voxels": (
        huge_spacing,
        ("infer",),
        ("resampled to the model's spacing 2 x 2 x 4 mm would be", "voxels, over the limit of 2.15e+09 (2**31)"),
    ),
}


# The child's peak is measured by a small launcher that forks it and reads its rusage: a child spawned straight from
# this test process would inherit the test process's own high-water mark (Linux keeps the old address space's peak
# across exec, and subprocess spawns by vfork), so the number would fail as soon as pytest itself passed 1 GiB.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_measured(argv: list[str]) -> tuple[int, list[str], list[str], int]:
    """`seg3d ARGV` in a child process: exit code, stdout and stderr lines, and the child's peak resident memory in
    KiB (ru_maxrss of the child's own rusage, from os.wait4 in the launcher above: RUSAGE_CHILDREN would mix in
    every other child this test process has waited for)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEG3D_FAULT")}
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe, tempfile.TemporaryDirectory() as d:
        peak_file = Path(d) / "maxrss"
        launch = [sys.executable, "-S", "-c", _LAUNCHER, str(peak_file), SEG3D, *argv]
        proc = subprocess.Popen(launch, stdout=fo, stderr=fe, env=env, start_new_session=True)
        killer = threading.Timer(TIMEOUT_S, lambda: os.killpg(proc.pid, signal.SIGKILL))
        killer.start()
        try:
            proc.wait()
        finally:
            killer.cancel()
        fo.seek(0)
        fe.seek(0)
        stdout, stderr = fo.read(), fe.read()
        peak = int(peak_file.read_text()) if peak_file.is_file() else 1 << 40
    assert "Traceback" not in stdout + stderr, stderr
    return proc.returncode, stdout.strip().splitlines(), stderr.strip().splitlines(), peak


CASES = [(name, command) for name, (_, commands, _) in BOMBS.items() for command in commands]


@pytest.mark.parametrize("name, command", CASES, ids=[f"{c}-{n.replace(' ', '_')}" for n, c in CASES])
def test_a_header_bomb_is_one_line_exit_2_within_1_gib(name, command, bundle_dir, tmp_path):
    make, _, expect = BOMBS[name]
    root = tmp_path / "data"
    image = make(root)
    _label(root)
    before = sha(root)
    out = tmp_path / "out"
    if command == "infer":
        code, _, err, peak = run_measured(
            ["infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out)]
        )
        line = one_line(code, err, "seg3d infer: error: bad: ")
    else:
        code, lines, err, peak = run_measured(["check-data", str(root)])
        assert code == 2 and err == [], err
        errors = [line for line in lines if line.startswith("ERROR")]
        assert len(errors) == 1 and errors[0].startswith("ERROR  bad: "), lines
        line = errors[0]
    assert all(words in line for words in expect), line
    assert peak < GIB_KIB, f"{command} peaked at {peak / 1024:.0f} MiB on a {name}"
    assert files(out) == [], "a refused case wrote something"
    assert sha(root) == before, "the input changed"


def test_check_data_reads_a_500_mm_image_within_1_gib(tmp_path):
    """check-data has no model spacing to resample to: the image is read as it is (small), and nothing allocates
    what a resampling would."""
    root = tmp_path / "data"
    huge_spacing(root)
    label = np.zeros((20, 20, 10), np.uint8)
    label[8:12, 8:12, 4:6] = 1
    save(root / "labels" / "bad.nii.gz", label, np.diag([500.0, 500.0, 500.0, 1.0]))
    code, lines, err, peak = run_measured(["check-data", str(root)])
    assert code == 0 and err == [] and not [line for line in lines if line.startswith("ERROR")], lines
    assert peak < GIB_KIB


def test_real_scans_stay_within_every_limit_and_pass_the_hu_rule(real_ct):
    """The limits and the HU rule refuse lies, not scans: the real CT (HU -1207..3382) and the real DICOM series are
    read and pass (test_infer.py segments both; the 512 x 512 x 1000 phantom of benchmarks/memory.py is 2.6e8
    voxels, an eighth of the limit)."""
    from pipeline import limits
    from pipeline.integrity import check_intensities

    assert 512 * 512 * 1000 < limits.MAX_VOXELS / 8 and 512 * 512 * 2000 < limits.MAX_VOXELS
    for source in (real_ct / "ct.nii.gz", real_ct / "dicom_series"):
        findings: list[tuple[str, str]] = []
        hu = check_intensities(read_volume(source).array, lambda *finding, into=findings: into.append(finding))
        assert findings == [] and hu[0] < -1000 < 1000 < hu[1], (source.name, hu, findings)


# -- class 10: units and ranges --------------------------------------------------------------------------------------


def in_unit(source: Path, out: Path, unit: str) -> Path:
    """The same scan with its header in metres or micrometres: every length divided, the unit declared."""
    img = nib.load(source)
    scale = {"meter": 1000.0, "micron": 0.001}[unit]
    affine = img.affine.copy()
    affine[:3] /= scale
    copy = nib.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header.copy())
    copy.set_qform(affine, code=int(img.header["qform_code"]) or 1)
    copy.set_sform(affine, code=int(img.header["sform_code"]) or 1)
    copy.header.set_xyzt_units(unit)
    nib.save(copy, out)
    return out


@pytest.fixture(scope="module")
def mm_mask(bundle_dir, tmp_path_factory) -> tuple[Path, Path]:
    from tests.conftest import REAL_CT

    if not REAL_CT.is_dir():
        pytest.skip(f"real CT data not found at {REAL_CT}")
    folder = tmp_path_factory.mktemp("mm")
    # A 72 x 64 x 20 block of the real CT (3 mm voxels: the abdomen's centre), with its own affine: the network's
    # time is the test's.
    source = folder / "ct.nii.gz"
    nib.save(nib.load(REAL_CT / "ct_small.nii.gz").slicer[25:97, 18:82, 5:25], source)
    out = folder / "mask.nii.gz"
    assert main(["infer", "--model", str(bundle_dir), "--input", str(source), "--output", str(out)]) == 0
    return source, out


@pytest.mark.parametrize("unit", ["meter", "micron"])
def test_a_metre_or_micrometre_header_gives_the_mm_originals_mask(bundle_dir, mm_mask, tmp_path, unit, capfd):
    source, reference = mm_mask
    image = in_unit(source, tmp_path / "ct_unit.nii.gz", unit)
    assert nib.load(image).header.get_zooms()[0] == pytest.approx(3.0 / {"meter": 1000, "micron": 0.001}[unit])
    out = tmp_path / "mask.nii.gz"
    capfd.readouterr()
    assert main(["infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out)]) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spatial unit is" in err[0] and "converted to mm" in err[0], err
    # In world mm, the same grid as the mm original's mask, and the same mask: up to the float32 rounding of 0.003 m
    # in the header (1e-7 of a voxel), which could flip an exact tie of this untrained network (none here; 46 of
    # 1.4e6 voxels for the whole CT). Read as mm, the metre copy was a 0.2 mm wide volume: nothing alike.
    got, want = read_volume(out, kind="label"), read_volume(reference, kind="label")
    assert got.array.shape == want.array.shape
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-4)
    assert np.mean(got.array == want.array) > 0.9999, int((got.array != want.array).sum())
    # In the file, the input's own unit: the mask overlays its input exactly in any viewer.
    written, given = nib.load(out), nib.load(image)
    assert written.header.get_xyzt_units()[0] == unit
    np.testing.assert_allclose(written.affine, given.affine, rtol=1e-6, atol=1e-9)


def raw_scanner_units(root: Path) -> Path:
    return save(root / "bad.nii.gz", (ct() + 1024).astype(np.uint16))  # stored values, no rescale: 0..4095 range


def mr_like(root: Path) -> Path:
    rng = np.random.default_rng(1)
    image = np.zeros((40, 36, 12), np.int16)
    image[5:-5, 5:-5] = rng.integers(600, 800, (30, 26, 12))  # MR-like: 0 outside, arbitrary positive inside
    return save(root / "bad.nii.gz", image)


@pytest.mark.parametrize(
    "make, expect",
    [
        (raw_scanner_units, "intensities 24..1083 hold no negative value"),
        (mr_like, "intensities 0..799 hold no negative value"),
    ],
    ids=["raw-scanner-units", "MR-like"],
)
def test_images_not_in_hu_are_refused_by_infer_in_one_line(bundle_dir, tmp_path, capfd, make, expect):
    image = make(tmp_path / "in")
    before = sha(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out)])
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err
    line = one_line(code, captured.err.strip().splitlines(), "seg3d infer: error: bad: image bad.nii.gz: ")
    assert expect in line and "not a CT (MR?)" in line and "RescaleSlope + RescaleIntercept" in line, line
    assert files(out) == [] and sha(tmp_path / "in") == before  # check-data's side: test_integrity.py's DEFECTS


def test_a_hu_warning_is_one_warning_line_and_the_case_is_segmented(bundle_dir, tmp_path, capfd):
    """A tight crop with fat but no air: usable, and said once, as check-data says it."""
    image = save(tmp_path / "bad.nii.gz", np.maximum(ct(), -200).astype(np.int16))
    out = tmp_path / "out.nii.gz"
    code = main(["infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith("seg3d infer: warning: bad: image bad.nii.gz: no air below -900 HU (range -200..59)")
    assert out.is_file()


# -- class 11: the input read once -----------------------------------------------------------------------------------


def _other_scan(path: Path) -> Path:
    """Another scan of the same shape, 40 mm away and at another spacing: a mask with its affine would be wrong."""
    moved = np.diag([1.2, 1.2, 3.0, 1.0])
    moved[:3, 3] = (30.0, 40.0, 25.0)
    return save(path, ct(), moved)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, f"infer ended before the fault point: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path.name} not reached"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_an_input_replaced_while_the_network_runs_gives_the_mask_of_the_file_as_read(bundle_dir, tmp_path, how):
    """`seg3d infer` paused right after the network (SEG3D_FAULT=infer.case:1:wait); meanwhile the input is replaced
    by another scan (a new inode under its name) or rewritten in place. The mask lies where the scan it was computed
    from lies: the header as read, never the new file's."""
    image = save(tmp_path / "in" / "case.nii.gz", ct())
    first = nib.load(image)
    gates = tmp_path / "gates"
    gates.mkdir()
    env = {**os.environ, "SEG3D_FAULT": "infer.case:1:wait", "SEG3D_FAULT_DIR": str(gates)}
    out = tmp_path / "out.nii.gz"
    command = [SEG3D, "infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        _wait_for(gates / "infer.case.1.reached", proc)
        other = _other_scan(tmp_path / "other.nii.gz")
        if how == "replaced":
            other.replace(image)
        else:
            image.write_bytes(other.read_bytes())
        (gates / "infer.case.1.go").touch()
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    mask = nib.load(out)
    assert mask.shape == first.shape
    np.testing.assert_allclose(mask.affine, first.affine, atol=1e-6)
    assert not np.allclose(nib.load(image).affine, first.affine), "the input was not changed by the test"


@pytest.fixture
def replace_at_fault_point(monkeypatch):
    """Runs `act` where infer's fault point infer.case is (after the network, before any write), in this process."""

    def arm(act):
        def point(name: str) -> None:
            if name == "infer.case":
                act()

        monkeypatch.setattr(faults, "point", point)

    return arm


def test_an_overlay_of_an_input_replaced_during_the_case_is_refused_before_anything_is_written(
    bundle_dir, tmp_path, capfd, replace_at_fault_point
):
    """The overlay shows the image under the mask, so it reads the input again: only if it is the file that was
    read. Refused in one line, and the label map is not written either: a case is whole or absent."""
    image = save(tmp_path / "in" / "case.nii.gz", ct())
    replace_at_fault_point(lambda: _other_scan(tmp_path / "other.nii.gz").replace(image))
    out = tmp_path / "out"
    code = main(["infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out / "case.nii.gz"),
                 "--overlays"])  # fmt: skip
    line = one_line(code, capfd.readouterr().err.strip().splitlines(), "seg3d infer: error: case: image ")
    assert "was replaced or rewritten after it was read" in line and "nothing was written" in line, line
    assert files(out) == []


def test_a_dicom_seg_of_a_series_changed_during_the_case_is_refused_before_anything_is_written(
    bundle_dir, real_ct, tmp_path, capfd, replace_at_fault_point
):
    """The SEG references the series' slices by UID: they are read again for it, and must be the slices that were
    segmented. A slice copied over (new inode) while the network ran refuses the case; nothing is written."""
    series = _series_with_uids(real_ct, tmp_path / "series")
    target = sorted(series.glob("*.dcm"))[5]

    def copy_over() -> None:
        shutil.copy(target, tmp_path / "slice.tmp")
        (tmp_path / "slice.tmp").replace(target)

    replace_at_fault_point(copy_over)
    out = tmp_path / "out"
    code = main(["infer", "--model", str(bundle_dir), "--input", str(series), "--output", str(out), "--dicom-seg"])
    line = one_line(code, capfd.readouterr().err.strip().splitlines(), "seg3d infer: error: series: image ")
    assert "was replaced or rewritten after it was read" in line, line
    assert files(out) == []


# -- class 9: names that do not lie ----------------------------------------------------------------------------------


def test_output_named_nii_is_an_uncompressed_nifti_and_nii_gz_a_gzip(bundle_dir, tmp_path):
    image = save(tmp_path / "in" / "case.nii.gz", ct())
    masks = {}
    for name in ("mask.nii", "mask.nii.gz"):
        out = tmp_path / name
        assert main(["infer", "--model", str(bundle_dir), "--input", str(image), "--output", str(out)]) == 0
        masks[name] = out
    with open(masks["mask.nii"], "rb") as f:
        head = f.read(352)
    assert int.from_bytes(head[:4], "little") == 348 and head[344:348] == b"n+1\x00", "not an uncompressed NIfTI-1"
    assert masks["mask.nii.gz"].read_bytes()[:2] == b"\x1f\x8b"
    plain, packed = nib.load(masks["mask.nii"]), nib.load(masks["mask.nii.gz"])
    assert isinstance(plain, nib.Nifti1Image) and plain.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(plain.dataobj), np.asanyarray(packed.dataobj))
    np.testing.assert_allclose(plain.affine, packed.affine)
    assert masks["mask.nii"].stat().st_size == 352 + plain.shape[0] * plain.shape[1] * plain.shape[2]
