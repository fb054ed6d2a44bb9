"""Hostile file systems and interruptions (issue 12, classes 6, 8, 12 and 13): read-only and full output file systems
(real tmpfs mounts, root only), an output parent that is a file, a FIFO as input, a folder where a file is named, a
disk that fills up in the middle of a pair of files, `seg3d export` killed between its two files, SIGTERM during
inference and training, and spreadsheet formulas in the CSVs seg3d writes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from pipeline.bundle import load_checkpoint
from pipeline.fileio import FORMULA_STARTS, atomic_write_all, atomic_write_csv
from pipeline.run_folder import write_run_files
from pipeline.synthetic import synthesize
from tests.pipeline._hostile import SEG3D, fill, refused, small_ct, tmpfs, tree

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory) -> Path:
    return small_ct(tmp_path_factory.mktemp("ct") / "ct.nii.gz")


def _commands(out: Path, ct: Path, bundle: Path, tmp: Path) -> dict[str, list[str]]:
    """Each writing command, with its output under `out`."""
    (tmp / "data").mkdir(exist_ok=True)
    return {
        "infer": ["infer", "--model", str(bundle), "--input", str(ct), "--output", str(out / "pred")],
        "evaluate": ["evaluate", "--pred", str(ct), "--ref", str(ct), "--output", str(out / "eval")],
        "export": ["export", "--model", str(bundle), "--format", "torchscript", "--output", str(out / "m.ts")],
        "synth": ["synth", "--out", str(out / "synth"), "--cases", "1"],
        "train": ["train", "--config", "configs/unet.yaml", "--data", str(tmp / "data"), "--output", str(out / "r")],
    }


@pytest.mark.parametrize("command", ["infer", "evaluate", "export", "synth", "train"])
def test_a_read_only_output_file_system_is_refused_before_any_compute(command, ct_file, bundle_dir, tmp_path, capfd):
    with tmpfs(tmp_path / "ro", "4m", read_only=True) as mount:
        argv = _commands(mount, ct_file, bundle_dir, tmp_path)[command]
        line = refused(argv, capfd)
        assert "Read-only file system" in line, line
        assert tree(mount) == {}


@pytest.mark.parametrize("command", ["infer", "evaluate", "export", "synth"])
def test_a_full_output_file_system_is_refused_before_any_compute(command, ct_file, bundle_dir, tmp_path, capfd):
    with tmpfs(tmp_path / "full", "2m") as mount:
        fill(mount, leave_bytes=64 * 1024)
        before = tree(mount)
        line = refused(_commands(mount, ct_file, bundle_dir, tmp_path)[command], capfd)
        assert "MiB free on its file system" in line and "are needed" in line, line
        assert tree(mount) == before


@pytest.mark.parametrize("command", ["infer", "evaluate", "export", "synth", "train"])
def test_an_output_under_a_file_is_refused(command, ct_file, bundle_dir, tmp_path, capfd):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    line = refused(_commands(blocker, ct_file, bundle_dir, tmp_path)[command], capfd)
    assert "is a file, not a folder" in line, line
    assert blocker.read_text() == "not a folder"


def test_a_folder_where_a_nifti_file_is_named_is_refused(ct_file, bundle_dir, tmp_path, capfd):
    (tmp_path / "x.nii.gz").mkdir()
    line = refused(
        ["infer", "--model", str(bundle_dir), "--input", str(ct_file), "--output", str(tmp_path / "x.nii.gz")], capfd
    )
    assert "is a folder, but names a NIfTI file" in line and list((tmp_path / "x.nii.gz").iterdir()) == []


def test_a_fifo_as_input_is_refused_without_waiting_for_a_writer(bundle_dir, tmp_path):
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    run = subprocess.run(
        [SEG3D, "infer", "--model", str(bundle_dir), "--input", str(fifo), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,  # a read of the FIFO would block for ever; the test would fail here, not hang
    )
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(err) == 1 and "neither a regular file nor a folder" in err[0], run.stderr
    assert not (tmp_path / "out").exists()


def test_a_disk_that_fills_between_a_pair_of_files_leaves_neither(tmp_path):
    with tmpfs(tmp_path / "small", "256k") as mount:
        small, big = mount / "metrics.csv", mount / "metrics.json"
        with pytest.raises(OSError):
            atomic_write_all(
                [(small, lambda tmp: tmp.write_text("case,dice\n")), (big, lambda tmp: tmp.write_bytes(b"x" * 400_000))]
            )
        assert tree(mount) == {}, "neither file, and no temporary"


def test_a_disk_that_fills_while_a_run_folder_is_made_leaves_no_half_run(tmp_path):
    """A full disk while the run's files are written must not leave a config.yaml (a 0-byte one used to block every
    later run of the folder and break --resume)."""
    from pipeline.config import load_config

    source = tmp_path / "big_source.yaml"
    source.write_text("# " + "x" * 400_000 + "\n")
    with tmpfs(tmp_path / "small", "256k") as mount:
        run_dir = mount / "run"
        run_dir.mkdir()
        with pytest.raises(OSError):
            write_run_files(
                run_dir,
                cfg=load_config(None),
                split={"train": [], "val": []},
                preprocessing="{}",
                config_path=source,
                run_info={},
                fresh=True,
            )
        assert tree(run_dir) == {}


def test_export_killed_between_its_two_files_is_finished_by_a_rerun(bundle_dir, tmp_path):
    out = tmp_path / "model.ts"
    argv = [SEG3D, "export", "--model", str(bundle_dir), "--format", "torchscript", "--output", str(out)]
    env = {**os.environ, "SEG3D_FAULT": "export.model_written:1:kill"}
    killed = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert out.is_file() and not out.with_name("model.ts.json").exists()
    env.pop("SEG3D_FAULT")
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    sidecar = json.loads(out.with_name("model.ts.json").read_text())
    import hashlib

    assert sidecar["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts", "model.ts.json"], "no temporaries left"


def test_export_does_not_replace_a_foreign_file_without_its_sidecar(bundle_dir, tmp_path, capfd):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"someone else's file")
    line = refused(["export", "--model", str(bundle_dir), "--format", "onnx", "--output", str(out)], capfd)
    assert "exists; --overwrite replaces it" in line and out.read_bytes() == b"someone else's file"


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path.name} not reached"
        time.sleep(0.1)


def _terminated(argv: list[str], point: str, gates: Path) -> subprocess.CompletedProcess:
    """Run seg3d until it reaches the fault point `point` (NAME:N), send it SIGTERM there, and wait for its end."""
    gates.mkdir(exist_ok=True)
    env = {**os.environ, "SEG3D_FAULT": f"{point}:wait", "SEG3D_FAULT_DIR": str(gates)}
    proc = subprocess.Popen([SEG3D, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    name, count = point.split(":")
    _wait_for(gates / f"{name}.{count}.reached", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_sigterm_during_inference_ends_cleanly_with_no_output_of_the_case(ct_file, bundle_dir, tmp_path):
    out = tmp_path / "out"
    done = _terminated(
        ["infer", "--model", str(bundle_dir), "--input", str(ct_file), "--output", str(out)],
        "infer.case:1",
        tmp_path / "g",
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("seg3d infer: terminated (SIGTERM)") and "Traceback" not in done.stderr
    assert [p for p in tree(out) if p != "overlays"] == [], "no output and no temporary of the interrupted case"


@pytest.mark.slow
def test_sigterm_during_training_marks_the_run_killed_and_resume_finishes_it(tmp_path):
    data = tmp_path / "data"
    synthesize(data, cases=3, seed=4, test_cases=0)
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny = ["model.channels=[4, 8, 16]", "model.strides=[2, 2]", "data.patch_size=[32, 32, 16]"]
    tiny += ["data.target_spacing=[2.0, 2.0, 4.0]", "train.epochs=2", "train.iterations_per_epoch=3", "train.folds=3"]
    argv = ["train", "--config", "configs/unet.yaml", "--data", str(data), "--output", str(run_dir)]
    argv += ["--tracking-uri", uri, *tiny]
    done = _terminated(argv, "train.step:5", tmp_path / "g")  # epoch 2, after epoch 1's checkpoint
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert "seg3d train: terminated (SIGTERM)" in done.stderr.strip().splitlines()[-1]
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "KILLED"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = subprocess.run(
        [SEG3D, "train", "--data", str(data), "--output", str(run_dir), "--tracking-uri", uri, "--resume"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path):
    hostile = ['=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(1)", "\tx", "\rx"]
    path = tmp_path / "t.csv"
    atomic_write_csv(path, ["case", "value"], [[cell, -0.5] for cell in hostile] + [["pancreas_001", 1.0]])
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == ["'" + cell for cell in hostile] + ["pancreas_001"]
    assert all(r[1] in ("-0.5", "1.0") for r in rows[1:]), "numbers stay numbers"
    assert not any(r[0].startswith(FORMULA_STARTS) for r in rows[1:])
