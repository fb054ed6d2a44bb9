"""What the records of a model bundle must hold, checked as strictly as a training config.

A bundle comes from anywhere (a colleague's folder, an MLflow store, a download) and its numbers go straight into
inference: a NaN mean or a zero std turns every voxel into NaN, a reversed clip or a zero spacing segments garbage
with exit code 0, an absurd channel count allocates without bound. So every field of preprocessing.json
(pipeline.transforms.Preprocessing) and the network metadata.json describes are typed and range-checked here, and a
problem is a one-line Seg3dError naming the key. `seg3d train` runs the same checks on what it computed before it
writes anything (pipeline/run_start.py), and save_bundle loads what it wrote before it moves it into place.
"""

from __future__ import annotations

import math
from typing import Any

from attention3d import UNetConfig, unet_config
from pipeline.bounds import unet_problem
from pipeline.config import ModelConfig, describe_validation
from pipeline.errors import Seg3dError, one_line, shown

INTENSITY_MODES = ("foreground", "window")
SPACING_SOURCES = ("median", "config")
MAX_LABEL_VALUE = 255  # label maps are 8-bit class ids (pipeline.datalists)
MAX_NAME_LENGTH = 64  # a class name becomes a DICOM SEG segment label (VR LO: at most 64 characters) and a CSV column
REQUIRED = (
    "target_spacing",
    "intensity_mode",
    "clip",
    "mean",
    "std",
    "foreground_crop",
    "body_threshold_hu",
    "label_names",
    "label_values",
    "exhaustive",
)
OPTIONAL = ("spacing_source", "extra")
FROM_DATA = ("spatial_dims", "in_channels", "out_channels")  # set by the data, not options of the config


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(raw: dict, key: str, positive: bool = False) -> float:
    v = raw[key]
    if not _is_number(v) or (positive and v <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise Seg3dError(f"'{key}' must be {kind}, got {shown(v)}")
    return float(v)


def _numbers(raw: dict, key: str, count: int, what: str, positive: bool = False) -> tuple[float, ...]:
    v = raw[key]
    ok = isinstance(v, (list, tuple)) and len(v) == count and all(_is_number(x) and (not positive or x > 0) for x in v)
    if not ok:
        raise Seg3dError(f"'{key}' must be {what}, got {shown(v)}")
    return tuple(float(x) for x in v)


def _flag(raw: dict, key: str) -> bool:
    if not isinstance(raw[key], bool):
        raise Seg3dError(f"'{key}' must be true or false, got {shown(raw[key])}")
    return raw[key]


def _choice(raw: dict, key: str, choices: tuple[str, ...]) -> str:
    if raw[key] not in choices or not isinstance(raw[key], str):
        raise Seg3dError(f"'{key}' must be one of {', '.join(choices)}, got {shown(raw[key])}")
    return raw[key]


def _labels(raw: dict) -> tuple[list[str], list[int]]:
    names, values = raw["label_names"], raw["label_values"]
    limit = MAX_LABEL_VALUE + 1
    if not isinstance(names, list) or not 2 <= len(names) <= limit:
        raise Seg3dError(f"'label_names' must list 2..{limit} classes, background first, got {shown(names)}")
    for name in names:
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LENGTH or not name.isprintable():
            raise Seg3dError(
                f"'label_names' must be printable names of 1..{MAX_NAME_LENGTH} characters, got {shown(name)}"
            )
    if len(set(names)) != len(names):
        raise Seg3dError(f"'label_names' names a class twice: {shown(names)}")
    if not isinstance(values, list) or len(values) != len(names):
        raise Seg3dError(
            f"'label_values' must list one value per class of 'label_names' ({len(names)}), got {shown(values)}"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LABEL_VALUE for v in values):
        raise Seg3dError(f"'label_values' must be whole numbers in 0..{MAX_LABEL_VALUE}, got {shown(values)}")
    if values[0] != 0 or 0 in values[1:]:
        raise Seg3dError(f"'label_values' must start with 0 (the background) and use 0 only there, got {shown(values)}")
    if len(set(values)) != len(values):
        raise Seg3dError(f"'label_values' gives one value to two classes: {shown(values)}")
    return list(names), list(values)


def checked_preprocessing(raw: Any) -> dict[str, Any]:
    """The fields of a Preprocessing (as read from preprocessing.json, or as training computed them) with their
    types checked and normalised (tuples of floats); a Seg3dError names the first key that is wrong."""
    if not isinstance(raw, dict):
        raise Seg3dError(f"must be a JSON object of preprocessing fields, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise Seg3dError(f"unknown key {shown(unknown[0])}; valid keys: {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise Seg3dError(f"'{missing[0]}' is missing")
    clip = _numbers(raw, "clip", 2, "[low, high] in HU, two finite numbers")
    if clip[0] >= clip[1]:
        raise Seg3dError(f"'clip' must be [low, high] with low < high, got {shown(list(clip))}")
    names, values = _labels(raw)
    out = {
        "target_spacing": _numbers(raw, "target_spacing", 3, "three positive finite spacings in mm", positive=True),
        "intensity_mode": _choice(raw, "intensity_mode", INTENSITY_MODES),
        "clip": clip,
        "mean": _number(raw, "mean"),
        "std": _number(raw, "std", positive=True),
        "foreground_crop": _flag(raw, "foreground_crop"),
        "body_threshold_hu": _number(raw, "body_threshold_hu"),
        "label_names": names,
        "label_values": values,
        "exhaustive": _flag(raw, "exhaustive"),
    }
    if "spacing_source" in raw:
        out["spacing_source"] = _choice(raw, "spacing_source", SPACING_SOURCES)
    if "extra" in raw:
        if not isinstance(raw["extra"], dict):
            raise Seg3dError(f"'extra' must be a JSON object, got {shown(raw['extra'])}")
        out["extra"] = raw["extra"]
    return out


def checked_unet(metadata: Any, *, model_name: str, num_classes: int) -> UNetConfig:
    """The network metadata.json describes, checked: a mapping whose 'model' is the config's model, and a
    'unet_config' that the training config's model section accepts (types, consistency, unet_problem's bounds), for
    one CT channel in and one output per class."""
    if not isinstance(metadata, dict):
        raise Seg3dError(f"must be a JSON object, got {type(metadata).__name__}")
    if metadata.get("model") != model_name:
        raise Seg3dError(f"'model' is {shown(metadata.get('model'))}, but config.yaml's model.name is {model_name!r}")
    unet = metadata.get("unet_config")
    if not isinstance(unet, dict):
        raise Seg3dError(f"'unet_config' must be a JSON object of U-Net options, got {shown(unet)}")
    expected = {"spatial_dims": 3, "in_channels": 1, "out_channels": num_classes}
    for key, want in expected.items():
        got = unet.get(key)
        if type(got) is not int or got != want:
            why = " (one per class of preprocessing.json's label_names)" if key == "out_channels" else ""
            raise Seg3dError(f"'unet_config.{key}' must be {want}{why}, got {shown(got)}")
    options = {k: v for k, v in unet.items() if k not in FROM_DATA}
    typed = describe_validation(ModelConfig, {"name": model_name, **options}, prefix="unet_config")
    values = typed.model_dump()
    try:
        # The variant's own defaults for any option the record lacks; an explicit null stays null.
        cfg = unet_config(model_name, **expected, **{k: values[k] for k in options})
    except (TypeError, ValueError) as err:
        raise Seg3dError(f"'unet_config': {one_line(err, 200)}") from None
    problem = unet_problem(cfg)
    if problem:
        raise Seg3dError(f"'unet_config': {problem}")
    return cfg
