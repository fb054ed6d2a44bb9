"""The GPU check's kit, proven on the CPU before a GPU machine is lent (benchmarks/gpu/).

What these tests can prove here, on the host's Python (3.11), about the device's (CPython 3.12, torch 2.11 + CUDA 13):
- the cp312 set is complete: every requirement of every carried wheel, for CPython 3.12 on Linux, is met by the set or
  by a package of the device (at the device's version where it is known), and pip accepts each wheel for CPython 3.12
  on manylinux x86_64; it fits the 64 MiB a device call carries, with the working tree and the real CT;
- the same pins, built for the host's Python, are all seg3d needs beyond the device's packages: installed alone with
  `pip install --no-index --no-deps --target` into an empty folder, beside a stand-in of the device's packages linked
  from .venv and no site-packages at all (`python -S`), they import `pipeline.predict`, `pipeline.train` and
  `pipeline.infer` and collect the gpu tests; and one wheel less breaks it, so the isolation is real;
- where a Python 3.12 is installed, the cp312 set's compiled wheel (pydantic-core) loads in it.
What they cannot prove: that the device's torch 2.11 runs seg3d's code (that is the device run's job), nor the
versions of the device's packages nobody read (device_packages.txt lists them by name alone).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks.gpu import report
from benchmarks.gpu.wheelset import PLATFORMS, canonical, device_packages, holds_the_pins, pins, problems, standin

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu"
HOST = f"{sys.version_info.major}.{sys.version_info.minor}"
LEFT_OUT = ("mlflow", "SimpleITK", "pydicom", "highdicom")


def _wheel_set(folder: Path, python_version: str) -> Path:
    """`folder` holding exactly the pins for `python_version`, fetched by fetch_wheels.sh when it does not."""
    if not holds_the_pins(folder, python_version):
        cmd = ["bash", str(KIT / "fetch_wheels.sh"), "--python-version", python_version, "--dest", str(folder)]
        env = os.environ | {"PYTHON": sys.executable}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode != 0 or not holds_the_pins(folder, python_version):
            reason = (proc.stderr.strip().splitlines() or ["no wheels"])[-1]
            pytest.skip(f"the wheels for CPython {python_version} could not be downloaded ({reason})")
    return folder


@pytest.fixture(scope="module")
def device_set() -> Path:
    return _wheel_set(ROOT / ".gpu" / "wheels", "3.12")


@pytest.fixture(scope="module")
def host_set() -> Path:
    return _wheel_set(ROOT / ".gpu" / "wheels-host", HOST)


def _pip_accepts_for_the_device(folder: Path, tmp_path: Path) -> list[str]:
    """The names pip would install from `folder` alone for CPython 3.12 on manylinux x86_64 (a dry run)."""
    cmd = [sys.executable, "-m", "pip", "install", "-qq", "--dry-run", "--no-index", "--no-deps", "--only-binary=:all:"]
    cmd += ["--target", str(tmp_path / "t"), "--python-version", "3.12", "--implementation", "cp"]
    cmd += ["--abi", "cp312", "--abi", "abi3", "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)]]
    cmd += ["--find-links", str(folder), "--report", str(tmp_path / "report.json"), *[r.name for r in pins("3.12")]]
    subprocess.run(cmd, check=True, timeout=300)
    return [item["metadata"]["name"] for item in json.loads((tmp_path / "report.json").read_text())["install"]]


@pytest.mark.slow
def test_the_device_set_completes_the_device_packages_and_fits_a_device_call(device_set, tmp_path):
    assert problems(device_set, "3.12") == []
    assert len(_pip_accepts_for_the_device(device_set, tmp_path)) == len(pins("3.12"))
    wheels = sum(p.stat().st_size for p in device_set.glob("*.whl"))
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    tree = sum((ROOT / os.fsdecode(f)).stat().st_size for f in listed if f and (ROOT / os.fsdecode(f)).is_file())
    ct = ROOT.parent / "shared" / "data" / "real_ct" / "ct.nii.gz"
    carried = wheels + tree + (ct.stat().st_size if ct.exists() else 0)
    assert carried < 48 * 2**20, f"{carried / 2**20:.1f} MiB: keep a margin under the 64 MiB a device call carries"
    assert not {n.lower() for n in LEFT_OUT} & {p.name.split("-")[0].lower() for p in device_set.glob("*.whl")}


@pytest.mark.slow
def test_a_set_missing_a_requirement_is_found(device_set, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for wheel in device_set.glob("*.whl"):
        if not wheel.name.startswith("pydantic_core"):
            shutil.copy(wheel, partial)
    found = problems(partial, "3.12")
    assert any(p.startswith("pydantic 2.14.4 needs pydantic-core==2.50.5") for p in found), found
    assert "pydantic-core: pinned in wheels.txt but not in" in " ".join(found)
    # A device without numpy: MONAI and nibabel need it, and nothing carries it.
    no_numpy = {k: v for k, v in device_packages().items() if k != "numpy"}
    assert any(p.startswith("monai 1.6.1 needs numpy") for p in problems(device_set, "3.12", device=no_numpy))


# seg3d's command modules, in a process that sees only the installed set, the stand-in and the repository.
IMPORTS = """
import json, sys
import monai, torch
import pipeline.predict, pipeline.train, pipeline.infer
print(json.dumps({"monai": monai.__file__, "torch": torch.__file__, "loaded": sorted(sys.modules)}))
"""


def _isolated(args: list[str], site: Path, devices: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(devices), str(ROOT)])
    return subprocess.run([sys.executable, "-S", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_seg3d_imports_with_the_set_and_the_device_packages_alone(host_set, tmp_path):
    devices = tmp_path / "device"
    linked = standin(devices)
    assert "torch" in linked and not {"monai", "nibabel", "pydantic", "mlflow"} & set(linked)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-qq", "--no-index", "--no-deps", "--no-compile"]
    subprocess.run([*pip, "--target", str(site), *map(str, host_set.glob("*.whl"))], check=True, timeout=300)

    proc = _isolated(["-c", IMPORTS], site, devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert Path(seen["monai"]).is_relative_to(site) and Path(seen["torch"]).is_relative_to(devices)
    assert not set(LEFT_OUT) & set(seen["loaded"]), "a command imported what the set leaves out"

    tests = [line for line in (KIT / "gpu_tests.txt").read_text().splitlines() if line and not line.startswith("#")]
    collected = _isolated(
        ["-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *tests], site, devices
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-2000:]
    selected = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert selected == set(tests), "every listed file holds gpu tests, and they collect with the set alone"

    # One wheel less: the same process must fail, naming what is missing (nothing leaks in from .venv).
    broken = tmp_path / "broken"
    shutil.copytree(site, broken)
    shutil.rmtree(broken / "annotated_types")
    proc = _isolated(["-c", IMPORTS], broken, devices)
    assert proc.returncode != 0 and "No module named 'annotated_types'" in proc.stderr


def _python312() -> str | None:
    for candidate in [
        shutil.which("python3.12"),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))),
    ]:
        if candidate and subprocess.run([candidate, "-c", "import pip"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.slow
def test_the_compiled_wheel_of_the_device_set_loads_in_a_python_3_12(device_set, tmp_path):
    python = _python312()
    if python is None:
        pytest.skip("no Python 3.12 with pip on this machine")
    site = tmp_path / "site312"
    pip = [python, "-m", "pip", "install", "-qq", "--no-index", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, *map(str, device_set.glob("*.whl"))], check=True, timeout=300)
    script = (
        f"import sys; sys.path.insert(0, {str(site)!r})\n"
        "import pydantic, pydantic_core\n"
        "class Patch(pydantic.BaseModel):\n    size: tuple[int, int, int]\n"
        "print(Patch(size=['96', 96, 96]).size, pydantic_core.__file__)\n"
    )
    proc = subprocess.run([python, "-S", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("(96, 96, 96)") and str(site) in proc.stdout


def test_the_pins_are_the_versions_make_test_runs_on():
    """wheels.txt follows docker/requirements.lock (the versions of .venv): the GPU runs what the tests ran."""
    locked = dict(
        line.split("==") for line in (ROOT / "docker" / "requirements.lock").read_text().split() if "==" in line
    )
    locked = {canonical(k): v for k, v in locked.items()}
    for pin in pins("3.12") + pins(HOST):
        if canonical(pin.name) in locked:
            assert str(pin.specifier) == f"=={locked[canonical(pin.name)]}", pin


def test_every_gpu_test_is_run_by_the_check():
    listed = {line for line in (KIT / "gpu_tests.txt").read_text().splitlines() if line and not line.startswith("#")}
    decorated = re.compile(r"^@pytest\.mark\.gpu\b", re.MULTILINE)
    marked = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if decorated.search(p.read_text())}
    assert marked <= listed, f"gpu tests that benchmarks/gpu/check.sh would not run: {sorted(marked - listed)}"
    assert all((ROOT / t).is_file() for t in listed)


# -- report.py: the check's folder -> docs/benchmarks.md ------------------------------------------------------------

ENV = {
    "date": "2026-12-01 10:00", "gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "multiprocessors": 132,
    "driver": "580.159.04", "cuda": "13.0", "cudnn": 91300, "torch": "2.11.0+cu130", "python": "3.12.3",
    "cpu": "Intel Xeon (avx2, avx512f, amx)", "cpu_cores": 16,
}  # fmt: skip
STAGES = {"load": 0.1, "preprocess": 0.1, "network": 1.2, "stitch": 0.05, "invert": 0.04, "write": 0.01}
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="0" tests="3"><testcase classname="tests.pipeline.test_gpu" name="test_a"/><testcase
classname="tests.pipeline.test_gpu" name="test_b"/><testcase classname="tests.pipeline.test_infer" name="test_c">
<failure message="boom"/></testcase></testsuite></testsuites>"""


