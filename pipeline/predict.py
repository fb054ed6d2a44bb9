"""Predictor: files -> arrays -> logits, with the bundle's own preprocessing (nnU-Net's layered predictor), and the
writers that put a prediction back into the input's geometry.

One sliding-window path serves validation during training and `seg3d infer`: MONAI's sliding-window inference with
Gaussian blending (sigma = patch * sigma_scale, 1/8 as nnU-Net) and batched windows, optionally mirrored over all
8 flip combinations (test-time augmentation). Predictions are mapped back into the input's own voxel grid by
inverting the preprocessing (crop, resampling, orientation): the class probabilities are resampled, then the
argmax taken, so boundaries are not nearest-neighbour blocky.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from attention3d.fusion import fold_batch_norms
from pipeline.bundle import atomic_write
from pipeline.config import InferenceConfig, PostprocessConfig
from pipeline.errors import Seg3dError
from pipeline.imageio import fortran_ordered
from pipeline.transforms import IMAGE, Preprocessing, as_record, inference_transforms

FLIPS = [dims for k in range(4) for dims in itertools.combinations((2, 3, 4), k)]  # the 8 mirrorings of (B, C, X, Y, Z)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively, not emulated (emulated bf16 is slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA GPUs that support it (else fp16) and on CPUs with native bf16; fp32 elsewhere."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def postprocess(labels: np.ndarray, names: list[str], cfg: PostprocessConfig) -> np.ndarray:
    """Keep the largest connected foreground structure (all foreground classes together: a tumour belongs to
    its organ); a tumour class survives only inside or touching the pancreas kept. Class names decide which is
    the tumour ("cancer"/"tumour") and which the organ. Works inside the foreground's bounding box: on a
    512 x 512 x 1000 CT the pancreas is a small part of the volume."""
    if not cfg.largest_component and not cfg.tumour_inside_pancreas:
        return labels
    box = _bounding_box(labels > 0)
    if box is None:
        return labels
    sub = labels[box].copy()
    structure = ndimage.generate_binary_structure(3, 1)
    if cfg.largest_component:
        comp, n = ndimage.label(sub > 0, structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            sub[comp != (1 + int(np.argmax(sizes)))] = 0
    tumour = [i for i, n in enumerate(names) if n.lower() in ("cancer", "tumour", "tumor")]
    organ = [i for i, n in enumerate(names) if n.lower() == "pancreas"]
    if cfg.tumour_inside_pancreas and tumour and organ:
        near_organ = ndimage.binary_dilation(sub == organ[0], structure)
        for t in tumour:
            comp, n = ndimage.label(sub == t, structure)
            if n:
                keep = np.unique(comp[near_organ & (comp > 0)])
                sub[(comp > 0) & ~np.isin(comp, keep)] = 0
    out = labels.copy()
    out[box] = sub
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


@dataclass
class Prediction:
    labels: np.ndarray  # uint8 class indices in the input's stored voxel grid
    affine: np.ndarray  # the input's RAS affine
    probabilities: np.ndarray | None = None  # (K, *S) float32 in the input grid, when asked for
    gate: np.ndarray | None = None  # the finest attention-gate map in [0, 1], input grid, when asked for
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class _Timed(nn.Module):
    """The network as the sliding window sees it: times its own forward calls (the rest of the sliding window is
    stitching) and appends the finest attention-gate map as one more channel when asked to, so that the gate
    is blended and inverted exactly like the logits."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, gates: bool, channels_last: bool):
        super().__init__()
        self.model, self.device, self.dtype, self.gates = model, device, dtype, gates
        self.channels_last = channels_last
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with autocast(self.device, self.dtype):
            if self.gates:
                logits, gates = self.model(x, return_gates=True)
                out = torch.cat([logits.float(), gates[0].float()], dim=1)
            else:
                out = self.model(x).float()
        # Channels-last logits would be blended into the NCDHW volume with a 3-element inner stride: far slower.
        out = out.contiguous()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out


