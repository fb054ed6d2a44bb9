"""`seg3d doctor`: is this machine (or container) ready to train and infer? One check per line, ok / warn / FAIL.

Used as the Docker HEALTHCHECK, so it must answer within seconds and never hang: the tracking server is asked with
a bounded timeout, in a thread that is abandoned when it does not come back in time, and nothing is downloaded.
"FAIL" is reserved for what seg3d needs (its packages, a tracking store that answers, a writable output folder);
what only costs speed or convenience (no GPU, emulated bf16, a read-only cache) is a warning.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlparse

from pipeline.fileio import probe_writable

OK, WARN, FAIL = "ok", "warn", "fail"
LABELS = {OK: "ok", WARN: "warn", FAIL: "FAIL"}
# Tracker.check gives an HTTP server 5 s; the thread gets a little more, then the check counts as hung. It also
# bounds what urllib's timeout does not: name resolution of a host whose DNS server does not answer.
TRACKING_TIMEOUT_S = 8.0
SQLITE_TIMEOUT_S = 2.0

# (distribution, shown as): what seg3d imports on every run. The ONNX ones only serve `seg3d export`.
NEEDED = (
    ("torch", "torch"),
    ("monai", "MONAI"),
    ("mlflow", "MLflow"),
    ("nibabel", "nibabel"),
    ("SimpleITK", "SimpleITK"),
    ("numpy", "numpy"),
)
EXPORT = ("onnx", "onnxruntime", "onnxscript")
LOW_GPU_MEMORY = 2 * 1024**3


@dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when everything seg3d needs is present; warnings do not count."""
        return not any(c.status == FAIL for c in self.checks)

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def format(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [f"{LABELS[c.status]:<5} {c.name:<{width}}  {c.detail}" for c in self.checks]
        failed = sum(c.status == FAIL for c in self.checks)
        warned = sum(c.status == WARN for c in self.checks)
        if failed:
            lines.append(f"{failed} check(s) FAILED, {warned} warning(s): seg3d is not ready here")
        else:
            lines.append(f"all needed parts present, {warned} warning(s)")
        return "\n".join(lines)


def run_checks(*, output: Path | str | None = None, tracking_uri: str | None = None) -> DoctorReport:
    """Run every check; `output` is the folder results will be written to (default: the working directory),
    `tracking_uri` as for `seg3d train` (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    report = DoctorReport()
    _check_versions(report)
    torch = _import_torch(report)
    if torch is not None:
        _check_cuda(report, torch)
    _check_cpu(report)
    if torch is not None:
        _check_precision(report, torch)
    _check_tracking(report, tracking_uri)
    _check_root(report)
    _check_folder(report, "output", Path(output) if output is not None else Path.cwd(), needed=True)
    for name, folder in _cache_folders().items():
        _check_folder(report, name, folder, needed=False)
    return report


# -- versions -------------------------------------------------------------------------------------------------------


def _dist_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _check_versions(report: DoctorReport) -> None:
    from pipeline import __version__

    report.add("python", OK, f"{platform.python_version()} ({sys.executable})")  # pip enforces >= 3.10
    report.add("seg3d", OK, __version__)
    for dist, shown in NEEDED:
        found = _dist_version(dist)
        if found is None:
            report.add(shown, FAIL, f"not installed; seg3d needs it: pip install {dist}")
        else:
            report.add(shown, OK, found)
    found = {d: _dist_version(d) for d in EXPORT}
    missing = [d for d, v in found.items() if v is None]
    text = ", ".join(f"{d} {v}" for d, v in found.items() if v is not None)
    if missing:
        lacking = ", ".join(missing)
        report.add("ONNX", WARN, f"{text or 'nothing'}; missing {lacking}: `seg3d export --format onnx` fails")
    else:
        report.add("ONNX", OK, text)


def _import_torch(report: DoctorReport):
    try:
        import torch
    except Exception as err:  # a broken wheel fails in many ways (ImportError, OSError for a missing .so)
        report.add("torch import", FAIL, f"{type(err).__name__}: {err}")
        return None
    return torch


# -- devices ----------------------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _check_cuda(report: DoctorReport, torch) -> None:
    if torch.version.cuda is None:
        report.add("CUDA", WARN, f"none: torch {torch.__version__} is a CPU build; seg3d runs on the CPU")
        return
    if not torch.cuda.is_available():
        report.add(
            "CUDA",
            WARN,
            f"torch is built for CUDA {torch.version.cuda} but sees no GPU (driver missing, or a container started"
            " without --gpus); seg3d runs on the CPU",
        )
        return
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    report.add("CUDA", OK, f"CUDA {torch.version.cuda}, cuDNN {cudnn if cudnn else 'not available'}")
    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError as err:  # a GPU in an error state, or one taken exclusively by another process
            report.add(f"gpu{i}", WARN, f"{name}: memory unknown ({str(err).splitlines()[0]})")
            continue
        status = WARN if free < LOW_GPU_MEMORY else OK
        note = "; little free: other processes hold it" if status == WARN else ""
        report.add(f"gpu{i}", status, f"{name}: {_gib(total)} total, {_gib(free)} free{note}")


def _check_cpu(report: DoctorReport) -> None:
    from pipeline.devices import CPU_FEATURES, cpu_info

    model, flags = cpu_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    present = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FEATURES)
    report.add("CPU", OK, f"{model}, {cores} cores usable; {present}")


def _check_precision(report: DoctorReport, torch) -> None:
    try:
        from pipeline.devices import cpu_has_native_bf16, precision_name, resolve_precision
    except Exception as err:  # MONAI (or another dependency of the predictor) does not import
        report.add("precision", FAIL, f"the predictor does not import ({type(err).__name__}: {err})")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision("auto", device)
    shown = precision_name(dtype)
    if device.type == "cuda":
        why = "the GPU supports bf16" if dtype == torch.bfloat16 else "the GPU has no bf16"
    else:
        why = "the CPU has AVX512-BF16 or AMX" if cpu_has_native_bf16() else "no AVX512-BF16 or AMX: bf16 is emulated"
    report.add("precision", OK, f"`seg3d infer --precision auto` uses {shown} on {device.type} ({why})")


# -- tracking ---------------------------------------------------------------------------------------------------------


def _bounded(fn: Callable[[], str], seconds: float) -> str:
    """Run `fn` in a daemon thread; its return value, its exception, or TimeoutError when it is still running."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:
            result["error"] = err

    thread = threading.Thread(target=target, name="seg3d-doctor-check", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return str(result.get("value", ""))


def _probe_sqlite(path: Path) -> str:
    if not path.exists():
        return "no database yet; MLflow creates it on first use (folder writable)"
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_S)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        connection.close()
    if not tables:
        return "empty database; MLflow creates its tables on first use"
    if "experiments" not in tables:
        raise ValueError(f"{path} is an sqlite database but not an MLflow store (no experiments table)")
    return "MLflow database answers"


def _check_tracking(report: DoctorReport, tracking_uri: str | None) -> None:
    try:
        from pipeline.tracking.store import check_store, resolve_tracking_uri
    except Exception as err:
        report.add("tracking", FAIL, f"pipeline.tracking.store does not import ({type(err).__name__}: {err})")
        return
    from pipeline.errors import Seg3dError

    uri = resolve_tracking_uri(tracking_uri)
    scheme = urlparse(uri).scheme

    def probe() -> str:
        check_store(uri)  # what training checks first: HTTP asks the tracking API once; sqlite and file: writable
        if scheme in ("http", "https"):
            return "tracking server answers"
        if scheme == "sqlite":
            path = uri[len("sqlite:///") :].partition("?")[0]
            return _probe_sqlite(Path(path)) if path and path != ":memory:" else "in-memory store"
        raise AssertionError(f"check_store accepted {uri!r}")  # it refuses every scheme seg3d cannot use

    try:
        report.add("tracking", OK, f"{uri}: {_bounded(probe, TRACKING_TIMEOUT_S)}")
    except Seg3dError as err:
        report.add("tracking", FAIL, str(err))
    except TimeoutError as err:
        report.add("tracking", FAIL, f"{uri}: {err}; check the server and --tracking-uri")
    except (sqlite3.Error, ValueError, OSError) as err:
        report.add("tracking", FAIL, f"{uri}: {err}; choose another --tracking-uri or repair the store")


# -- folders ----------------------------------------------------------------------------------------------------------


def _cache_folders() -> dict[str, Path]:
    """Where torch, matplotlib and MONAI keep caches: the environment variable when set, else the default."""
    home = Path.home()
    xdg_cache = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")
    xdg_config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    folders = {
        "TORCH_HOME": Path(os.environ.get("TORCH_HOME") or xdg_cache / "torch").expanduser(),
        "MPLCONFIGDIR": Path(os.environ.get("MPLCONFIGDIR") or xdg_config / "matplotlib").expanduser(),
    }
    if os.environ.get("MONAI_DATA_DIRECTORY"):
        folders["MONAI_DATA_DIRECTORY"] = Path(os.environ["MONAI_DATA_DIRECTORY"]).expanduser()
    return folders


def _check_root(report: DoctorReport) -> None:
    """Whether / is mounted read-only, as in a container started with --read-only (docker/README.md): seg3d then
    writes only to the output folder, the caches and the temporary folder, the lines around this one."""
    try:
        read_only = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs (Windows): nothing to report
        return
    report.add("root", OK, "/ read-only: results, caches and temporaries only" if read_only else "/ writable")


def _check_folder(report: DoctorReport, name: str, folder: Path, needed: bool) -> None:
    ok, detail = probe_writable(folder)
    if ok:
        report.add(name, OK, detail)
    elif needed:
        report.add(name, FAIL, detail)
    else:
        report.add(name, WARN, f"{detail}; set {name} to a writable folder")
