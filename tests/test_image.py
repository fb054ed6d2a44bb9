"""The image built and run for real: docker/Dockerfile on the CPU base of docker/cpu_image.py (Debian's packages and
the torch 2.13.0 CPU wheel `make test` installs), with an untrained tiny bundle baked in through BUNDLE, run the way
docker/README.md runs it: `--read-only --tmpfs /tmp --network none --user 10001:10001`, /data read-only.

The session fixture gets a Docker daemon (the running one, else dockerd started here as root) and builds the base,
the wheels image and the seg3d image once; each is cached (by recipe hash, by Docker's layer cache), so a rerun
builds only what changed. Without a daemon to be had (no docker.io, not root) every test here skips with the
reason. `make image-test` runs this module alone; docker/README.md says how to run the same checks by hand.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from pydicom.uid import generate_uid

from attention3d import create_model
from pipeline.bundle import load_bundle, save_bundle
from pipeline.config import load_config
from pipeline.synthetic import synthesize
from tests.conftest import REAL_CT, ROOT
from tests.mlflow_server import free_port
from tests.pipeline.conftest import PRE

pytestmark = [pytest.mark.image, pytest.mark.slow]

SEG3D = Path(sys.executable).with_name("seg3d")
COMPOSE = ROOT / "docker" / "compose.yaml"
# One tag per session, removed at its end (the layers stay in Docker's cache): two sessions at once, each with
# its own bundle, never run each other's image.
TAG = f"seg3d:0.1.0-imagetest-{uuid.uuid4().hex[:8]}"
UID = 10001
# The tiny network of tests/pipeline/conftest.py with windows large enough that a whole CT takes a few of them.
BUNDLE_CONFIG = [
    "model.name=attention_unet",
    "model.channels=[4, 8, 16]",
    "model.strides=[2, 2]",
    "data.patch_size=[128, 128, 64]",
    "inference.overlap=0.25",
]
# What `seg3d train` runs in the compose test: tests/pipeline/_training.py's tiny run, one epoch, with patches large
# enough that validation's sliding window takes a few of them per case.
TRAIN_OVERRIDES = [
    "model.channels=[4, 8, 16]",
    "model.strides=[2, 2]",
    "data.patch_size=[64, 64, 32]",
    "data.target_spacing=[2.0, 2.0, 4.0]",
    "data.num_workers=0",
    "train.epochs=1",
    "train.iterations_per_epoch=2",
    "train.folds=2",
    "train.threads=2",
]
# Elements of a DICOM SEG or RTSTRUCT that differ between two runs by design: new UIDs and the time of writing.
VOLATILE = {
    "SOPInstanceUID",
    "MediaStorageSOPInstanceUID",
    "SeriesInstanceUID",
    "DimensionOrganizationUID",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "SeriesDate",
    "SeriesTime",
    "ContributionDateTime",
    "StructureSetDate",
    "StructureSetTime",
}


def _cpu_image():
    spec = importlib.util.spec_from_file_location("seg3d_cpu_image", ROOT / "docker" / "cpu_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_image = _cpu_image()


@dataclass
class Image:
    docker: str
    tag: str
    bundle: Path  # the bundle baked in at /opt/seg3d/model, for the host's runs
    cache: str  # a named volume for /cache, shared by the session's containers


# -- fixtures -------------------------------------------------------------------------------------------------------


def _readable(path: Path) -> Path:
    """Let the container's user (UID 10001) read a host tree: pytest's folders are 0700, atomic writes 0600."""
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o555 if p.is_dir() else p.stat().st_mode | 0o444)
    return path


def _writable(path: Path) -> Path:
    """A host folder the container's user can write: owned by it (as root), else open to all."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:
        path.chmod(0o777)
    return path


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Iterator[Image]:
    try:
        docker = cpu_image.docker_cli()
        cpu_image.ensure_daemon(docker)
    except cpu_image.DockerUnavailable as err:
        pytest.skip(f"no Docker daemon: {err}")
    torch.manual_seed(0)
    cfg = load_config(None, BUNDLE_CONFIG)
    model = create_model("attention_unet", channels=(4, 8, 16), strides=(2, 2), out_channels=3)
    bundle = save_bundle(tmp_path_factory.mktemp("image_bundle") / "bundle", model, cfg, PRE)
    try:
        cpu_image.build_image(docker, tag=TAG, bundle=bundle, log=lambda line: None)
    except cpu_image.DockerUnavailable as err:
        pytest.skip(f"the CPU base cannot be made here: {err}")
    cache = f"seg3d-imagetest-cache-{uuid.uuid4().hex[:8]}"
    subprocess.run([docker, "volume", "create", cache], check=True, capture_output=True, timeout=60)
    try:
        yield Image(docker=docker, tag=TAG, bundle=_readable(bundle), cache=cache)
    finally:
        subprocess.run([docker, "volume", "rm", "-f", cache], capture_output=True, timeout=120)
        subprocess.run([docker, "image", "rm", "--force", TAG], capture_output=True, timeout=300)