def _results(folder: Path, env: dict) -> Path:
    """A folder as check.sh leaves it (file names and formats of the scripts that write them)."""
    folder.mkdir()
    (folder / "env.json").write_text(json.dumps(env))
    (folder / "steps.tsv").write_text("step\texit\tseconds\ninstall\t0\t4\ngpu_tests\t1\t80\ntraining\t124\t100\n")
    (folder / "gpu_tests.xml").write_text(JUNIT)
    peer = "MONAI AttentionUnet, tutorial pipeline"
    runs = [
        {"input": "big", "pipeline": peer, "precision": "fp32", "wall": 6.0},
        {"input": "big", "pipeline": "seg3d infer (attention_unet)", "precision": "bf16", "wall": 1.5},
        {"input": "big", "pipeline": peer + " + autocast", "precision": "bf16", "wall": 4.0},
    ]
    for run in runs:
        run.update(stages=STAGES, windows=1440)
    (folder / "inference_demo.json").write_text(json.dumps({"runs": runs, "dice": []}))
    (folder / "inference_demo.md").write_text("### End-to-end inference (CUDA, `configs/demo.yaml`)\n\n| a |\n|---|")
    rows = [
        {"name": "default", "wall_s": 1.5, "network_s": 1.2, "network_share": 0.8, "windows": 1440,
         "windows_per_s": 1200.0, "peak_gib": 3.1, "first_call_s": 2.0},
        {"name": "torch.compile", "compile": "default", "error": "no result within 30 s"},
    ]  # fmt: skip
    (folder / "variants_demo.json").write_text(json.dumps({"image": "big_phantom.nii.gz", "rows": rows}))
    case = {"config": "danet", "patch": [96, 96, 96], "channels_last": False, "compile": False, "fused": False}
    training = [{**case, "model": "danet", "iterations_per_s": 3.25, "peak_gib": 20.5, "first_step_s": 1.5}]
    (folder / "training.json").write_text(json.dumps({"tiny": False, "rows": training}))
    return folder


