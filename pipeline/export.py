"""`seg3d export`: a trained network as a file that runs without seg3d, in ONNX or TorchScript.

The exported graph is the eval-mode network only: one float32 input `image` (B, in_channels, X, Y, Z) and one
output `logits` (B, classes, X, Y, Z). The batch axis is dynamic; the spatial axes are fixed to the patch size,
because the U-Net pads every input to a multiple of its total stride and that padding is computed from the shape
at export time. Sliding-window inference feeds exactly that patch size, so nothing is lost.

Preprocessing (orientation, crop, resampling, intensity scaling) and the sliding-window settings are not part of the
graph; they are written beside it as `OUTPUT.json` (and embedded in the file: ONNX metadata property `seg3d`,
TorchScript extra file `seg3d.json`), so a deployment can reproduce the input the network was trained on.

Every export is checked before it is moved into place: the exported file is loaded (onnxruntime or
torch.jit.load), run on a random batch of two patches, and compared with the PyTorch network; a file that does not
reproduce the network's logits is never written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import faults
from pipeline.bundle import PREPROCESSING
from pipeline.errors import Seg3dError, one_line, shown
from pipeline.fileio import atomic_write, atomic_write_text, remove_temporaries, require_output_folder, sha256_file

FORMATS = ("onnx", "torchscript")  # one network file
FOLDER_FORMATS = ("monai-bundle",)  # a folder with the network, its pre- and post-processing: pipeline/monai_bundle.py
INPUT_NAME, OUTPUT_NAME = "image", "logits"
EXPORT_FORMAT = 1  # version of the sidecar's layout
# fp32 kernels of another runtime sum in another order; 1e-4 of the logits' scale is far below what changes a label.
REL_TOLERANCE = 1e-4
CHECK_BATCH = 2  # the check runs a batch of two, so a batch axis that was frozen to 1 at export fails it


class _Logits(nn.Module):
    """The network in eval mode with a single tensor in and out: the graph a deployment runs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    model: str
    patch: tuple[int, int, int]
    max_abs_error: float  # exported vs PyTorch logits on the check batch
    logit_scale: float  # max |logit| of the PyTorch network on the check batch
    seconds: float
    preprocessing: Path | None = None  # the bundle's preprocessing.json, when exported from a local bundle


def sidecar_path(output: Path) -> Path:
    """`model.onnx` -> `model.onnx.json`."""
    output = Path(output)
    return output.with_name(output.name + ".json")


def parse_patch(spec: str) -> tuple[int, int, int]:
    """`X,Y,Z` (voxels) -> a tuple of three positive ints, within the bounds a config's data.patch_size has."""
    from pipeline.bounds import patch_problem

    parts = [p.strip() for p in spec.split(",")]
    # ASCII digits only: str.isdigit() takes "²", which int() refuses; and no number of a thousand digits.
    if len(parts) != 3 or not all(re.fullmatch(r"[0-9]{1,9}", p) and int(p) > 0 for p in parts):
        raise Seg3dError(f"--patch {shown(spec)} must be three positive integers X,Y,Z, e.g. --patch 96,96,64")
    patch = (int(parts[0]), int(parts[1]), int(parts[2]))
    problem = patch_problem(patch)
    if problem:
        raise Seg3dError(f"--patch {shown(spec)}: {problem}; e.g. --patch 96,96,64")
    return patch


def check_format(fmt: str, folders: bool = False) -> str:
    """`fmt` if it is a network-file format (or, with `folders`, a folder format too)."""
    if fmt in FORMATS or (folders and fmt in FOLDER_FORMATS):
        return fmt
    if fmt in FOLDER_FORMATS:
        raise Seg3dError(f"export format {fmt!r} writes a folder, not one file: use pipeline.monai_bundle")
    raise Seg3dError(f"unknown export format {fmt!r}; choose one of {', '.join((*FORMATS, *FOLDER_FORMATS))}")


def check_output(output: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written or would replace files without --overwrite.

    The model file and its sidecar are a pair: the model is written first and the sidecar last, so a sidecar means a
    finished export. What a killed export left (temporaries; a model of ours without its sidecar) is cleared here,
    so a rerun finishes the job instead of being refused."""
    output = Path(output)
    sidecar = sidecar_path(output)
    if output.is_dir():
        raise Seg3dError(f"--output {output} is a folder; give a file name, e.g. {output / 'model.onnx'}")
    if output.parent.is_dir():
        remove_temporaries(output.parent, names=[output.name, sidecar.name])
    unfinished = output.is_file() and not sidecar.exists() and _is_seg3d_export(output)
    existing = [p for p in (output, sidecar) if p.exists() and not (unfinished and p == output)]
    if existing and not overwrite:
        raise Seg3dError(f"{existing[0]} exists; --overwrite replaces it")
    require_output_folder(output.parent)


def _is_seg3d_export(path: Path) -> bool:
    """Whether `path` is a model seg3d exported (its embedded record, read without running or unpickling it)."""
    try:
        if zipfile.is_zipfile(path):  # TorchScript: a zip with the extra file seg3d.json
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/extra/seg3d.json") for name in archive.namelist())
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return any(prop.key == "seg3d" for prop in model.metadata_props)
    except Exception:  # not a model at all, or a broken one: not ours to replace without --overwrite
        return False


@contextlib.contextmanager
def _quiet():
    """The exporters warn about what is expected here (shape-dependent padding frozen at the patch size, TorchScript's
    deprecation, torchvision ops that are not installed); the user asked for a file, not for those."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)


# -- the two exporters: write `tmp`, return what they want recorded -------------------------------------------------


def _export_onnx(
    graph: nn.Module, example: torch.Tensor, tmp: Path, info: str, extra: dict[str, str]
) -> dict[str, Any]:
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it; an ImportError deep inside it is less clear)
    except ImportError:
        raise Seg3dError("ONNX export needs the packages onnx and onnxscript: pip install onnx onnxscript") from None
    # The torch.export-based exporter (the default since torch 2.9); the TorchScript-based one is deprecated.
    program = torch.onnx.export(
        graph,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,
    )
    program.model.metadata_props["seg3d"] = info
    program.model.metadata_props.update(extra)
    program.save(str(tmp), external_data=False)  # one file: the sidecar and the atomic rename expect one
    return {"opset": int(program.model.opset_imports.get("", 0))}