@pytest.fixture
def real_ct_data() -> Path:
    if not REAL_CT.is_dir():
        pytest.skip(f"real CT data not found at {REAL_CT} (it sits beside the repository as ../shared/data/real_ct)")
    return REAL_CT


# -- helpers --------------------------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def container(
    image: Image,
    *args: str,
    mounts: dict[Path, str] | None = None,
    read_only: bool = True,
    remove: bool = True,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """`docker run` as docker/README.md has it: read-only root, tmpfs /tmp, no network, UID 10001, /cache a volume.
    `mounts` maps a host folder to `/target` (writable) or `/target:ro`."""
    cmd = [image.docker, "run", "--network", "none", "--user", f"{UID}:{UID}", "--tmpfs", "/tmp"]
    cmd += ["--read-only"] if read_only else []
    cmd += ["--rm"] if remove else []
    cmd += ["-v", f"{image.cache}:/cache"]
    for host, target in (mounts or {}).items():
        cmd += ["-v", f"{host}:{target}"]
    return [*cmd, *extra, image.tag, *args]


def infer_args(model: Path | str, source: Path | str, output: Path | str, *extra: str) -> list[str]:
    return ["infer", "--model", str(model), "--input", str(source), "--output", str(output), *extra]


def host_infer(bundle: Path, source: Path, output: Path, *extra: str) -> None:
    result = _run([str(SEG3D), *infer_args(bundle, source, output, *extra)])
    assert result.returncode == 0, result.stdout + result.stderr


def assert_same_nifti(container_file: Path, host_file: Path) -> np.ndarray:
    """Voxel for voxel and header for header; returns the mask."""
    ours, theirs = nib.load(container_file), nib.load(host_file)
    assert ours.header.binaryblock == theirs.header.binaryblock
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    mask, expected = np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)
    assert mask.dtype == expected.dtype and mask.shape == expected.shape
    np.testing.assert_array_equal(mask, expected)
    return mask


def doctor_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """check name -> (status word, detail), as tests/pipeline/test_doctor.py reads `seg3d doctor`."""
    out = {}
    for line in stdout.splitlines():
        status, name, *detail = line.split(maxsplit=2)
        if status in ("ok", "warn", "FAIL"):
            out[name] = (status, detail[0] if detail else "")
    return out


def series_with_uids(source: Path, dest: Path) -> tuple[str, set[str]]:
    """The real series with the UIDs its anonymisation emptied put back (fixed, so a rerun writes the same files):
    a DICOM SEG must reference its source by them. Returns the series UID and the slices' SOP instance UIDs."""
    dest.mkdir(parents=True)
    study, series, frame = (generate_uid(entropy_srcs=["seg3d image test", part]) for part in ("st", "se", "fr"))
    instances = set()
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.save_as(dest / path.name, enforce_file_format=True)
        instances.add(str(ds.SOPInstanceUID))
    assert len(instances) == len(list(source.glob("*.dcm"))) > 1
    return series, instances