class Predictor:
    """Layered: `predict_file` (path -> Prediction in the input grid) -> `predict_probabilities` (preprocessed
    tensor -> class probabilities) -> `predict_preprocessed` (preprocessed tensor -> logits)."""

    def __init__(
        self,
        model: nn.Module,
        pre: Preprocessing,
        patch_size: tuple[int, int, int],
        inference: InferenceConfig,
        postprocessing: PostprocessConfig | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        tta: bool = False,
        channels_last: bool = False,
        fold_norms: bool = False,
    ):
        """`channels_last` converts the model's weights in place (NDHWC): oneDNN's 3D convolutions on CPU run about
        1.6x faster in fp32 that way (bf16: no difference). Only for a model that is not trained further.
        `fold_norms` runs a copy of the model with its batch norms folded into the convolutions before them (the
        same function, one pass less over every feature map); the given model is left as it is."""
        self.device = torch.device(device)
        model = model.eval()
        if fold_norms and any(isinstance(m, _BatchNorm) for m in model.modules()):
            model = copy.deepcopy(model)
            fold_batch_norms(model)
        self.model = model.to(self.device)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        self.pre = pre
        self.dtype = resolve_precision(precision, self.device)
        self.postprocessing = postprocessing
        self.patch_size = tuple(patch_size)
        self.inference = inference
        self.tta = tta
        self.transforms = inference_transforms(pre)

    @classmethod
    def from_bundle(
        cls,
        bundle,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        tta: bool = False,
        postprocess: bool = True,
        overlap: float | None = None,
    ) -> Predictor:
        cfg = bundle.config
        inference = cfg.inference if overlap is None else cfg.inference.model_copy(update={"overlap": overlap})
        return cls(
            bundle.model,
            bundle.preprocessing,
            cfg.data.patch_size,
            inference,
            cfg.postprocess if postprocess else None,
            device,
            precision,
            tta,
            channels_last=torch.device(device).type == "cpu",
            fold_norms=True,
        )

    @property
    def has_gates(self) -> bool:
        return getattr(getattr(self.model, "config", None), "skip", None) == "gate"

    def _accumulator_device(self, spatial: tuple[int, ...], channels: int) -> torch.device:
        """The full-volume sums live on the GPU when they fit comfortably (output and weight maps, float32), else
        in host memory: a CT of 512 x 512 x 1000 needs about 4 GiB of them per class."""
        if self.device.type != "cuda":
            return self.device
        need = (channels + 1) * int(np.prod(spatial)) * 4
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < 0.5 * free else torch.device("cpu")

    def _window(self, x: torch.Tensor, network: nn.Module) -> torch.Tensor:
        inf = self.inference
        return sliding_window_inference(
            x,
            roi_size=self.patch_size,
            sw_batch_size=inf.sw_batch_size,
            predictor=network,
            overlap=inf.overlap,
            mode="gaussian",
            sigma_scale=inf.sigma_scale,
            sw_device=self.device,
            device=self._accumulator_device(tuple(x.shape[2:]), self.pre.num_classes + 1),
        )

    @torch.no_grad()
    def predict_preprocessed(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, *S) float32 for a preprocessed image (B, 1, *S); no mirroring (validation)."""
        network = _Timed(self.model, self.device, self.dtype, False, self.channels_last)
        return torch.as_tensor(self._window(torch.as_tensor(image).float(), network))

    @torch.no_grad()
    def predict_probabilities(self, image: torch.Tensor, gates: bool = False) -> tuple[torch.Tensor, float]:
        """Class probabilities (B, K, *S), averaged over the 8 mirrorings with TTA; with `gates`, the blended
        finest gate map is channel K. Returns them and the seconds spent inside the network."""
        network = _Timed(self.model, self.device, self.dtype, gates and self.has_gates, self.channels_last)
        x = torch.as_tensor(image).float()
        k = self.pre.num_classes
        total = None
        for dims in FLIPS if self.tta else [()]:
            out = self._window(torch.flip(x, dims) if dims else x, network)
            out = torch.flip(out, dims) if dims else out
            out[:, :k] = torch.softmax(out[:, :k], dim=1)
            total = out if total is None else total.add_(out)
        if self.tta:
            total /= len(FLIPS)
        return total, network.seconds

    def predict_file(
        self, image: Path | str, case: str | None = None, probabilities: bool = False, gates: bool = False
    ) -> Prediction:
        """A CT file or DICOM folder -> labels in the file's own voxel grid (same shape and affine)."""
        timings: dict[str, float] = {}
        t = time.perf_counter()
        data = self.transforms(as_record(case or Path(image).name, image), end=1)  # read
        timings["load"] = time.perf_counter() - t
        t = time.perf_counter()
        img: MetaTensor = self.transforms(data, start=1).pop(IMAGE)
        timings["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        probs, network_s = self.predict_probabilities(img[None].as_tensor(), gates=gates)
        timings["network"] = network_s
        timings["stitch"] = time.perf_counter() - t - network_s
        t = time.perf_counter()
        original_affine = np.asarray(img.meta["original_affine"], dtype=np.float64)
        grid = Grid(np.asarray(img.affine, dtype=np.float64), original_affine, tuple(img.meta["original_shape"]))
        del img
        probs = probs[0].cpu()  # (K[+1], *S) on the network's grid
        k = self.pre.num_classes
        full = resample_to_grid(probs[:k], grid, background_first=True) if probabilities else None
        labels = argmax_classes(full).numpy() if full is not None else labels_in_grid(probs[:k], grid)
        if self.postprocessing is not None:
            labels = postprocess(labels, self.pre.label_names, self.postprocessing)
        gate = resample_to_grid(probs[k : k + 1], grid)[0].clamp(0, 1).numpy() if gates and self.has_gates else None
        timings["invert"] = time.perf_counter() - t
        return Prediction(labels, original_affine, full.numpy() if full is not None else None, gate, timings)


# -- from the network's grid back to the input's ------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """The network's grid (after orientation, crop and resampling) and the input's own grid, both as voxel -> world
    RAS affines: everything the inverse of the preprocessing needs, whatever orientation, crop or spacing it used."""

    source_affine: np.ndarray  # network grid voxel -> world
    target_affine: np.ndarray  # input grid voxel -> world
    target_shape: tuple[int, int, int]

    @property
    def target_to_source(self) -> np.ndarray:
        return np.linalg.inv(self.source_affine) @ self.target_affine


def resample_to_grid(
    values: torch.Tensor,
    grid: Grid,
    box: tuple[slice, ...] | None = None,
    background_first: bool = False,
    chunk_voxels: int = 1 << 23,
) -> torch.Tensor:
    """Trilinear resampling of `values` (C, *S) from the network's grid onto the input grid (or the sub-box `box` of
    it), voxel centres mapped through the two affines. Outside the network's grid (the cropped-away air) values
    are 0, except channel 0 with `background_first`, which is 1 there: class probabilities keep summing to 1.
    Done in slabs along the last axis so that memory stays bounded for a 512 x 512 x 1000 CT."""
    if background_first:
        shifted = values.clone()
        shifted[0] -= 1.0  # pad with 0 after the shift = pad the background with 1
        out = resample_to_grid(shifted, grid, box, False, chunk_voxels)
        out[0] += 1.0
        return out
    box = box or tuple(slice(0, n) for n in grid.target_shape)
    m = grid.target_to_source  # float64; the per-voxel arithmetic below is float32 (1e-4 voxel at 1,000 voxels)
    size = values.shape[1:]
    src = values[None].float()  # (1, C, X, Y, Z): grid_sample's (N, C, D, H, W)
    i = torch.arange(box[0].start, box[0].stop, dtype=torch.float32)[:, None, None]
    j = torch.arange(box[1].start, box[1].stop, dtype=torch.float32)[None, :, None]
    step = max(1, chunk_voxels // max(1, len(i) * j.shape[1]))
    out = torch.empty((values.shape[0], len(i), j.shape[1], box[2].stop - box[2].start), dtype=torch.float32)
    for z0 in range(box[2].start, box[2].stop, step):
        k = torch.arange(z0, min(z0 + step, box[2].stop), dtype=torch.float32)[None, None, :]
        norm, inside = [], None
        for a in range(3):
            c = float(m[a, 0]) * i + float(m[a, 1]) * j + float(m[a, 2]) * k + float(m[a, 3])  # source index
            # A source voxel stands for half a voxel around its centre (so the grid's edge values reach its edge,
            # as MONAI's border padding does); beyond that lies the cropped-away air.
            ok = (c >= -0.5) & (c <= size[a] - 0.5)
            inside = ok if inside is None else inside & ok
            norm.append(c.mul_(2.0 / (size[a] - 1)).sub_(1.0) if size[a] > 1 else c.zero_())  # -> [-1, 1]
        # grid_sample wants (x, y, z) = (W, H, D) order: our (X, Y, Z) axes are its (D, H, W).
        sample_grid = torch.stack(torch.broadcast_tensors(norm[2], norm[1], norm[0]), dim=-1)[None]
        part = nn.functional.grid_sample(src, sample_grid, mode="bilinear", padding_mode="border", align_corners=True)
        out[..., z0 - box[2].start : z0 - box[2].start + part.shape[-1]] = part[0] * inside
    return out


def labels_in_grid(probs: torch.Tensor, grid: Grid, threshold: float = 0.25) -> np.ndarray:
    """argmax of the resampled probabilities, computed only where it can differ from background.

    Trilinear interpolation is a convex combination of 8 source voxels: where all of them hold less than half of
    their probability in foreground classes, so does the result, and background wins the argmax. So only the box
    around source voxels with foreground >= `threshold` (< 0.5, plus a voxel of margin) needs resampling, and
    background there is 1 - the resampled foreground (interpolation preserves sums): exact, and for a pancreas a
    small fraction of the volume."""
    labels = np.zeros(grid.target_shape, dtype=np.uint8)
    foreground = probs[1:]
    hot = torch.nonzero(foreground.sum(0) >= threshold)
    if hot.numel() == 0:
        return labels
    lo, hi = hot.min(0).values.double() - 1, hot.max(0).values.double() + 1
    corners = torch.cartesian_prod(*[torch.stack([lo[a], hi[a]]) for a in range(3)])  # (8, 3) source indices
    to_target = torch.as_tensor(np.linalg.inv(grid.target_to_source), dtype=torch.float64)
    mapped = corners @ to_target[:3, :3].T + to_target[:3, 3]
    start = torch.floor(mapped.min(0).values).long() - 1
    stop = torch.ceil(mapped.max(0).values).long() + 2
    box = tuple(slice(max(0, int(a)), min(n, int(b))) for a, b, n in zip(start, stop, grid.target_shape))
    if any(s.stop <= s.start for s in box):
        return labels
    fg = resample_to_grid(foreground, grid, box)
    labels[box] = argmax_classes(torch.cat([1.0 - fg.sum(0, keepdim=True), fg], dim=0)).numpy()
    return labels


def argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """argmax over the (few) classes of (K, *S) as K element-wise passes, uint8: torch's argmax along a leading
    dimension is a strided reduction, several times slower on a CT-sized volume. Ties go to the lower class."""
    best, labels = probs[0].clone(), torch.zeros(probs.shape[1:], dtype=torch.uint8)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        labels[better] = c
        best = torch.maximum(best, probs[c])
    return labels


# -- writers: every output in the input's own geometry, written atomically ----------------------------------------


def _save_nifti(array: np.ndarray, source: Path, affine: np.ndarray, out: Path, dtype) -> Path:
    """Save with the source NIfTI's own header (qform and sform with their codes, units), so the output has
    exactly its geometry; for a DICOM series, a header made from the series' affine."""
    array = fortran_ordered(array)
    if source.is_file():
        header = nib.load(source).header.copy()
        img = nib.Nifti1Image(array, None, header=header)
        img.set_qform(header.get_qform(), code=int(header["qform_code"]))
        img.set_sform(header.get_sform(), code=int(header["sform_code"]))
    else:
        img = nib.Nifti1Image(array, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    atomic_write(out, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")
    return out


def label_values(labels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Class indices -> the values the training label files used (pancreas=7 for a TotalSegmentator selection)."""
    if pre.label_values == list(range(pre.num_classes)):
        return labels.astype(np.uint8, copy=False)
    lut = np.asarray(pre.label_values, dtype=np.uint8)
    return lut[labels]


def write_labels(prediction: Prediction, pre: Preprocessing, source: Path, out: Path) -> Path:
    """uint8 label map with the training label values, in exactly the source's geometry."""
    return _save_nifti(label_values(prediction.labels, pre), source, prediction.affine, out, np.uint8)


def write_probabilities(prediction: Prediction, pre: Preprocessing, out: Path) -> Path:
    """Class probabilities as float16 (K, X, Y, Z) in the input's voxel grid, in a .npz with the affine and the
    class names (as nnU-Net does: NIfTI has no float16 type). Read it with np.load(path) (no pickle needed)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                probabilities=prediction.probabilities.astype(np.float16),
                affine=prediction.affine,
                classes=np.asarray(pre.label_names),
            )

    atomic_write(out, write, suffix=".npz")
    return out


SNOMED = {  # segment property codes for the DICOM SEG (SNOMED CT)
    "pancreas": ("15776009", "Pancreas", "T-65000"),
    "cancer": ("108369006", "Neoplasm", "M-80003"),
}


def dicom_seg_sources(series: Path) -> list:
    """The series' datasets in the volume's z order (GDCM's sorting), checked for what a SEG must reference.

    Some anonymisers blank SOPClassUID/SOPInstanceUID in the data set while the file meta header keeps them;
    those are taken from the meta header. Blank study or series UIDs cannot be recovered: refused up front, before
    any compute, since a SEG that references nothing is useless to a PACS."""
    import pydicom
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series), reader.GetGDCMSeriesIDs(str(series))[0])
    sources = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=False)
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        missing = [
            k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)
        ]
        if missing:
            raise Seg3dError(
                f"DICOM series {series} has no {', '.join(missing)} (in {Path(f).name}); a DICOM SEG must reference "
                "its source by these UIDs, so --dicom-seg cannot be used with it (the NIfTI output can)"
            )
        sources.append(ds)
    return sources


def write_dicom_seg(prediction: Prediction, pre: Preprocessing, series: Path, out: Path, model_name: str) -> Path:
    """A DICOM Segmentation object referencing the source series, one segment per foreground class."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pipeline import __version__

    sources = dicom_seg_sources(series)
    mask = np.ascontiguousarray(prediction.labels.transpose(2, 1, 0))  # (x, y, z) -> (frames, rows, columns)
    if mask.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise Seg3dError(f"prediction {mask.shape} does not match the DICOM series in {series}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"seg3d {model_name}", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, name in enumerate(pre.label_names[1:], start=1):
        code, meaning, _ = SNOMED.get(name.lower(), ("91723000", "Anatomical structure", ""))
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=codes.cid7150.Tissue,
                segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="seg3d",
        manufacturer_model_name=model_name,
        software_versions=__version__,
        device_serial_number="none",
        omit_empty_frames=False,
    )
    atomic_write(out, lambda tmp: seg.save_as(tmp), suffix=".dcm")
    return out