def test_the_report_writes_both_sections_with_the_goals_and_keeps_the_others(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- layers:start -->\nCPU layers\n<!-- layers:end -->\n")
    folder = _results(tmp_path / "results", ENV)
    with tarfile.open(tmp_path / "gpu_check.tar.gz", "w:gz") as tar:  # as the device call brings it back
        tar.add(folder, arcname=".")
    assert report.main(["--results", str(tmp_path / "gpu_check.tar.gz"), "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert "CPU layers" in text and text.count("<!-- inference-gpu:start -->") == 1
    assert text.count("<!-- training-gpu:start -->") == 1
    assert "_Measured 2026-12-01 10:00 on an NVIDIA H200 (139.8 GiB), driver 580.159.04, CUDA 13.0" in text
    assert "torch 2.11.0+cu130" in text
    assert "| seg3d infer, 512 x 512 x 200, no TTA | < 2 s | 1.50 s | yes |" in text
    assert "| vs MONAI with AMP | >= 2x | 2.67x | yes |" in text  # 4.0 / 1.5
    assert "| network share of the wall time | >= 70% | 80% | yes |" in text  # 1.2 / 1.5
    assert "gpu tests: 2 passed, 1 failed, 0 skipped (failed: `tests.pipeline.test_infer.test_c`)" in text
    assert "| training | 124 | 100 |" in text and "failed: no result within 30 s" in text
    assert "| danet | 96 x 96 x 96 | NCDHW | eager | manual (N x N) | 3.25 | 20.50 | 1.5 |" in text
    assert "No inference run for `configs/attention_unet.yaml`." in text

    # Run again on the same file: the sections are replaced, not added.
    assert report.main(["--results", str(folder), "--docs", str(docs)]) == 0
    assert docs.read_text().count("<!-- inference-gpu:start -->") == 1


def test_a_dry_run_never_goes_into_docs_benchmarks(tmp_path, capsys):
    folder = _results(tmp_path / "dry", ENV | {"gpu": None, "driver": None})
    before = report.REPORT.read_text()
    assert report.main(["--results", str(folder)]) == 2
    assert "CPU dry run" in capsys.readouterr().err and report.REPORT.read_text() == before
    preview = tmp_path / "preview.md"
    assert report.main(["--results", str(folder), "--docs", str(preview)]) == 0
    assert "**CPU dry run of benchmarks/gpu/check.sh" in preview.read_text()
