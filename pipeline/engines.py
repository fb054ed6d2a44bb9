"""The engine that runs the bundle's network inside the sliding window: PyTorch itself, or the same network exported
to ONNX and run by ONNX Runtime's CPU provider or by OpenVINO's CPU runtime (Intel's inference engine; bf16 on CPUs
with AMX or AVX512-BF16 where the Predictor runs bf16, else fp32). Only the network call differs; windows, blending,
inversion and post-processing are the Predictor's, whatever the engine.

`auto` measures every engine once per machine and bundle on a few windows and keeps the fastest one that reproduces
PyTorch's fp32 probabilities within TOLERANCE, or, where the Predictor runs in bf16, no further from them than twice
PyTorch's own bf16 (the rounding the user asked for, not an engine's error). The choice, the timings and the check
are cached as JSON in the engine cache folder (SEG3D_CACHE, else $XDG_CACHE_HOME/seg3d, else ~/.cache/seg3d), keyed
by the network's weights, the patch, the batch, the engine versions, the CPU, the thread count and the precision: a
changed bundle, a new engine release or another machine measures again, and the next case costs nothing. The
exported ONNX file is cached the same way (and OpenVINO's compiled blobs beside it). Nothing is ever written beside
the bundle (inference leaves its inputs alone); a cache folder that cannot be written falls back to a temporary one,
said in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import Seg3dError, one_line
from pipeline.fileio import atomic_write_text, sha256_file

ENGINES = ("torch", "onnxruntime", "openvino")
CHOICES = ("auto", *ENGINES)
TOLERANCE = 1e-3  # max |difference| of the softmax probabilities against fp32 PyTorch on the check windows
CHECK_WINDOWS = 3  # batches of windows the check runs; each engine times each of them TIMING_PASSES times
TIMING_PASSES = 2  # interleaved over the engines, so that a busy moment slows them all, not the one timed then
# What the engines build from an export; a new recipe measures again (2: bf16 keeps the first block in f32).
GRAPH_RECIPE = 2
STALE_RATIO = 0.75  # a run whose network is this much faster than its measured figure marks the choice stale


def cache_root() -> Path:
    """SEG3D_CACHE, else $XDG_CACHE_HOME/seg3d, else ~/.cache/seg3d; its `engines/` holds this module's files."""
    if os.environ.get("SEG3D_CACHE"):
        return Path(os.environ["SEG3D_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "seg3d"


def check_engine(name: str) -> str:
    if name not in CHOICES:
        raise Seg3dError(f"--backend {name} is not an engine; choose one of {', '.join(CHOICES)}")
    return name


def _versions() -> dict[str, str]:
    import onnxruntime
    import openvino

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}


def _cpu() -> str:
    from pipeline.devices import cpu_info

    return f"{cpu_info()[0]} ({platform.machine()})"


def network_key(model: nn.Module, patch: tuple[int, ...], batch: int) -> str:
    """What a cached export or choice depends on: weights, patch, batch, engine versions, CPU and threads."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    context = {"patch": list(patch), "batch": batch, "versions": _versions(), "cpu": _cpu()}
    context["threads"] = torch.get_num_threads()
    context["graph"] = GRAPH_RECIPE
    digest.update(json.dumps(context, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def cache_folder(notes: Callable[[str], None] | None = None) -> Path:
    """The engines cache folder, made if missing; a temporary folder (said in one line) where it cannot be written."""
    folder = cache_root() / "engines"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-", delete=True)
        probe.close()
        return folder
    except OSError as err:
        fallback = Path(tempfile.mkdtemp(prefix="seg3d-engines-"))
        if notes:
            notes(f"engine cache {folder} cannot be written ({err.strerror or err}); using {fallback} for this run")
        return fallback


class OnnxNetwork(nn.Module):
    """The network as ONNX Runtime runs it: logits (B, K, *patch) float32 for windows (B, C, *patch)."""

    def __init__(self, path: Path, threads: int):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No spinning: idle threads that spin after each batch take the cores the window stitching needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its graph-optimizer notes are not the user's business
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])


class OpenVinoNetwork(nn.Module):
    """The network as OpenVINO's CPU runtime runs it, compiled for a static batch of `batch` windows (a shorter last
    batch is padded) at `precision` ("f32" or "bf16"); compiled blobs are cached in `cache_dir`."""

    def __init__(self, path: Path, *, batch: int, precision: str, threads: int, cache_dir: Path):
        super().__init__()
        import openvino as ov

        core = ov.Core()
        core.set_property({"CACHE_DIR": str(cache_dir)})
        model = core.read_model(str(path))
        declared = model.input(0).get_partial_shape()  # (batch: dynamic, channels, *patch)
        shape = [batch, *(declared[i].get_length() for i in range(1, declared.rank.get_length()))]
        model.reshape({model.input(0): ov.PartialShape(shape)})
        self.f32_layers: list[str] = []
        if precision == "bf16":
            model, self.f32_layers = _first_block_in_f32(core, model, cache_dir)
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.batch, self.precision = batch, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if n < self.batch:  # the sliding window's last batch
            array = np.concatenate([array, np.zeros((self.batch - n, *array.shape[1:]), array.dtype)])
        out = self.request.infer({0: array})[self.output]
        return torch.from_numpy(np.array(out[:n], dtype=np.float32, copy=True))


def _first_block_in_f32(core, model, folder: Path):
    """`model` with its first block's convolutions (those at the input's full resolution, before the first strided
    convolution or pooling) kept in f32 when the rest runs in bf16, as PyTorch's bf16 does
    (pipeline.predict.keep_first_block_in_fp32), and their names. OpenVINO's CPU plugin leaves a node at its
    original precision when the node carries the DisablePrecisionConversion attribute; Python cannot build that
    attribute, but OpenVINO's IR reader can: the model goes through an IR whose XML carries it on those layers
    (tests/pipeline/test_engines.py checks the compiled model's runtime precisions)."""
    import xml.etree.ElementTree as ET

    import openvino as ov

    full = list(model.input(0).get_partial_shape())[2:]
    names = []
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("MaxPool", "AvgPool", "AdaptiveMaxPool", "AdaptiveAvgPool"):
            break
        if kind in ("Convolution", "GroupConvolution"):
            if list(op.get_input_partial_shape(0))[2:] != full or any(s != 1 for s in op.get_strides()):
                break
            names.append(op.get_friendly_name())
    if not names:
        return model, names
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        tree = ET.parse(xml)
        for layer in tree.getroot().iter("layer"):
            if layer.get("name") in names:
                rt_info = layer.find("rt_info")
                if rt_info is None:
                    rt_info = ET.Element("rt_info")
                    layer.insert(0, rt_info)
                ET.SubElement(rt_info, "attribute", name="DisablePrecisionConversion", version="0", value="dynamic:f16")
        tree.write(xml)
        return core.read_model(str(xml)), names


def export_onnx(model: nn.Module, patch: tuple[int, int, int], batch: int, cache: Path | None = None) -> Path:
    """`model` exported to ONNX once per key (pipeline.export checks the file against PyTorch before it is kept) in
    `cache` (default: cache_folder()); both ONNX Runtime and OpenVINO run that file."""
    from pipeline.export import export_network

    folder = (cache or cache_folder()) / network_key(model, patch, batch)
    path = folder / "model.onnx"
    if not _intact(path):  # missing, or not the file its export checked: exported (again)
        folder.mkdir(parents=True, exist_ok=True)
        export_network(model, path, fmt="onnx", name=type(model).__name__, patch=patch, overwrite=True)
    return path


def onnx_network(model: nn.Module, patch: tuple[int, int, int], batch: int, cache: Path | None = None) -> OnnxNetwork:
    return OnnxNetwork(export_onnx(model, patch, batch, cache), threads=torch.get_num_threads())


def engine_network(name: str, onnx: Path, batch: int, dtype: torch.dtype) -> nn.Module:
    """The exported network `onnx` as engine `name` (not "torch") runs it: OpenVINO in bf16 where the Predictor runs
    bf16 (AMX or AVX512-BF16 CPUs), else in fp32. Seg3dError where the engine cannot compile it (the caller runs the
    network in PyTorch instead, with one line)."""
    threads = torch.get_num_threads()
    if name == "onnxruntime":
        return OnnxNetwork(onnx, threads=threads)
    precision = "bf16" if dtype == torch.bfloat16 else "f32"
    try:
        return OpenVinoNetwork(onnx, batch=batch, precision=precision, threads=threads, cache_dir=onnx.parent / "ov")
    except RuntimeError as err:  # OpenVINO's own: an operation its CPU plugin lacks
        raise Seg3dError(f"OpenVINO cannot compile the network ({one_line(err, 200)})") from None


def _intact(path: Path) -> bool:
    """The cached file is the one pipeline.export checked: its sidecar's SHA-256 matches."""
    from pipeline.export import sidecar_path

    try:
        return json.loads(sidecar_path(path).read_text())["sha256"] == sha256_file(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


@dataclass
class EngineChoice:
    engine: str
    ms_per_batch: dict[str, float]  # engine -> best milliseconds per batch of windows
    max_difference: dict[str, float]  # engine -> max |probability difference| against fp32 PyTorch
    rejected: dict[str, str]  # engine -> why it was not eligible
    key: str
    cached: bool = False


def _probabilities(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(network(x).float(), dim=1)


def _best_ms(networks: dict[str, Callable[[torch.Tensor], torch.Tensor]], windows: list[torch.Tensor]) -> dict:
    """Best milliseconds per batch for each network, timed interleaved: every batch runs through every network in
    turn, TIMING_PASSES times, after one warm-up batch each (first-call allocations and kernel choices are not the
    steady state). A moment of load from elsewhere then slows every engine alike instead of the one timed then."""
    times: dict[str, list[float]] = {name: [] for name in networks}
    with torch.no_grad():
        for network in networks.values():
            network(windows[0])
        for _ in range(TIMING_PASSES):
            for x in windows:
                for name, network in networks.items():
                    start = time.perf_counter()
                    network(x)
                    times[name].append(time.perf_counter() - start)
    return {name: round(1000 * min(seconds), 2) for name, seconds in times.items()}


def choose_engine(
    model: nn.Module,
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    patch: tuple[int, int, int],
    batch: int,
    in_channels: int = 1,
    cache: Path | None = None,
    notes: Callable[[str], None] | None = None,
    precision: str = "float32",
) -> EngineChoice:
    """The fastest of `candidates` (engine -> network, "torch" among them: PyTorch as the Predictor runs it, its
    precision and layout, always eligible) whose probabilities match fp32 PyTorch (`model` without autocast) within
    TOLERANCE, or within twice PyTorch's own difference where that is larger (bf16), measured on CHECK_WINDOWS
    batches of windows (fixed seed), or read from the cache. `precision`, the Predictor's, is part of the cache key."""
    key = network_key(model, patch, batch)
    record = _record(cache or cache_folder(notes), key, precision)
    if record.exists():
        try:
            saved = json.loads(record.read_text())
            stale = saved.pop("stale", False)  # a run found the network faster than measured: measure again
            cached = EngineChoice(**{**saved, "cached": True})
            if cached.engine in candidates and not stale:
                return cached
        except (ValueError, TypeError, AttributeError):
            pass  # a damaged record is measured again and replaced
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randn(batch, in_channels, *patch, generator=generator) for _ in range(CHECK_WINDOWS)]
    reference = _probabilities(model.eval(), windows[0])
    eligible, difference, rejected = {}, {}, {}
    for name, network in {"torch": candidates["torch"], **candidates}.items():
        difference[name] = float((_probabilities(network, windows[0]) - reference).abs().max())
        limit = max(TOLERANCE, 2 * difference["torch"])  # PyTorch at the Predictor's precision sets the bar
        if name != "torch" and difference[name] > limit:
            rejected[name] = f"probabilities differ from PyTorch's by {difference[name]:.2g} (> {limit:.2g})"
            continue
        eligible[name] = network
    ms = _best_ms(eligible, windows)
    choice = EngineChoice(min(ms, key=ms.get), ms, difference, rejected, key)
    fields = asdict(choice)
    fields.pop("cached")
    try:
        atomic_write_text(record, json.dumps(fields, indent=2) + "\n")
    except OSError as err:
        if notes:
            notes(f"engine choice not cached ({err.strerror or err}); the next run measures again")
    return choice


def _record(cache: Path, key: str, precision: str) -> Path:
    return cache / f"{key}-{precision}.json"


def choice_record(choice: EngineChoice, precision: str, cache: Path) -> Path:
    """Where choose_engine cached `choice`."""
    return _record(cache, choice.key, precision)


def confirm_choice(
    choice: EngineChoice, ms_per_batch: float, record: Path, notes: Callable[[str], None] | None = None
) -> bool:
    """After a run: where the chosen engine ran its batches faster than STALE_RATIO times the figure it was chosen
    by, that figure was taken while something else loaded the machine (and so maybe every other engine's too): the
    cached choice is marked stale, said in one line, and the next run measures again. True when it was marked."""
    measured = choice.ms_per_batch.get(choice.engine)
    if not measured or ms_per_batch >= STALE_RATIO * measured:
        return False
    try:
        saved = json.loads(record.read_text())
        if saved.get("key") != choice.key or saved.get("engine") != choice.engine:
            return False  # replaced meanwhile (another process measured again)
        atomic_write_text(record, json.dumps({**saved, "stale": True}, indent=2) + "\n")
    except (OSError, ValueError, AttributeError):
        return False
    if notes:
        notes(
            f"backend auto: {choice.engine} ran its batches in {ms_per_batch:.0f} ms, not the {measured:.0f} ms it was"
            " chosen by (measured on a busy machine?): the next run measures the engines again"
        )
    return True


def describe(choice: EngineChoice) -> str:
    timed = ", ".join(f"{name} {ms:.0f} ms" for name, ms in sorted(choice.ms_per_batch.items(), key=lambda kv: kv[1]))
    source = "cached" if choice.cached else "measured"
    line = f"backend auto: {choice.engine} ({source} per batch of windows: {timed})"
    if choice.rejected:
        line += "; not eligible: " + "; ".join(f"{name}: {why}" for name, why in choice.rejected.items())
    return line
