"""Typed experiment configuration: YAML plus `key=value` overrides, validated by pydantic.

Numbers live here, behaviour lives in code. An unknown key or a value of the wrong type is a `Seg3dError`
naming the dotted key, so `train.epoch=3` fails at once instead of being silently ignored. The resolved
config (defaults filled in) is what the run logs to MLflow and stores in the model bundle, so inference
rebuilds exactly what was trained, and a bundle's config.yaml is validated by these same rules when it is loaded.

The YAML is read by pipeline/yamlio.py (no anchors or aliases, a bounded size). Every float is finite, and the
bounds that training, inference and export share (patch size, network size) are stated here once. Values quoted
in a message are cut short (errors.shown): a message never echoes a whole input.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from attention3d import UNetConfig, list_models, unet_config
from pipeline.bounds import patch_problem, unet_problem
from pipeline.errors import Seg3dError, shown
from pipeline.yamlio import raw_config

IntTriple = tuple[int, int, int]
Spacing = Annotated[float, Field(gt=0)]  # mm; finite, as every float of a config


def _checked_patch(v: IntTriple) -> IntTriple:
    problem = patch_problem(v)
    if problem:
        raise ValueError(problem)
    return v


Patch = Annotated[IntTriple, AfterValidator(_checked_patch)]  # a patch size within the bounds above


class _Section(BaseModel):
    # Every float of a config is finite (NaN slips past any bound that no field states, Inf is no setting).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# The pipeline segments volumes (spatial_dims 3); in_channels and out_channels follow from the data (one CT channel,
# one output per class of the dataset's labels). Every other UNetConfig option is a key of the model section.
_FROM_DATA = ("spatial_dims", "in_channels", "out_channels")


class _ModelSection(_Section):
    """The behaviour of the model section; its fields are made from UNetConfig's below, so the two cannot drift."""

    @field_validator("name", check_fields=False)
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in list_models():
            raise ValueError(f"unknown model {v!r}; valid models: {', '.join(list_models())}")
        return v

    @model_validator(mode="after")
    def _valid_network(self) -> _ModelSection:
        # UNetConfig checks every value, over the variant's own options, so a bad one fails at load, not at build.
        try:
            net = unet_config(self.name, spatial_dims=3, **self.overrides())
        except TypeError as err:
            raise ValueError(str(err)) from None
        problem = unet_problem(net)
        if problem:
            raise ValueError(problem)
        return self

    def overrides(self) -> dict[str, Any]:
        """The options the config sets; null (or absent) keeps the variant's own default, so a resolved config
        written with every key still rebuilds the same network."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k != "name" and v is not None}


def _unet_options() -> dict[str, Any]:
    """One optional key per settable UNetConfig field, of that field's type; null keeps the variant's default."""
    types = get_type_hints(UNetConfig)
    return {f.name: (types[f.name] | None, None) for f in fields(UNetConfig) if f.name not in _FROM_DATA}


ModelConfig = create_model(
    "ModelConfig",
    __base__=_ModelSection,
    __module__=__name__,
    __doc__="A registered variant (`seg3d models`) and the U-Net options it may override: every field of "
    "attention3d.UNetConfig but spatial_dims, in_channels and out_channels (norm and act with arguments, e.g. "
    "[group, {num_groups: 4}]).",
    name=(str, "attention_unet"),
    **_unet_options(),
)


class IntensityConfig(_Section):
    """CT normalisation. `foreground` (nnU-Net's CT scheme): clip to the training foreground's percentiles, then
    z-score with the foreground mean and std. `window`: clip to a fixed HU window and scale it to [-1, 1]."""

    mode: Literal["foreground", "window"] = "foreground"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] = (-160.0, 240.0)

    @model_validator(mode="after")
    def _ordered(self) -> IntensityConfig:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.window[0] >= self.window[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {self.window}")
        return self


class DataConfig(_Section):
    # Name -> value in the label files; null takes the dataset's own labels. A selection such as
    # {pancreas: 7} trains on that structure and maps every other value to background.
    labels: dict[str, int] | None = None
    # Target voxel spacing in mm (RAS x, y, z); null = the training set's median spacing (nnU-Net).
    target_spacing: tuple[Spacing, Spacing, Spacing] | None = None
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    # Crop every volume to the body (HU above body_threshold) before anything else: air is not context.
    foreground_crop: bool = True
    body_threshold_hu: float = -500.0
    patch_size: Patch = (96, 96, 96)
    samples_per_volume: int = Field(2, ge=1)
    # Fraction of patches centred on foreground (nnU-Net oversamples a third); class_ratios, when set,
    # samples per class instead (one weight per class, background first).
    foreground_fraction: float = Field(0.33, ge=0.0, le=1.0)
    class_ratios: list[float] | None = None
    # memory: preprocessed volumes cached in RAM; disk: cached under cache_dir (default RUN_DIR/cache); none.
    cache: Literal["memory", "disk", "none"] = "memory"
    cache_dir: Path | None = None
    # DataLoader worker processes; null = none when training on the CPU (a loader process would only take cores
    # from the network: benchmarks/loader.py) and half the cores, at most 8, when training on a GPU.
    num_workers: int | None = Field(None, ge=0)

    @field_validator("class_ratios")
    @classmethod
    def _ratios(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(r < 0 for r in v) or sum(v) <= 0):
            raise ValueError(f"class_ratios must be non-negative with a positive sum, got {shown(v)}")
        return v


class AugmentConfig(_Section):
    flip_prob: float = Field(0.5, ge=0, le=1)  # per axis
    affine_prob: float = Field(0.2, ge=0, le=1)
    rotate_deg: float = Field(15.0, ge=0)  # about the slice axis; out of plane it is a third of this
    scale_range: float = Field(0.1, ge=0, lt=1)
    intensity_scale_prob: float = Field(0.15, ge=0, le=1)
    intensity_scale: float = Field(0.1, ge=0)
    intensity_shift_prob: float = Field(0.15, ge=0, le=1)
    intensity_shift: float = Field(0.1, ge=0)
    noise_prob: float = Field(0.1, ge=0, le=1)
    noise_std: float = Field(0.1, ge=0)


class LossConfig(_Section):
    """DiceCE on the main logits plus weighted auxiliary terms (each variant uses the ones it has)."""

    dice_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    # Dice over the whole batch rather than per patch (nnU-Net's batch_dice): stabler for small structures.
    batch_dice: bool = True
    deep_supervision: float = Field(0.5, ge=0)  # level i weighs deep_supervision ** i
    pam: float = Field(0.4, ge=0)  # DANet position-attention branch
    cam: float = Field(0.4, ge=0)  # DANet channel-attention branch
    se: float = Field(0.2, ge=0)  # EncNet SE-loss


class TrainConfig(_Section):
    epochs: int = Field(100, ge=1)
    iterations_per_epoch: int = Field(250, ge=1)
    batch_size: int = Field(2, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)  # SGD (Nesterov), as nnU-Net
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = Field(0.9, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_clip: float | None = Field(12.0, gt=0)
    folds: int = Field(5, ge=2)
    fold: int = Field(0, ge=0)
    seed: int = 0
    # The seed of the k-fold split; null = `seed`. A study fixes it, so that every seed trains on the same folds.
    split_seed: int | None = None
    val_every: int = Field(1, ge=1)
    # Stop when the mean foreground Dice has not improved for this many validations; null = never.
    early_stop: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads on CPU; null = torch's default
    # The engine that runs validation's windows on the CPU (pipeline/val_engine.py): torch; openvino or onnxruntime
    # (the network exported once, its weights refreshed and checked at every validation); auto (after the first
    # validation, an engine only where it saves more per validation than its refresh costs). On a GPU: torch.
    val_backend: Literal["torch", "auto", "openvino", "onnxruntime"] = "torch"

    @model_validator(mode="after")
    def _fold_in_range(self) -> TrainConfig:
        if self.fold >= self.folds:
            raise ValueError(f"fold must be in 0..{self.folds - 1}, got {self.fold}")
        return self


class InferenceConfig(_Section):
    """Sliding-window prediction, shared by validation and `seg3d infer`."""

    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(2, ge=1)
    sigma_scale: float = Field(0.125, gt=0)  # Gaussian blending, sigma = patch * sigma_scale (nnU-Net: 1/8)


class PostprocessConfig(_Section):
    """Applied to the labels in the input's grid (pipeline/postprocess.py); `seg3d infer --no-postprocess` skips it."""

    # Keep only the largest connected component of all foreground classes taken together (an organ and the tumour
    # inside it are one structure); every other foreground voxel, whatever its class, becomes background.
    largest_component: bool = True
    # Class -> the class it must lie inside or touch, by the model's class names (checked when a Predictor is
    # built): a component of the first that neither overlaps nor touches the second is removed. {} = no such rule;
    # null = the pancreas default, {cancer: pancreas} (also tumour/tumor, any case) where the model has both classes.
    inside: dict[str, str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_key(cls, data: Any) -> Any:
        """Bundles written before `inside` store `tumour_inside_pancreas`: true meant what `inside: null` means
        now, false meant no rule. Translated, so that they load and post-process as before."""
        if not isinstance(data, dict) or "tumour_inside_pancreas" not in data:
            return data
        data = dict(data)
        old = data.pop("tumour_inside_pancreas")
        if "inside" in data:
            raise ValueError("give either inside or tumour_inside_pancreas (its older form), not both")
        if old not in (True, False):
            raise ValueError(f"tumour_inside_pancreas must be true or false, got {old!r}")
        if not old:
            data["inside"] = {}
        return data

    @field_validator("inside")
    @classmethod
    def _not_itself(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        same = [k for k, organ in (v or {}).items() if k == organ]
        if same:
            raise ValueError(f"a class cannot be required to lie inside itself: {', '.join(same)}")
        return v


class Config(_Section):
    experiment: str = "seg3d"
    # Model-registry name of the bundle; null = "seg3d-<model name>".
    registered_model: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)

    @field_validator("experiment")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _whole_volumes_per_batch(self) -> Config:
        # Each volume loaded gives samples_per_volume patches to one batch; checked here, not at the first epoch,
        # so that such a config is refused before a run folder or an MLflow run exists.
        if self.train.batch_size % self.data.samples_per_volume:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of data.samples_per_volume "
                f"({self.data.samples_per_volume})"
            )
        return self

    @property
    def registry_name(self) -> str:
        return self.registered_model or f"seg3d-{self.model.name}"

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of every setting (defaults included)."""
        return self.model_dump(mode="json")


def _describe(err: ValidationError, root: type[BaseModel] = Config, prefix: str = "") -> str:
    """One line for the first problem pydantic found, naming the dotted key (under `prefix`) and the fix. Keys and
    values come from the user's file, so each is echoed cut short (errors.shown), never whole."""
    problems = err.errors()
    first = problems[0]
    loc = list(first["loc"])
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    if first["type"] == "extra_forbidden":
        section = _section_at(tuple(loc[:-1]), root)
        valid = f"; valid keys here: {', '.join(section.model_fields)}" if section else ""
        return f"unknown key '{_key(loc, prefix)}'{valid}"
    if first["type"] in ("missing", "too_long", "too_short") and loc and isinstance(loc[-1], int):
        loc = loc[:-1]  # a tuple of the wrong length: name the key, not the index
        return f"'{_key(loc, prefix)}' has the wrong number of values{more}"
    key = _key(loc, prefix) or "(top level)"
    if first["type"] == "value_error":
        return f"'{key}': {_cut(first['msg'].removeprefix('Value error, '))}{more}"
    return f"'{key}': {_cut(first['msg'])}, got {shown(first.get('input'))}{more}"


def describe_validation(model: type[BaseModel], raw: Any, prefix: str = "") -> BaseModel:
    """`model` validated from `raw`, or a Seg3dError of one line naming the dotted key (under `prefix`)."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise Seg3dError(_describe(err, model, prefix)) from None


def _key(loc: list, prefix: str = "") -> str:
    return _cut(".".join(map(str, [prefix, *loc] if prefix else loc)), 80)


def _cut(text: str, limit: int = 200) -> str:
    """A message part that may quote the input (a validator's message, a dotted key) cut to `limit` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section_at(loc: tuple, root: type[BaseModel] = Config) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = root
    for part in loc:
        field = cls.model_fields.get(str(part)) if cls else None
        ann = field.annotation if field else None
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return cls


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply `key=value` overrides, validate."""
    raw, source = raw_config(path, overrides)
    return config_from_dict(raw, source)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise Seg3dError(f"{source}: {_describe(err)}") from None


def save_config(cfg: Config, path: Path) -> None:
    from pipeline.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
