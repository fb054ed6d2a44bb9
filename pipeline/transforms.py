"""One definition of preprocessing, built from the config and the training set's statistics, shared by training,
validation and inference.

Deterministic part (cached): read the CT (NIfTI or DICOM series) -> orientation to RAS -> crop to the body ->
resample to the target spacing -> clip and normalise intensities (-> pad to the patch and index the
foreground, training only). Random part (training only): patch sampling with a foreground fraction or per-class
ratios, flips, rotation and scaling, intensity scale and shift, noise.

The statistics (`Preprocessing`) are computed once on the training cases, nnU-Net style (median spacing,
foreground percentiles, mean and std), and stored in the model bundle so that inference normalises exactly
as training did.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    InvertibleTransform,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from pipeline.config import Config
from pipeline.datalists import remap_labels
from pipeline.errors import Seg3dError, one_line
from pipeline.imageio import Volume, c_ordered, read_volume
from pipeline.limits import check_resampled_size

IMAGE, LABEL = "image", "label"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axis codes as nibabel reads them (MONAI's current default)


@dataclass
class Preprocessing:
    """Everything inference needs to reproduce training's preprocessing; JSON in the bundle."""

    target_spacing: tuple[float, float, float]
    intensity_mode: str  # "foreground" (clip, then z-score) or "window" (clip, then scale to [-1, 1])
    clip: tuple[float, float]  # HU
    mean: float
    std: float
    foreground_crop: bool
    body_threshold_hu: float
    label_names: list[str]  # class i is label_names[i]; background first
    label_values: list[int]  # value of class i in the label files
    exhaustive: bool  # False: label values not listed are background (a selection such as pancreas=7)
    spacing_source: str = "median"  # "median" of the training set, or "config"
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "preprocessing.json") -> Preprocessing:
        """Parse and check every field (pipeline/bundle_checks.py): a Seg3dError `where: 'std' must be ...`."""
        from pipeline.bundle_checks import checked_preprocessing

        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as err:  # bad JSON, a 5000-digit integer, nesting without end
            raise Seg3dError(f"{where}: not valid JSON ({one_line(err, 80)})") from None
        try:
            return cls(**checked_preprocessing(raw))
        except Seg3dError as err:
            raise Seg3dError(f"{where}: {err}") from None

    def validate(self, where: str = "preprocessing", fix: str = "") -> None:
        """The checks from_json makes, on a Preprocessing made in memory (one training computed)."""
        from pipeline.bundle_checks import checked_preprocessing

        try:
            checked_preprocessing(asdict(self))
        except Seg3dError as err:
            raise Seg3dError(f"{where}: {err}" + (f"; {fix}" if fix else "")) from None

    def remap(self, label: np.ndarray, case: str | None = None) -> np.ndarray:
        """Label-file values -> class indices (uint8), as the training data were mapped."""
        return remap_labels(label, dict(zip(self.label_names, self.label_values)), self.exhaustive, case)


def compute_preprocessing(cfg: Config, labels: dict[str, int], exhaustive: bool, infos) -> Preprocessing:
    """nnU-Net-style statistics from the training cases' integrity-check records (`pipeline.integrity.CaseInfo`):
    median spacing per RAS axis, and the foreground intensity percentiles, mean and std."""
    data = cfg.data
    if data.target_spacing is not None:
        spacing, source = tuple(float(s) for s in data.target_spacing), "config"
    else:
        spacing = tuple(float(s) for s in np.median(np.array([i.spacing_ras for i in infos]), axis=0))
        source = "median"
    if data.intensity.mode == "window":
        lo, hi = data.intensity.window
        clip, mean, std = (float(lo), float(hi)), (lo + hi) / 2.0, (hi - lo) / 2.0
    else:
        samples = np.concatenate([np.asarray(i.foreground_sample, dtype=np.float64) for i in infos])
        if samples.size == 0:
            raise Seg3dError(
                "the training cases hold no foreground voxels, so there are no intensity statistics; "
                "check the label maps, or use data.intensity.mode=window"
            )
        lo, hi = np.percentile(samples, data.intensity.percentiles)
        clipped = np.clip(samples, lo, hi)
        clip, mean, std = (float(lo), float(hi)), float(clipped.mean()), float(max(clipped.std(), 1e-3))
    return Preprocessing(
        target_spacing=spacing,
        intensity_mode=data.intensity.mode,
        clip=clip,
        mean=mean,
        std=std,
        foreground_crop=data.foreground_crop,
        body_threshold_hu=data.body_threshold_hu,
        label_names=list(labels),
        label_values=[int(v) for v in labels.values()],
        exhaustive=exhaustive,
        spacing_source=source,
    )