def dicom_elements(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    """Every element, nested ones included, in file order, but the volatile ones, sequences as their contents, and
    the pixel data (compared as frames)."""
    out = []
    for elem in [*ds.file_meta.iterall(), *ds.iterall()]:
        if elem.keyword in VOLATILE or elem.VR == "SQ" or elem.keyword == "PixelData":
            continue
        out.append((f"{elem.tag} {elem.keyword}", repr(elem.value)))
    return out


# -- inference in the container = inference on the host -------------------------------------------------------------


def test_infer_in_the_container_writes_the_hosts_mask_for_the_real_ct(image, real_ct_data, tmp_path):
    out = _writable(tmp_path / "container")
    args = infer_args("/opt/seg3d/model", "/data/ct.nii.gz", "/output/ct.nii.gz")
    result = _run(container(image, *args, mounts={real_ct_data: "/data:ro", out: "/output"}))
    assert result.returncode == 0, result.stdout + result.stderr
    host_infer(image.bundle, real_ct_data / "ct.nii.gz", tmp_path / "host" / "ct.nii.gz")

    mask = assert_same_nifti(out / "ct.nii.gz", tmp_path / "host" / "ct.nii.gz")
    # A real comparison: the untrained network labels the CT with every class, in the CT's own grid.
    assert set(np.unique(mask)) == {0, 1, 2}
    source = nib.load(real_ct_data / "ct.nii.gz")
    assert mask.shape == source.shape
    np.testing.assert_allclose(nib.load(out / "ct.nii.gz").affine, source.affine, atol=1e-4)


def test_infer_in_the_container_writes_the_hosts_dicom_seg_and_rtstruct_for_a_real_series(
    image, real_ct_data, tmp_path
):
    series_dir = tmp_path / "series" / "ct_series"
    series_uid, instances = series_with_uids(real_ct_data / "dicom_series", series_dir)
    _readable(tmp_path / "series")
    out = _writable(tmp_path / "container")
    args = infer_args("/opt/seg3d/model", "/data/ct_series", "/output/ct", "--dicom-seg", "--dicom-rtstruct")
    result = _run(container(image, *args, mounts={tmp_path / "series": "/data:ro", out: "/output"}))
    assert result.returncode == 0, result.stdout + result.stderr
    host_infer(image.bundle, series_dir, tmp_path / "host", "--dicom-seg", "--dicom-rtstruct")

    mask = assert_same_nifti(out / "ct" / "ct_series.nii.gz", tmp_path / "host" / "ct_series.nii.gz")
    assert set(np.unique(mask)) == {0, 1, 2}
    ours = pydicom.dcmread(out / "ct" / "ct_series_seg.dcm")
    theirs = pydicom.dcmread(tmp_path / "host" / "ct_series_seg.dcm")
    # The segmentation frames, bit for bit, and every other element (segments, per-frame positions, orientation,
    # spacing, the source images each frame derives from) but the new UIDs and times each run writes.
    assert ours.NumberOfFrames == theirs.NumberOfFrames > 0
    np.testing.assert_array_equal(ours.pixel_array, theirs.pixel_array)
    assert ours.pixel_array.any()
    assert dicom_elements(ours) == dicom_elements(theirs)
    assert ours.SOPInstanceUID != theirs.SOPInstanceUID
    # ... and what they reference is the input series, slice by slice.
    assert ours.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    referenced = {
        src.ReferencedSOPInstanceUID
        for frame in ours.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for src in derivation.SourceImageSequence
    }
    assert referenced and referenced <= instances

    # The RT Structure Set (its contours drawn by OpenCV, whose system libraries the image must carry): the same
    # element for element, contour points included, referencing the same series.
    ours = pydicom.dcmread(out / "ct" / "ct_series_rtstruct.dcm")
    theirs = pydicom.dcmread(tmp_path / "host" / "ct_series_rtstruct.dcm")
    assert dicom_elements(ours) == dicom_elements(theirs)
    assert sum(len(roi.ContourSequence) for roi in ours.ROIContourSequence) > 0
    (frame_of_reference,) = ours.ReferencedFrameOfReferenceSequence
    (study,) = frame_of_reference.RTReferencedStudySequence
    assert [s.SeriesInstanceUID for s in study.RTReferencedSeriesSequence] == [series_uid]


# -- health, doctor, what the container writes ----------------------------------------------------------------------


def test_healthcheck_runs_seg3d_doctor_and_reaches_healthy(image, tmp_path):
    inspect = _run([image.docker, "image", "inspect", "--format", "{{json .Config.Healthcheck}}", image.tag])
    assert json.loads(inspect.stdout)["Test"] == ["CMD", "seg3d", "doctor"]
    out = _writable(tmp_path / "out")
    # The image's check as it is, asked every 2 s instead of every 5 minutes; the container just stays up.
    detached = ("--detach", "--health-interval", "2s", "--entrypoint", "sleep")
    run = _run(container(image, "infinity", mounts={out: "/output"}, extra=detached))
    assert run.returncode == 0, run.stderr
    name = run.stdout.strip()
    try:
        deadline = time.monotonic() + 300
        while True:
            state = json.loads(_run([image.docker, "inspect", "--format", "{{json .State.Health}}", name]).stdout)
            if state["Status"] != "starting" or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert state["Status"] == "healthy", state
        last = state["Log"][-1]
        assert last["ExitCode"] == 0 and "all needed parts present" in last["Output"], last
    finally:
        _run([image.docker, "rm", "--force", name])


def test_doctor_inside_reports_the_read_only_root_and_the_writable_cache_and_output(image, tmp_path):
    out = _writable(tmp_path / "out")
    result = _run(container(image, "doctor", mounts={out: "/output"}))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = doctor_lines(result.stdout)
    assert lines["root"] == ("ok", "/ read-only: results, caches and temporaries only")
    assert lines["output"] == ("ok", "/output writable")
    for name, folder in (("TORCH_HOME", "/cache/torch"), ("MPLCONFIGDIR", "/cache/matplotlib")):
        assert lines[name] == ("ok", f"{folder} writable")
    assert lines["MONAI_DATA_DIRECTORY"] == ("ok", "/cache/monai writable")
    assert lines["tracking"][0] == "ok" and lines["tracking"][1].startswith("sqlite:////cache/mlflow/mlflow.db")
    assert lines["torch"][1].startswith("2.13.0") and lines["CUDA"][0] == "warn"

    # Without /output mounted, /output is part of the read-only root: the doctor says so and fails.
    bare = _run(container(image, "doctor"))
    assert bare.returncode == 1, bare.stdout + bare.stderr
    status, detail = doctor_lines(bare.stdout)["output"]
    assert status == "FAIL" and "Read-only file system" in detail
    # With a writable root, the same line reads so.
    writable = _run(container(image, "doctor", mounts={out: "/output"}, read_only=False))
    assert doctor_lines(writable.stdout)["root"] == ("ok", "/ writable")


def test_a_run_writes_nothing_outside_output_cache_and_tmp(image, real_ct_data, tmp_path):
    """With the root left writable, the container's own layer (docker diff) is still empty after an inference:
    seg3d writes only to the /output and /cache mounts and the /tmp tmpfs, so --read-only costs nothing."""
    out = _writable(tmp_path / "out")
    name = f"seg3d-imagetest-diff-{uuid.uuid4().hex[:8]}"
    args = infer_args("/opt/seg3d/model", "/data/ct_small.nii.gz", "/output/small.nii.gz")
    mounts = {real_ct_data: "/data:ro", out: "/output"}
    cmd = container(image, *args, mounts=mounts, read_only=False, remove=False, extra=("--name", name))
    try:
        result = _run(cmd)
        assert result.returncode == 0, result.stdout + result.stderr
        assert nib.load(out / "small.nii.gz").shape == nib.load(real_ct_data / "ct_small.nii.gz").shape
        diff = _run([image.docker, "diff", name])
        assert diff.returncode == 0, diff.stderr
        assert diff.stdout.strip() == "", f"written outside /output, /cache and /tmp:\n{diff.stdout}"
    finally:
        _run([image.docker, "rm", "--force", name])


# -- compose: the MLflow service and a training run logged to it ------------------------------------------------------


def _listeners(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` on this machine (/proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(".".join(str(b) for b in reversed(raw)))
                else:
                    found.add("::" if not any(raw) else raw.hex())
    return found


def test_compose_mlflow_serves_on_loopback_and_records_a_run_trained_in_the_container(image, tmp_path):
    """docker/compose.yaml run by Debian's docker-compose (1.29). It does not know the Compose v2 top-level `name`,
    given as -p instead, and the seg3d service's GPU reservation is dropped (no GPU here); nothing else changes."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    spec = yaml.safe_load(COMPOSE.read_text())
    spec.pop("name")
    for service in ("seg3d", "serve"):
        spec["services"][service].pop("deploy")
    derived = tmp_path / "compose.yaml"
    derived.write_text(yaml.safe_dump(spec, sort_keys=False))
    data = tmp_path / "data"
    synthesize(data, cases=4, seed=2, test_cases=1)
    _readable(data)
    out = _writable(tmp_path / "out")
    port = free_port()
    project = f"seg3dimagetest{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "SEG3D_IMAGE": image.tag,
        "SEG3D_MLFLOW_PORT": str(port),
        "SEG3D_DATA": str(data),
        "SEG3D_OUTPUT": str(out),
    }
    base = [compose, "-f", str(derived), "--project-directory", str(COMPOSE.parent), "-p", project]
    model_name = f"seg3d-imagetest-{uuid.uuid4().hex[:8]}"
    try:
        up = _run([*base, "up", "--detach", "mlflow"], env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        # The published port: 127.0.0.1 only, in Docker's record and among this machine's listening sockets.
        (mlflow_id,) = _run([*base, "ps", "-q", "mlflow"], env=env).stdout.split()
        inspect = _run([image.docker, "inspect", "--format", "{{json .NetworkSettings.Ports}}", mlflow_id])
        ports = json.loads(inspect.stdout)
        assert ports["5000/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
        assert _listeners(port) == {"127.0.0.1"}

        # `seg3d train` in the seg3d service: read-only, on the internal network only, waiting for the server's
        # health check (depends_on), logging and registering over HTTP.
        train = _run(
            [*base, "run", "--rm", "seg3d", "train", "--config", "/opt/seg3d/configs/attention_unet.yaml",
             "--data", "/data", "--output", "/output/run", *TRAIN_OVERRIDES, f"registered_model={model_name}"],
            env=env,
        )  # fmt: skip
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        assert "registered as version 1" in train.stdout + train.stderr

        import mlflow

        uri = f"http://127.0.0.1:{port}"
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        (version,) = client.search_model_versions(f"name='{model_name}'")
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED"
        assert {"train_loss", "val_dice_mean"} <= set(run.data.metrics)
        # The registered model is the bundle the container wrote, byte for byte, and it loads on the host.
        downloaded = Path(client.download_artifacts(run.info.run_id, "bundle", str(tmp_path / "download")))
        for file in (out / "run" / "bundle").iterdir():
            assert (downloaded / file.name).read_bytes() == file.read_bytes(), file.name
        assert load_bundle(downloaded).metadata["model"] == "attention_unet"
    finally:
        _run([*base, "down", "--volumes", "--timeout", "5"], env=env)


# -- seg3d serve in the container: a DICOM node for a real PACS -------------------------------------------------------


def test_serve_in_the_container_takes_a_series_from_orthanc_and_sends_its_seg_back(image, tmp_path):
    """docker/README.md section 8's `docker run`: read-only, UID 10001, the spool a named volume, the DICOM port
    published on loopback; Orthanc (on the host) pushes a CT series to it and gets its DICOM SEG back, which it
    reaches through Docker's bridge gateway."""
    from tests.pipeline._ct_series import phantom_hu, write_ct_series
    from tests.pipeline._orthanc import Orthanc, orthanc_binary

    orthanc_binary()
    inspect = _run([image.docker, "network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}"])
    gateway = inspect.stdout.strip()
    assert inspect.returncode == 0 and gateway, inspect.stderr
    port, name = free_port(), f"seg3d-imagetest-serve-{uuid.uuid4().hex[:8]}"
    spool = f"{name}-spool"
    series = tmp_path / "series"
    uid = write_ct_series(series, phantom_hu(shape=(48, 44, 10), seed=7))["series"]
    with Orthanc(tmp_path / "pacs", modalities={"seg3d": ("SEG3D", "127.0.0.1", port)}) as pacs:
        run = [image.docker, "run", "-d", "--name", name, "--user", f"{UID}:{UID}", "--read-only", "--tmpfs", "/tmp",
               "-v", f"{image.cache}:/cache", "-v", f"{spool}:/spool", "-p", f"127.0.0.1:{port}:11112", image.tag,
               "serve", "--model", "/opt/seg3d/model", "--spool", "/spool", "--allow", "ORTHANC", "--quiet-time", "2",
               "--send-to", f"ORTHANC@{gateway}:{pacs.dicom_port}"]  # fmt: skip
        try:
            started = _run(run)
            assert started.returncode == 0, started.stderr
            deadline = time.monotonic() + 180
            while "listening on" not in (logs := _run([image.docker, "logs", name]).stderr):
                assert time.monotonic() < deadline, logs[-2000:]
                time.sleep(1)
            pacs.push(pacs.upload(series), "seg3d")
            segs = pacs.wait_for(lambda: pacs.series("SEG"), 180, "the SEG from the container")
            tags = pacs.tags(segs[0]["Instances"][0])
            assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == uid
            health = _run([image.docker, "exec", name, "python", "-c", "import urllib.request; print(urllib.request"
                           ".urlopen('http://127.0.0.1:11113/health', timeout=5).read().decode())"])  # fmt: skip
            assert json.loads(health.stdout)["status"] == "ok", health.stderr
        finally:
            _run([image.docker, "rm", "-f", name])
            _run([image.docker, "volume", "rm", "-f", spool])
