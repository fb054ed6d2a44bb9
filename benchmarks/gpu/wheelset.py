"""The wheels the GPU check carries: download them for a target Python, check that they complete the device's packages,
and stand the device's packages in for the CPU test.

    python -m benchmarks.gpu.wheelset fetch [--python-version 3.12] [--dest .gpu/wheels]
    python -m benchmarks.gpu.wheelset check [--python-version 3.12] [--dest .gpu/wheels]
    python -m benchmarks.gpu.wheelset standin DEST

The GPU machine reaches no package registry (the device tool's README): what seg3d needs beyond its image
(device_packages.txt) travels as wheels, at most 64 MiB together with the working tree. `fetch` downloads exactly
the pins of wheels.txt (markers evaluated for the target Python), binary only, for CPython on manylinux x86_64, with
pip's own configuration (its indexes and find-links), and prints each wheel and the total. `check` reads every
wheel's METADATA: each requirement (markers for the target Python on Linux, no extras) must be met by another wheel
of the set or by a package of the device, at the device's version where it is known; one version per name; each
wheel's Requires-Python admits the target. `standin` links the device's packages that .venv also has (torch, numpy,
scipy, ...) and nothing else into DEST, so that a process with DEST and an installed set on its path, and no
site-packages, sees what the device would (tests/test_gpu_kit.py).
"""

from __future__ import annotations

import argparse
import email.parser
import re
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PINS = HERE / "wheels.txt"
DEVICE = HERE / "device_packages.txt"
DEFAULT_DEST = ROOT / ".gpu" / "wheels"
DEVICE_PYTHON = "3.12"
# pip matches manylinux_2_N tags exactly: the ones wheels of these packages carry (README of the device tool).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment(python_version: str) -> dict[str, str]:
    """PEP 508 marker values of CPython `python_version` on Linux x86_64, whatever runs this."""
    env = default_environment()
    env.update(
        python_version=python_version,
        python_full_version=f"{python_version}.0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        platform_machine="x86_64",
        extra="",
    )
    return env


def read_lines(path: Path) -> list[str]:
    return [s for line in path.read_text().splitlines() if (s := line.split("#", 1)[0].strip())]


def pins(python_version: str, path: Path = PINS) -> list[Requirement]:
    """wheels.txt's requirements whose marker holds for the target Python."""
    env = target_environment(python_version)
    reqs = [Requirement(line) for line in read_lines(path)]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def device_packages(path: Path = DEVICE) -> dict[str, Version | None]:
    """Name -> version on the device (None where nobody read it)."""
    out: dict[str, Version | None] = {}
    for line in read_lines(path):
        name, _, version = line.partition("==")
        out[canonical(name)] = Version(version) if version else None
    return out


def holds_the_pins(folder: Path, python_version: str = DEVICE_PYTHON) -> bool:
    """True when `folder` holds exactly the pinned names and versions for `python_version` (by the file names)."""
    found = set()
    for path in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(path.name)
        found.add((canonical(name), version))
    return found == {(canonical(r.name), Version(next(iter(r.specifier)).version)) for r in pins(python_version)}


def fetch(dest: Path, python_version: str = DEVICE_PYTHON) -> list[Path]:
    """Download the pinned wheels for CPython `python_version` on manylinux x86_64 into `dest` (emptied of wheels
    first, so it holds exactly the set); returns them. Raises CalledProcessError when pip cannot get one."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-qq", "--no-deps", "--only-binary=:all:"]
    cmd += [
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    cmd += [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd += ["--dest", str(dest), *[str(r) for r in pins(python_version)]]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


@dataclass
class Wheel:
    path: Path
    name: str
    version: Version
    requires: list[Requirement]
    requires_python: SpecifierSet


def read_wheel(path: Path) -> Wheel:
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    return Wheel(
        path=path,
        name=canonical(meta["Name"]),
        version=Version(meta["Version"]),
        requires=[Requirement(r) for r in meta.get_all("Requires-Dist") or []],
        requires_python=SpecifierSet(meta.get("Requires-Python") or ""),
    )


def problems(folder: Path, python_version: str = DEVICE_PYTHON, device: dict | None = None) -> list[str]:
    """What keeps the wheels in `folder` from completing the device's packages for `python_version`; [] if nothing."""
    device = device_packages() if device is None else device
    env = target_environment(python_version)
    wheels = [read_wheel(p) for p in sorted(folder.glob("*.whl"))]
    found: list[str] = []
    if not wheels:
        return [f"no wheels in {folder}"]
    names = [w.name for w in wheels]
    found += [f"{n}: more than one wheel" for n in sorted({n for n in names if names.count(n) > 1})]
    have = {w.name: w.version for w in wheels}
    wanted = {canonical(r.name): r for r in pins(python_version)}
    found += [f"{n}: pinned in wheels.txt but not in {folder}" for n in sorted(set(wanted) - set(have))]
    found += [f"{n}: in {folder} but not pinned in wheels.txt" for n in sorted(set(have) - set(wanted))]
    for w in wheels:
        if not w.requires_python.contains(f"{python_version}.0", prereleases=True):
            found.append(f"{w.name} {w.version}: Requires-Python {w.requires_python} excludes {python_version}")
        for req in w.requires:
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # another Python, platform or an extra
            name = canonical(req.name)
            if name in have:
                version, where = have[name], "carried"
            elif name in device:
                version, where = device[name], "on the device"
                if version is None:
                    continue  # present there, version never read
            else:
                found.append(f"{w.name} {w.version} needs {req}: neither carried nor on the device")
                continue
            if not req.specifier.contains(version, prereleases=True):
                found.append(f"{w.name} {w.version} needs {req}: {where} is {version}")
    return found


def standin(dest: Path, site_packages: Path | None = None, device: dict | None = None) -> list[str]:
    """Link into `dest` the top-level files of every distribution in `site_packages` (this interpreter's purelib)
    that the device has too; returns their names. Console scripts and .pth files are left out."""
    from importlib.metadata import distributions

    site_packages = Path(site_packages or sysconfig.get_paths()["purelib"])
    device = device_packages() if device is None else device
    dest.mkdir(parents=True, exist_ok=True)
    linked = []
    for dist in distributions(path=[str(site_packages)]):
        if canonical(dist.metadata["Name"]) not in device:
            continue
        # RECORD names the .dist-info folder too, so that importlib.metadata finds the package there as well.
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            source, target = site_packages / top, dest / top
            if top.endswith(".pth") or not source.exists() or target.exists():
                continue
            target.symlink_to(source)
        linked.append(canonical(dist.metadata["Name"]))
    return sorted(linked)


def total_mib(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.wheelset")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("fetch", "check"):
        p = sub.add_parser(name)
        p.add_argument("--python-version", default=DEVICE_PYTHON, help="the target CPython, e.g. 3.12 (the device's)")
        p.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    p = sub.add_parser("standin")
    p.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "standin":
        print("\n".join(standin(args.dest)))
        return 0
    if args.command == "fetch":
        wheels = fetch(args.dest, args.python_version)
        for w in wheels:
            print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
        print(
            f"{total_mib(wheels):8.2f} MiB  total, {len(wheels)} wheels for CPython {args.python_version}",
            f"in {args.dest}",
        )
    found = problems(args.dest, args.python_version)
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    if not found and args.command == "check":
        print(f"ok: the wheels in {args.dest} complete the device's packages for CPython {args.python_version}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
