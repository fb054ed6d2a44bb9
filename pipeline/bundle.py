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

from attention3d import UNet, UNetConfig
from pipeline import faults
from pipeline.config import Config, config_from_dict
from pipeline.errors import Seg3dError
from pipeline.fileio import atomic_write, fsync_dir, make_temporary_dir
from pipeline.transforms import Preprocessing

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
    """load_state_dict with a message that names the file and the first tensor that does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            detail = f"tensor {k} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}"
        elif missing:
            detail = f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
        else:
            detail = f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}"
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
    """Write the bundle into a temporary sibling folder, then move it into place."""
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
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        faults.point(f"write.{folder.name}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_bundle(folder: Path | str, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the trained model from a bundle; reads JSON, YAML and safetensors only (never unpickles)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Seg3dError(f"model bundle {folder} not found (a bundle is a folder: RUN_DIR/bundle)")
    for name in (WEIGHTS, CONFIG, PREPROCESSING, METADATA):
        if not (folder / name).is_file():
            raise Seg3dError(f"model bundle {folder} has no {name}; it is incomplete or not a seg3d bundle")
    try:
        metadata = json.loads((folder / METADATA).read_text())
        pre = Preprocessing.from_json((folder / PREPROCESSING).read_text())
        raw_cfg = yaml.safe_load((folder / CONFIG).read_text())
    except (json.JSONDecodeError, yaml.YAMLError, TypeError, KeyError) as err:
        raise Seg3dError(f"model bundle {folder}: unreadable metadata ({type(err).__name__}); re-export it") from None
    fmt = metadata.get("bundle_format")
    if fmt != BUNDLE_FORMAT:
        raise Seg3dError(
            f"model bundle {folder} has format {fmt!r}, this seg3d reads format {BUNDLE_FORMAT} "
            f"(made by seg3d {metadata.get('versions', {}).get('seg3d', '?')}); use a matching seg3d version"
        )
    cfg = config_from_dict(raw_cfg, source=str(folder / CONFIG))
    try:
        unet_cfg = UNetConfig.from_kwargs(**metadata["unet_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise Seg3dError(f"model bundle {folder}: metadata.json has no valid unet_config ({err})") from None
    model = UNet(unet_cfg)
    try:
        state = load_file(folder / WEIGHTS, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise Seg3dError(
            f"weights {folder / WEIGHTS} cannot be read ({err}); the file is truncated or corrupt"
        ) from None
    load_state_dict_checked(model, state, folder / WEIGHTS)
    return Bundle(model=model.to(device).eval(), config=cfg, preprocessing=pre, metadata=metadata, path=folder)
