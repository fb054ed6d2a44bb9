"""Build seg3d's image on the CPU from docker/Dockerfile, with no image from Docker Hub and no download at build
time: what the image tests (tests/test_image.py, `make image-test`) and anyone without the CUDA base use.

    python3 docker/cpu_image.py daemon                       # start dockerd (as root) unless a daemon answers
    .venv/bin/python docker/cpu_image.py build [--bundle RUN_DIR/bundle] [--tag seg3d:0.1.0-cpu]

Three images, each tagged by the hash of what makes it, so that a rerun builds none it already has:

- `seg3d-cpu-base:<hash>`: Debian bookworm made by debootstrap (docker/cpu-base/rootfs.sh, imported with
  `docker import`) plus torch and its dependencies at the versions of the running environment (the .venv of
  `make test`: torch 2.13.0, CPU build) in /opt/venv (docker/cpu-base/Dockerfile). Hash: both recipe files and
  those pins.
- `seg3d-wheels:<hash>`: the wheels of docker/requirements.lock, fetched by this machine's pip, at the root of an
  otherwise empty image. Hash: the lock and the target Python.
- the seg3d image: docker/Dockerfile with BASE_IMAGE and WHEELS set to those two, TORCH_BUILD=cpu and, given a
  bundle, BUNDLE; built with `--network none`, which proves the build fetches nothing. Docker's layer cache
  makes a rebuild cost only the layers whose inputs changed.

Standard library only (the `daemon` step runs before any virtual environment exists); the base's pins come from
docker/lock.py, which needs `packaging`, so `build` runs on the project's .venv.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = ROOT / "docker"
CPU_BASE = DOCKER_DIR / "cpu-base"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
LOCK = DOCKER_DIR / "requirements.lock"
# The Python of the Debian base (bookworm's python3 3.11, glibc 2.36) and so the wheels it takes: pip expands no
# manylinux_2_X tag given with --platform to the older ones it accepts, so all of them are named.
BASE_PYTHON = ("3.11", "cp311")
BASE_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)
# What the build context of docker/Dockerfile holds (what ../.dockerignore lets in from the repository root): the
# project, its configs and the lock. The staged context needs no .dockerignore: it holds nothing else. (Docker
# 20.10's client would not follow that file's `!runs/**/bundle/` into runs/ anyway; Docker 23's BuildKit does.)
CONTEXT_FILES = ("pyproject.toml", "README.md", "docker/requirements.lock")
CONTEXT_TREES = ("attention3d", "pipeline", "configs")
BUNDLE_IN_CONTEXT = "runs/image/bundle"
DAEMON_START_S = 60


class DockerUnavailable(RuntimeError):
    """No Docker daemon can be had here; the message says why (for a test's skip reason)."""


def _run(cmd: list[str], *, what: str, timeout: float = 3600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip()[-4000:]
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {' '.join(cmd[:6])} ...\n{tail}")
    return result


def _hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


# -- daemon -------------------------------------------------------------------------------------------------------


def docker_cli() -> str:
    """The docker client to use: Debian's /usr/bin/docker first (it builds with BuildKit on its own; a newer client
    elsewhere on PATH may lack the buildx plugin that its BuildKit needs), else the one on PATH."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise DockerUnavailable("no docker client: install Debian's docker.io (apt-get install docker.io)")


def daemon_answers(docker: str) -> bool:
    try:
        result = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


def ensure_daemon(docker: str, log: Path = Path("/var/log/seg3d-dockerd.log")) -> str:
    """A Docker daemon that answers: the running one, else dockerd started here in the background (it keeps
    running after this process, so that later runs find it and its layer cache). Storage: overlay2, else vfs.
    Returns how the daemon was had; raises DockerUnavailable with the reason when none can be."""
    if daemon_answers(docker):
        return "running"
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").is_file() else None)
    if dockerd is None:
        raise DockerUnavailable("no Docker daemon answers and dockerd is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise DockerUnavailable(f"no Docker daemon answers and only root can start {dockerd}")
    errors = []
    for driver in ("overlay2", "vfs"):
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [dockerd, "--storage-driver", driver],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # not ended with this process, nor by a Ctrl-C meant for it
            )
        deadline = time.monotonic() + DAEMON_START_S
        while time.monotonic() < deadline and proc.poll() is None:
            if daemon_answers(docker):
                return f"started dockerd (pid {proc.pid}, {driver}; log {log})"
            time.sleep(1)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        errors.append(f"{driver}: exit {proc.returncode}")
    raise DockerUnavailable(f"dockerd did not start ({'; '.join(errors)}); see {log}")


# -- images -------------------------------------------------------------------------------------------------------


def image_exists(docker: str, tag: str) -> bool:
    return subprocess.run([docker, "image", "inspect", tag], capture_output=True, timeout=60).returncode == 0


def _lock_module():
    spec = importlib.util.spec_from_file_location("seg3d_docker_lock", DOCKER_DIR / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_pins() -> list[str]:
    """torch and everything it needs, at the versions installed in the running environment (`name==version`,
    local labels such as +cpu kept: they name the build)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    found, missing = _lock_module().closure([Requirement("torch")], default_environment())
    if missing:
        raise RuntimeError(f"torch needs {', '.join(missing)}, not installed in {sys.prefix}")
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def _pip_download(requirements: list[str], dest: Path) -> None:
    """Wheels only, for the base's Python (not necessarily this one's), through this machine's pip and its index
    settings and cache; nothing is built."""
    version, abi = BASE_PYTHON
    platforms = [a for platform in BASE_PLATFORMS for a in ("--platform", platform)]
    _run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
         "--python-version", version, "--implementation", "cp", "--abi", abi, *platforms, *requirements],
        what="pip download",
    )  # fmt: skip