class Chain(Compose):
    """A MONAI Compose that lets the project's own errors through: MONAI wraps every exception raised inside a
    transform in RuntimeError("applying transform ..."), which would turn a user's bad file into a traceback."""

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as err:
            cause = err.__cause__
            while cause is not None and not isinstance(cause, Seg3dError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


class LoadCTd(MapTransform):
    """Read a CT (NIfTI file or DICOM series folder) and its label map into channel-first MetaTensors whose
    affine is the file's RAS world affine; label values become class indices. A key may also hold a `Volume` read
    already (inference reads its input once, and keeps what it read for the writers)."""

    def __init__(self, pre: Preprocessing, keys=(IMAGE, LABEL), allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.pre = pre

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        case = d.get("case")
        for key in self.key_iterator(d):
            vol = d[key] if isinstance(d[key], Volume) else read_volume(d[key], case=case, kind=key)
            name = d[key] if vol is not d[key] else (vol.source.path if vol.source is not None else "")
            array = vol.array
            if key == LABEL:
                array = self.pre.remap(array, case=case)
            else:
                array = array.astype(np.float32, copy=False)
                if not np.isfinite(array).all():
                    raise Seg3dError("image holds NaN or Inf voxels; repair or exclude the scan", case=case)
                if self.pre.foreground_crop and not (array > self.pre.body_threshold_hu).any():
                    raise Seg3dError(
                        f"no voxel above {self.pre.body_threshold_hu:g} HU, so no body to crop to; is this a CT in HU?",
                        case=case,
                    )
            meta = {
                "filename_or_obj": str(name),
                "original_affine": vol.affine.copy(),
                "original_shape": tuple(array.shape),
                "case": case or "",
            }
            d[key] = MetaTensor(c_ordered(array)[None], affine=vol.affine, meta=meta)
        return d


class _AboveHU:
    """Picklable select_fn for CropForegroundd (DataLoader workers): voxels inside the body."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, x):
        return x > self.threshold


class ResampleToSpacingd(MapTransform, InvertibleTransform):
    """MONAI's `Spacingd` (same output grid, affine, interpolation, border padding, recorded operation, inverse),
    with the bilinear resampling computed separably when the voxel mapping is axis-aligned, as it always is after
    `Orientationd`: trilinear weights are products of one weight per axis, so three 1-D interpolations give
    grid_sample's result without its dense sampling grid (docs/benchmarks.md, "design measurements"). Any other
    mapping, and nearest (labels), go through MONAI. MONAI computes the output grid (the same `Spacingd`, lazily);
    only the resampling is ours."""

    def __init__(self, keys, pixdim, mode) -> None:
        super().__init__(keys)
        self.pixdim = tuple(float(p) for p in pixdim)
        self.modes = dict(zip(self.keys, mode if isinstance(mode, (tuple, list)) else [mode] * len(self.keys)))
        self.spacing = {
            k: Spacingd(k, pixdim=pixdim, mode=m, padding_mode="border", dtype=np.float32)
            for k, m in self.modes.items()
        }

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            pending = self.spacing[key]({key: img}, lazy=True)[key]  # the output grid only: nothing allocated yet
            case = img.meta.get("case") or None
            check_resampled_size(
                shape=pending.peek_pending_shape(), target_spacing=self.pixdim, affine=img.affine, case=case, kind=key
            )
            ops = pending.pending_operations
            voxel_map = ops[-1]["lazy_affine"] if len(ops) == 1 else None
            # Nearest (labels) stays MONAI's: where a source coordinate falls halfway between two voxels, the label
            # taken depends on float32 rounding inside grid_sample, and the training labels should not change.
            if voxel_map is None or not _axis_aligned(voxel_map) or self.modes[key] != "bilinear":
                d[key] = self.spacing[key]({key: img})[key]
                continue
            out = separable_resample(
                img.as_tensor().float(), np.asarray(voxel_map, dtype=np.float64), pending.peek_pending_shape()
            )
            # What MONAI's apply_pending does after its resampling: the new affine, the operation recorded as applied
            # (so MONAI's inverse, e.g. Invertd, still undoes this chain).
            affine, ops = pending.peek_pending_affine(), pending.pending_operations.copy()
            pending.clear_pending_operations()
            result = MetaTensor(out, meta=dict(pending.meta), applied_operations=list(pending.applied_operations))
            result.affine = affine
            for op in ops:
                result.push_applied_operation(op)
            d[key] = result
        return d

    def inverse(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d = self.spacing[key].inverse(d)
        return d


def _axis_aligned(voxel_map) -> bool:
    m = np.asarray(voxel_map, dtype=np.float64)[:3, :3]
    return bool(np.all(np.abs(m - np.diag(np.diag(m))) < 1e-9) and np.all(np.abs(np.diag(m)) > 0))


def separable_resample(x: torch.Tensor, voxel_map: np.ndarray, shape) -> torch.Tensor:
    """Trilinear resampling of channel-first `x` (C, *S) onto `shape`, where output voxel i samples input voxel
    voxel_map[a, a] * i + voxel_map[a, 3] along each axis a (voxel centres; an axis-aligned map), with border
    padding: coordinates are clamped into the volume, as grid_sample's padding_mode="border" does."""
    for axis in np.argsort([shape[a] / x.shape[a + 1] for a in range(3)]):  # shrink first: less work after
        n = x.shape[axis + 1]
        if n == shape[axis] and voxel_map[axis, axis] == 1 and voxel_map[axis, 3] == 0:
            continue  # this axis keeps its grid
        c = torch.arange(shape[axis], dtype=torch.float64) * float(voxel_map[axis, axis]) + float(voxel_map[axis, 3])
        c = c.clamp_(0, n - 1)
        lo = c.floor().long()
        hi = (lo + 1).clamp_(max=n - 1)
        view = [1] * x.ndim
        view[axis + 1] = -1
        w = (c - lo).float().view(view)
        at = (slice(None),) * (axis + 1)  # indexing, faster than index_select off the first dimension
        x = torch.lerp(x[(*at, lo)], x[(*at, hi)], w)  # a + w (b - a)
    return x.contiguous()


def preprocess_transforms(pre: Preprocessing, keys: tuple[str, ...] = (IMAGE, LABEL)) -> list:
    """The deterministic, invertible chain every image goes through, in training, validation and inference."""
    modes = tuple("nearest" if k == LABEL else "bilinear" for k in keys)
    chain: list = [LoadCTd(pre, keys), Orientationd(keys, axcodes="RAS", labels=RAS_LABELS)]
    if pre.foreground_crop:
        chain.append(
            CropForegroundd(
                keys,
                source_key=IMAGE,
                select_fn=_AboveHU(pre.body_threshold_hu),
                margin=2,
                allow_smaller=True,  # where the body touches the image edge, the margin must not pad past it
                start_coord_key=None,  # the inverse reads the crop from the MetaTensor's applied operations
                end_coord_key=None,
            )
        )
    chain.append(ResampleToSpacingd(keys, pixdim=pre.target_spacing, mode=modes))
    lo, hi = pre.clip
    if pre.intensity_mode == "window":
        chain.append(ScaleIntensityRanged(IMAGE, a_min=lo, a_max=hi, b_min=-1.0, b_max=1.0, clip=True))
    else:
        chain.append(ScaleIntensityRanged(IMAGE, a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True))
        chain.append(NormalizeIntensityd(IMAGE, subtrahend=pre.mean, divisor=pre.std))
    if LABEL in keys:
        chain.append(EnsureTyped(LABEL, dtype=torch.uint8))
    return chain


def cached_train_transforms(cfg: Config, pre: Preprocessing) -> Compose:
    """Deterministic part for training patches: preprocessing, padding to the patch, foreground indices."""
    keys = (IMAGE, LABEL)
    chain = preprocess_transforms(pre, keys)
    chain.append(SpatialPadd(keys, spatial_size=cfg.data.patch_size))
    if cfg.data.class_ratios is not None:
        chain.append(ClassesToIndicesd(LABEL, num_classes=pre.num_classes, indices_postfix="_cls_indices"))
    else:
        chain.append(FgBgToIndicesd(LABEL))
    return Chain(chain)


def random_train_transforms(cfg: Config, pre: Preprocessing) -> Compose:
    keys, aug, patch = (IMAGE, LABEL), cfg.augment, cfg.data.patch_size
    if cfg.data.class_ratios is not None:
        if len(cfg.data.class_ratios) != pre.num_classes:
            raise Seg3dError(
                f"data.class_ratios has {len(cfg.data.class_ratios)} entries but there are {pre.num_classes} "
                f"classes ({', '.join(pre.label_names)}); give one ratio per class, background first"
            )
        index_keys = [f"{LABEL}_cls_indices"]
        crop = RandCropByLabelClassesd(
            keys,
            label_key=LABEL,
            spatial_size=patch,
            ratios=cfg.data.class_ratios,
            num_classes=pre.num_classes,
            num_samples=cfg.data.samples_per_volume,
            indices_key=index_keys[0],
        )
    else:
        index_keys = [f"{LABEL}_fg_indices", f"{LABEL}_bg_indices"]
        f = cfg.data.foreground_fraction
        crop = RandCropByPosNegLabeld(
            keys,
            label_key=LABEL,
            spatial_size=patch,
            pos=f,
            neg=1.0 - f,
            num_samples=cfg.data.samples_per_volume,
            fg_indices_key=index_keys[0],
            bg_indices_key=index_keys[1],
        )
    rot = math.radians(aug.rotate_deg)
    chain = [
        crop,
        DeleteItemsd(index_keys),
        RandFlipd(keys, prob=aug.flip_prob, spatial_axis=0),
        RandFlipd(keys, prob=aug.flip_prob, spatial_axis=1),
        RandFlipd(keys, prob=aug.flip_prob, spatial_axis=2),
    ]
    if aug.affine_prob > 0:
        chain.append(
            RandAffined(
                keys,
                prob=aug.affine_prob,
                rotate_range=(rot / 3, rot / 3, rot),  # mostly in the axial plane: slices are thick
                scale_range=(aug.scale_range,) * 3,
                mode=("bilinear", "nearest"),
                padding_mode="border",
            )
        )
    chain += [
        RandScaleIntensityd(IMAGE, factors=aug.intensity_scale, prob=aug.intensity_scale_prob),
        RandShiftIntensityd(IMAGE, offsets=aug.intensity_shift, prob=aug.intensity_shift_prob),
        RandGaussianNoised(IMAGE, prob=aug.noise_prob, std=aug.noise_std),
        EnsureTyped(IMAGE, dtype=torch.float32, track_meta=False),
        EnsureTyped(LABEL, dtype=torch.uint8, track_meta=False),
    ]
    return Chain(chain)


def inference_transforms(pre: Preprocessing) -> Compose:
    return Chain(preprocess_transforms(pre, (IMAGE,)))


def validation_transforms(pre: Preprocessing) -> Compose:
    return Chain(preprocess_transforms(pre, (IMAGE, LABEL)))


def as_record(case: str, image: Path | str, label: Path | str | None = None) -> dict:
    record = {"case": case, IMAGE: str(image)}
    if label is not None:
        record[LABEL] = str(label)
    return record
