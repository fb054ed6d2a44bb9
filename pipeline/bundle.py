"""Everything that reads or writes weights: training checkpoints and the model bundle.

Checkpoints (`last.pt`, `best.pt`) hold model, optimiser, scheduler, grad scaler, epoch and RNG state. They
are written atomically (temporary file, fsync, rename, fsync of the folder), so a crash leaves either the old
or the new file, never half of one, and they are read with `torch.load(weights_only=True)`: tensors and plain
containers only, no arbitrary objects unpickled.

The bundle is a directory that inference needs and nothing else:

    model.safetensors     weights (safetensors: no pickle at all)
    config.yaml           the resolved training config
    preprocessing.json    target spacing, intensity statistics, labels (pipeline.transforms.Preprocessing)
    metadata.json         bundle format, model name and its full U-Net config, versions, provenance

A bundle's numbers are not trusted: load_bundle checks every record as strictly as a training config
(pipeline/bundle_checks.py, pipeline/config.py), the weights' names, shapes, types and finiteness, and builds the
network only within a memory budget set by the weights file; save_bundle loads what it wrote before it moves it into
place, so no bundle seg3d writes (or registers) fails to load.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from attention3d import UNet, UNetConfig
from pipeline.bundle_checks import checked_unet
from pipeline.config import Config, config_from_dict
from pipeline.errors import Seg3dError, one_line, shown
from pipeline.fileio import atomic_write, make_temporary_dir, move_folder_into_place
from pipeline.transforms import Preprocessing
from pipeline.yamlio import config_mapping, read_text

BUNDLE_FORMAT = 1
WEIGHTS, CONFIG, PREPROCESSING, METADATA = "model.safetensors", "config.yaml", "preprocessing.json", "metadata.json"


# -- RNG state as tensors and plain lists, so that weights_only loading can restore it -------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002  (the global state MONAI's transforms draw from)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    saved = ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(saved)  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints ------------------------------------------------------------------------------------------------


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_state_dict(model: nn.Module, path: Path) -> None:
    """The model's tensors alone as a PyTorch file (MONAI Bundle's models/model.pt), readable with weights_only."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise Seg3dError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, not a checkpoint at all
        reason = str(err).splitlines()[0][:200]
        raise Seg3dError(
            f"checkpoint {path} cannot be loaded safely ({type(err).__name__}: {reason}); "
            "it is truncated, corrupted or not a seg3d checkpoint"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise Seg3dError(f"checkpoint {path} is not a seg3d training checkpoint (no model/epoch entries)")
    return state


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with a message that names the file and the first tensor that does not fit (name, shape, or a
    type load_state_dict cannot convert: a complex tensor for a float weight)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    kinds = [k for k in own if k in state and own[k].is_floating_point() != state[k].is_floating_point()]
    kinds += [k for k in own if k in state and state[k].is_complex()]
    if missing or unexpected or wrong or kinds:
        if wrong:
            k = wrong[0]
            detail = f"tensor {shown(k)} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}"
        elif kinds:
            k = kinds[0]
            detail = f"tensor {shown(k)} is {state[k].dtype}, the model expects {own[k].dtype}"
        elif missing:
            detail = f"{len(missing)} tensor(s) missing, e.g. {shown(missing[0])}"
        else:
            detail = f"{len(unexpected)} unexpected tensor(s), e.g. {shown(unexpected[0])}"
        raise Seg3dError(f"weights in {source} do not fit the model ({detail}); is it from another model variant?")
    model.load_state_dict(state)


# -- bundle -----------------------------------------------------------------------------------------------------


@dataclass
class Bundle:
    model: UNet
    config: Config
    preprocessing: Preprocessing
    metadata: dict[str, Any]
    path: Path

    @property
    def label_names(self) -> list[str]:
        return self.preprocessing.label_names


def _versions() -> dict[str, str]:
    import monai

    from pipeline import __version__

    return {
        "seg3d": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def save_bundle(
    folder: Path, model: UNet, cfg: Config, pre: Preprocessing, provenance: dict[str, Any] | None = None
) -> Path:
    """Write the bundle into a temporary sibling folder, load it back with every check of load_bundle, then move it
    into place: a bundle that would not load is never written (a Seg3dError says why, and the old one stays)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temporary_dir(folder)
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS, metadata={"format": "pt", "model": cfg.model.name})
        (tmp / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (tmp / PREPROCESSING).write_text(pre.to_json())
        metadata = {
            "bundle_format": BUNDLE_FORMAT,
            "model": cfg.model.name,
            "unet_config": json.loads(json.dumps(asdict(model.config))),
            "labels": dict(zip(pre.label_names, pre.label_values)),
            "versions": _versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(provenance or {}),
        }
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            with torch.random.fork_rng(devices=[]):  # building the check's network must not move the caller's RNG
                _load(tmp, shown_as=folder)
        except Seg3dError as err:
            reason = str(err).removesuffix(f"; {DAMAGED}")
            raise Seg3dError(
                f"not writing {reason}: the bundle would not load (a bundle already there is kept)"
            ) from None
        move_folder_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_bundle(folder: Path | str, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the trained model from a bundle; reads JSON, YAML and safetensors only (never unpickles), and checks
    every record and tensor first (module docstring): a damaged bundle is a one-line Seg3dError naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Seg3dError(f"model bundle {folder} not found (a bundle is a folder: RUN_DIR/bundle)")
    bundle = _load(folder, shown_as=folder)
    bundle.model = bundle.model.to(device)
    return bundle


DAMAGED = "the bundle is damaged: re-export it from its run"
# The network a bundle describes may take this many bytes beyond twice its weights file (float16 weights fill a
# float32 network of twice their size); buffers that are not saved (attention constants) fit in it many times.
BUILD_MARGIN = 64 * 2**20


def _load(folder: Path, shown_as: Path) -> Bundle:
    """Read and check the bundle in `folder`, naming it `shown_as` in messages (save_bundle checks a temporary)."""
    for name in (WEIGHTS, CONFIG, PREPROCESSING, METADATA):
        if not (folder / name).is_file():
            raise Seg3dError(f"model bundle {shown_as} has no {name}; it is incomplete or not a seg3d bundle")

    def where(name: str) -> str:
        return f"model bundle {shown_as}: {name}"

    metadata = _read_json(folder / METADATA, where(METADATA))
    if not isinstance(metadata, dict):
        raise Seg3dError(f"{where(METADATA)}: must be a JSON object, got {type(metadata).__name__}; {DAMAGED}")
    fmt = metadata.get("bundle_format")
    if fmt != BUNDLE_FORMAT:
        versions = metadata.get("versions")
        made_by = versions.get("seg3d", "?") if isinstance(versions, dict) else "?"
        made_by = " ".join(str(made_by).split())[:30]  # one line, a few characters: it is text from the file
        raise Seg3dError(
            f"model bundle {shown_as}: {METADATA} has format {shown(fmt)}, this seg3d reads format {BUNDLE_FORMAT} "
            f"(made by seg3d {made_by}); use a matching seg3d version"
        )
    try:
        pre = Preprocessing.from_json(read_text(folder / PREPROCESSING, where(PREPROCESSING)), where(PREPROCESSING))
        cfg = _read_config(folder / CONFIG, where(CONFIG))
    except Seg3dError as err:
        raise Seg3dError(f"{err}; {DAMAGED}") from None
    try:
        unet_cfg = checked_unet(metadata, model_name=cfg.model.name, num_classes=pre.num_classes)
    except Seg3dError as err:
        raise Seg3dError(f"{where(METADATA)}: {err}; {DAMAGED}") from None
    model = _build(unet_cfg, limit=2 * (folder / WEIGHTS).stat().st_size + BUILD_MARGIN, where=where(METADATA))
    try:
        state = load_file(folder / WEIGHTS, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise Seg3dError(
            f"weights {shown_as / WEIGHTS} cannot be read ({one_line(err, 120)}); the file is truncated or corrupt"
        ) from None
    load_state_dict_checked(model, state, shown_as / WEIGHTS)
    bad = next((k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise Seg3dError(f"weights {shown_as / WEIGHTS}: tensor {shown(bad)} holds NaN or Inf values; {DAMAGED}")
    return Bundle(model=model.eval(), config=cfg, preprocessing=pre, metadata=metadata, path=Path(shown_as))


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(read_text(path, where))
    except (ValueError, RecursionError) as err:  # bad JSON, a 5000-digit integer, nesting without end
        raise Seg3dError(f"{where}: not valid JSON ({one_line(err, 80)}); {DAMAGED}") from None


def _read_config(path: Path, where: str) -> Config:
    """The bundle's config.yaml, validated by the training config's own rules. It is the resolved config, every
    section written out, so a missing section means a cut file, not a default to fill in. (Post-processing rules
    that name a class the model lacks are refused when a Predictor is built with them: --no-postprocess still runs.)"""
    raw = config_mapping(read_text(path, where), where)
    missing = [k for k in Config.model_fields if k not in raw]
    if missing:
        raise Seg3dError(f"{where}: '{missing[0]}' is missing (a bundle stores the whole resolved config)")
    return config_from_dict(raw, where)


class _AllocationLimit(TorchFunctionMode):
    """Counts the bytes every tensor factory call asks for while a network is constructed, measured on the meta
    device before the real allocation, and stops the construction once they pass `limit`: the network a
    metadata.json describes cannot be larger than the weights file meant to fill it, so 4096 channels on every level
    beside a kilobyte of weights is refused before any memory is taken."""

    FACTORIES = frozenset(
        {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.tensor, torch.empty_strided}
    )

    def __init__(self, limit: int):
        super().__init__()
        self.left = limit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES:
            # rand and randn are probed as empty of the same size: their meta path imports sympy (a second).
            random = func in (torch.rand, torch.randn)
            probe_kwargs = {k: v for k, v in kwargs.items() if not (random and k == "generator")}
            probe = (torch.empty if random else func)(*args, **{**probe_kwargs, "device": "meta"})
            self.left -= probe.numel() * probe.element_size()
            if self.left < 0:
                raise _TooLarge
        return func(*args, **kwargs)


class _TooLarge(Exception):
    pass


def _build(cfg: UNetConfig, limit: int, where: str) -> UNet:
    try:
        with _AllocationLimit(limit):
            return UNet(cfg)
    except _TooLarge:
        raise Seg3dError(
            f"{where}: 'unet_config' describes a network larger than the weights file could fill; {DAMAGED}"
        ) from None
    except Exception as err:  # MONAI's layer factories raise KeyError, TypeError, ... for an option they do not know
        raise Seg3dError(f"{where}: 'unet_config' does not build ({one_line(err, 120)}); {DAMAGED}") from None