def _import_folder(docker: str, folder: Path, tag: str) -> None:
    """`docker import` of the folder's contents as the root of a one-layer image."""
    tar = subprocess.Popen(["tar", "-C", str(folder), "-c", "."], stdout=subprocess.PIPE)
    try:
        _run([docker, "import", "-", tag], what=f"docker import {tag}", stdin=tar.stdout)
    finally:
        tar.stdout.close()
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {folder} failed (exit {tar.returncode})")


def _drop_older(docker: str, tag: str) -> None:
    """Remove the other tags of `tag`'s repository (images of an older recipe or lock), so that each rebuild does not
    leave a gigabyte behind; an image still in use stays."""
    repository = tag.partition(":")[0]
    listed = subprocess.run(
        [docker, "image", "ls", repository, "--format", "{{.Repository}}:{{.Tag}}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    for other in listed.stdout.split():
        if other != tag:
            subprocess.run([docker, "image", "rm", other], capture_output=True, timeout=300)


def _buildkit_env() -> dict[str, str]:
    return {**os.environ, "DOCKER_BUILDKIT": "1"}


def cpu_base(docker: str, log=print) -> str:
    """The tag of the CPU base image, built unless an image of that recipe hash exists."""
    rootfs_script = (CPU_BASE / "rootfs.sh").read_bytes()
    pins = torch_pins()
    recipe = [rootfs_script, (CPU_BASE / "Dockerfile").read_bytes(), "\n".join(pins + list(BASE_PLATFORMS)).encode()]
    tag = "seg3d-cpu-base:" + _hash(*recipe)
    if image_exists(docker, tag):
        return tag
    rootfs_tag = "seg3d-cpu-rootfs:" + _hash(rootfs_script)
    if not image_exists(docker, rootfs_tag):
        if os.geteuid() != 0:
            raise DockerUnavailable("the CPU base is made with debootstrap, which needs root")
        if shutil.which("debootstrap") is None:
            raise DockerUnavailable("debootstrap is not installed (apt-get install debootstrap)")
        with tempfile.TemporaryDirectory(prefix="seg3d-rootfs-") as tmp:
            start = time.monotonic()
            _run(["sh", str(CPU_BASE / "rootfs.sh"), f"{tmp}/rootfs"], what="debootstrap")
            _import_folder(docker, Path(tmp) / "rootfs", rootfs_tag)
            log(f"made {rootfs_tag} in {time.monotonic() - start:.0f} s")
    with tempfile.TemporaryDirectory(prefix="seg3d-torch-wheels-") as wheels:
        start = time.monotonic()
        _pip_download(pins, Path(wheels))
        _run(
            [docker, "build", "--network", "none", "--build-arg", f"ROOTFS={rootfs_tag}",
             "-f", str(CPU_BASE / "Dockerfile"), "-t", tag, wheels],
            what=f"docker build {tag}", env=_buildkit_env(),
        )  # fmt: skip
        log(f"made {tag} ({', '.join(p for p in pins if p.startswith('torch=='))}) in {time.monotonic() - start:.0f} s")
    _drop_older(docker, tag)
    _drop_older(docker, rootfs_tag)
    return tag


def wheels_image(docker: str, log=print) -> str:
    """The tag of the image holding the locked wheels, made unless one of that lock exists."""
    lock = LOCK.read_bytes()
    tag = "seg3d-wheels:" + _hash(lock, " ".join(BASE_PYTHON + BASE_PLATFORMS).encode())
    if image_exists(docker, tag):
        return tag
    requirements = [
        line.strip() for line in lock.decode().splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    with tempfile.TemporaryDirectory(prefix="seg3d-wheels-") as wheels:
        start = time.monotonic()
        _pip_download(requirements, Path(wheels))
        _import_folder(docker, Path(wheels), tag)
        log(f"made {tag} ({len(requirements)} wheels) in {time.monotonic() - start:.0f} s")
    _drop_older(docker, tag)
    return tag


def stage_context(dest: Path, bundle: Path | None = None) -> tuple[Path, str | None]:
    """A build context holding what the repository root sends (see .dockerignore) and, given one, the bundle at
    runs/image/bundle; returns the folder and the BUNDLE value. Staged so that the bundle may live anywhere and
    nothing is written into the checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in CONTEXT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    for name in CONTEXT_TREES:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore, dirs_exist_ok=True)
    if bundle is None:
        return dest, None
    target = dest / BUNDLE_IN_CONTEXT
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(bundle, target)
    return dest, BUNDLE_IN_CONTEXT


def build_image(docker: str, *, tag: str, bundle: Path | None = None, log=print) -> dict[str, float | str]:
    """Base, wheels and docker/Dockerfile; returns the tags and the seconds each step took."""
    times: dict[str, float | str] = {}
    start = time.monotonic()
    base = cpu_base(docker, log=log)
    times["base_s"] = time.monotonic() - start
    start = time.monotonic()
    wheels = wheels_image(docker, log=log)
    times["wheels_s"] = time.monotonic() - start
    with tempfile.TemporaryDirectory(prefix="seg3d-context-") as tmp:
        context, bundle_arg = stage_context(Path(tmp), bundle)
        args = [f"BASE_IMAGE={base}", f"WHEELS={wheels}", "TORCH_BUILD=cpu"]
        if bundle_arg:
            args.append(f"BUNDLE={bundle_arg}")
        start = time.monotonic()
        _run(
            [docker, "build", "--network", "none", "-f", str(DOCKERFILE), "-t", tag,
             *(a for arg in args for a in ("--build-arg", arg)), str(context)],
            what=f"docker build {tag}", env=_buildkit_env(),
        )  # fmt: skip
        times["image_s"] = time.monotonic() - start
    times.update(base=base, wheels=wheels, image=tag)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docker/cpu_image.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("daemon", help="start dockerd unless a Docker daemon answers")
    build = sub.add_parser("build", help="build the CPU base, the wheels image and docker/Dockerfile on them")
    build.add_argument("--tag", default="seg3d:0.1.0-cpu")
    build.add_argument("--bundle", type=Path, help="a model bundle folder to bake in (BUNDLE)")
    args = parser.parse_args(argv)
    try:
        docker = docker_cli()
        print(f"docker daemon: {ensure_daemon(docker)}")
        if args.command == "build":
            for key, value in build_image(docker, tag=args.tag, bundle=args.bundle).items():
                print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    except (DockerUnavailable, RuntimeError) as err:
        print(f"docker/cpu_image.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