def _export_torchscript(
    graph: nn.Module, example: torch.Tensor, tmp: Path, info: str, extra: dict[str, str]
) -> dict[str, Any]:
    # Tracing, not scripting: the U-Net's config dataclass and its dict of auxiliary outputs are not TorchScript.
    with torch.no_grad():
        traced = torch.jit.trace(graph, example, check_trace=False)
    torch.jit.save(traced, str(tmp), _extra_files={"seg3d.json": info, **extra})
    return {}


def run_exported(path: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    """Run an exported file the way a deployment would: onnxruntime for ONNX, torch.jit.load for TorchScript."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def export_network(
    net: nn.Module,
    output: Path,
    *,
    fmt: str,
    name: str,
    patch: tuple[int, int, int],
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
    seed: int = 0,
    extra_files: dict[str, str] | None = None,
) -> ExportResult:
    """Export `net` (a registered variant `name`) for inputs of (B, in_channels, *patch), check the file against the
    network, then write it and its sidecar `OUTPUT.json` atomically. `info` goes into the sidecar (preprocessing...).
    `extra_files` (name -> text) are embedded too: TorchScript extra files (MONAI Deploy reads a bundle's
    metadata.json and inference.json from there), ONNX metadata properties.

    A variant the exporter cannot handle raises Seg3dError naming the variant, the format and the exporter's reason.
    """
    start = time.perf_counter()
    output = Path(output)
    check_format(fmt)
    check_output(output, overwrite)
    net = net.to("cpu").float().eval()
    in_channels = int(getattr(getattr(net, "config", None), "in_channels", 1))
    graph = _Logits(net).eval()
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(1, in_channels, *patch, generator=generator)
    check = torch.randn(CHECK_BATCH, in_channels, *patch, generator=generator)
    with torch.no_grad():
        reference = graph(check).numpy()
    if reference.ndim != 5:
        raise Seg3dError(f"{name}: the network returns {reference.ndim}-d output, export needs logits (B, K, X, Y, Z)")
    scale = float(np.abs(reference).max())
    record: dict[str, Any] = {
        "seg3d_export": EXPORT_FORMAT,
        "format": fmt,
        "model": name,
        "input": {"name": INPUT_NAME, "shape": ["batch", in_channels, *patch], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", int(reference.shape[1]), *patch], "dtype": "float32"},
        "patch_size": list(patch),
        **(info or {}),
    }
    embedded = json.dumps(record, indent=2)
    sidecar = sidecar_path(output)
    error = float("nan")

    def write(tmp: Path) -> None:
        nonlocal error
        exporter = _export_onnx if fmt == "onnx" else _export_torchscript
        try:
            with _quiet():
                extra = exporter(graph, example, tmp, embedded, extra_files or {})
                exported = run_exported(tmp, fmt, check.numpy())
        except Seg3dError:
            raise
        except Exception as err:  # the exporters raise anything from torch._dynamo to onnxruntime errors
            reason = f"{type(err).__name__}: {one_line(err)}"
            raise Seg3dError(f"model {name} cannot be exported to {fmt}: {reason}") from err
        if exported.shape != reference.shape:
            raise Seg3dError(
                f"model {name} exported to {fmt} returns shape {exported.shape} for a batch of {CHECK_BATCH}, the"
                f" network {reference.shape}; the export is wrong, nothing was written"
            )
        error = float(np.abs(exported - reference).max())
        if not error <= REL_TOLERANCE * max(scale, 1.0):
            raise Seg3dError(
                f"model {name} exported to {fmt} differs from the PyTorch network by up to {error:.3g} (logits up to"
                f" {scale:.3g}); nothing was written"
            )
        head = {"seg3d_export": EXPORT_FORMAT, "file": output.name, "sha256": sha256_file(tmp), **extra}
        check_record = {"check": {"batch": CHECK_BATCH, "max_abs_error": error, "logit_scale": scale}}
        sidecar_text.append(json.dumps({**head, **record, **check_record}, indent=2) + "\n")

    sidecar_text: list[str] = []
    sidecar.unlink(missing_ok=True)  # (with --overwrite) no sidecar may describe a model that is being replaced
    try:
        atomic_write(output, write)  # the model first ...
        faults.point("export.model_written")
        atomic_write_text(sidecar, sidecar_text[0])  # ... its sidecar last: a sidecar means a finished pair
    except OSError as err:
        for path in (output, sidecar):
            path.unlink(missing_ok=True)
        raise Seg3dError(f"cannot write {output} ({err.strerror or err}); choose another --output") from None
    return ExportResult(
        path=output,
        sidecar=sidecar,
        format=fmt,
        model=name,
        patch=tuple(patch),
        max_abs_error=error,
        logit_scale=scale,
        seconds=time.perf_counter() - start,
    )


def _bundle_info(bundle, source: str) -> dict[str, Any]:
    """What a deployment needs to feed the exported network: the bundle's preprocessing, in order, and the
    sliding-window settings of `seg3d infer`."""
    from pipeline import __version__

    pre, cfg = bundle.preprocessing, bundle.config
    lo, hi = pre.clip
    steps = ["read the CT in Hounsfield units", "reorient to RAS (axes x, y, z of the input = R, A, S)"]
    if pre.foreground_crop:
        steps.append(f"crop to the body: voxels above {pre.body_threshold_hu} HU, margin 2 voxels")
    steps.append(f"resample (trilinear) to spacing {list(pre.target_spacing)} mm")
    if pre.intensity_mode == "window":
        steps.append(f"clip to [{lo}, {hi}] HU, then scale linearly to [-1, 1]")
    else:
        steps.append(f"clip to [{lo}, {hi}] HU, then (x - {pre.mean}) / {pre.std}")
    steps.append(
        f"sliding window of patch_size, overlap {cfg.inference.overlap}, Gaussian weights (sigma = patch *"
        f" {cfg.inference.sigma_scale}); softmax over the class axis; class i is labels[i]"
    )
    return {
        "source": source,
        "labels": dict(zip(pre.label_names, pre.label_values)),
        "preprocessing": asdict(pre),
        "preprocessing_steps": steps,
        "sliding_window": {
            "overlap": cfg.inference.overlap,
            "mode": "gaussian",
            "sigma_scale": cfg.inference.sigma_scale,
            "sw_batch_size": cfg.inference.sw_batch_size,
        },
        "unet_config": bundle.metadata.get("unet_config"),
        "versions": {"seg3d": __version__, "torch": torch.__version__},
    }


def refuse_ensemble(folder: Path, given: str) -> None:
    """An exported file holds one network; an ensemble's averaging, its members' own preprocessing and its
    post-processing are not a graph. So an ensemble is refused, naming a member to export instead (its folder
    listing only: ensemble.json is not read for a message)."""
    from pipeline.ensemble import MEMBERS, is_ensemble

    if not is_ensemble(folder):
        return
    members = folder / MEMBERS
    names = sorted(p.name for p in members.iterdir() if p.is_dir()) if members.is_dir() else []
    listed = f" (members: {', '.join(shown(n, 40) for n in names[:8])}{', ...' if len(names) > 8 else ''})"
    example = f"{given}/{MEMBERS}/{names[0] if names else 'NAME'}"
    if given.startswith("models:/"):
        example = f"ENSEMBLE/{MEMBERS}/{names[0] if names else 'NAME'} of a local copy"
    raise Seg3dError(
        f"{given} is an ensemble{listed if names else ''}: an exported file holds one network, and an ensemble's"
        f" averaging, its members' preprocessing and its post-processing are not part of one; nothing was written."
        f" Export one member at a time: --model {example}"
    )


def export_model(
    model: str | Path,
    output: str | Path,
    *,
    fmt: str,
    patch: tuple[int, int, int] | None = None,
    tracking_uri: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export a bundle (folder, `runs:/ID/path` or `models:/NAME/VERSION`) to `output` in `fmt`, with the bundle's
    patch size unless `patch` is given. Everything the user can get wrong is checked before the bundle is read."""
    from pipeline.bundle import load_bundle
    from pipeline.infer import resolve_model

    output = Path(output)
    check_format(fmt)
    is_local = not str(model).startswith(("runs:/", "models:/"))
    if is_local:
        refuse_ensemble(Path(model), str(model))
    check_output(output, overwrite)
    with tempfile.TemporaryDirectory(prefix="seg3d-export-") as workdir:
        folder = resolve_model(str(model), tracking_uri, Path(workdir))
        refuse_ensemble(folder, str(model))
        bundle = load_bundle(folder)
        name = bundle.config.model.name
        size = tuple(patch) if patch is not None else tuple(bundle.config.data.patch_size)
        result = export_network(
            bundle.model,
            output,
            fmt=fmt,
            name=name,
            patch=size,
            info=_bundle_info(bundle, str(model)),
            overwrite=overwrite,
        )
        result.preprocessing = (Path(folder) / PREPROCESSING).resolve() if is_local else None
    return result
