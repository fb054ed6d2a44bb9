"""Predictor: files -> arrays -> logits, with the bundle's own preprocessing (nnU-Net's layered predictor).

One sliding-window path serves validation during training and `seg3d infer`: MONAI's SlidingWindowInferer with
Gaussian blending (sigma = patch * sigma_scale, 1/8 as nnU-Net) and batched windows. Predictions are mapped
back into the input's own voxel grid by inverting the preprocessing (crop, resampling, orientation): the
class probabilities are resampled, then the argmax taken, so boundaries are not nearest-neighbour blocky.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from scipy import ndimage
from torch import nn

from pipeline.config import InferenceConfig, PostprocessConfig
from pipeline.transforms import IMAGE, Preprocessing, as_record, inference_transforms


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
    its organ), then, per class, its largest component; a tumour class survives only inside or touching the
    pancreas kept. Class names decide which is the tumour ("cancer"/"tumour") and which the organ."""
    if not cfg.largest_component and not cfg.tumour_inside_pancreas:
        return labels
    out = labels.copy()
    structure = ndimage.generate_binary_structure(3, 1)
    if cfg.largest_component and out.any():
        comp, n = ndimage.label(out > 0, structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            out[comp != (1 + int(np.argmax(sizes)))] = 0
    tumour = [i for i, n in enumerate(names) if n.lower() in ("cancer", "tumour", "tumor")]
    organ = [i for i, n in enumerate(names) if n.lower() == "pancreas"]
    if cfg.tumour_inside_pancreas and tumour and organ:
        near_organ = ndimage.binary_dilation(out == organ[0], structure)
        for t in tumour:
            comp, n = ndimage.label(out == t, structure)
            for k in range(1, n + 1):
                part = comp == k
                if not (part & near_organ).any():
                    out[part] = 0
    return out


@dataclass
class Prediction:
    labels: np.ndarray  # uint8 class indices in the input's stored voxel grid
    affine: np.ndarray  # the input's RAS affine
    probabilities: np.ndarray | None = None  # (K, *S) float, input grid, when asked for


class Predictor:
    """Layered: `predict_file` (path -> Prediction) -> `predict_preprocessed` (tensor -> logits)."""

    def __init__(
        self,
        model: nn.Module,
        pre: Preprocessing,
        patch_size: tuple[int, int, int],
        inference: InferenceConfig,
        postprocessing: PostprocessConfig | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.pre = pre
        self.dtype = resolve_precision(precision, self.device)
        self.postprocessing = postprocessing
        self.inferer = SlidingWindowInferer(
            roi_size=tuple(patch_size),
            sw_batch_size=inference.sw_batch_size,
            overlap=inference.overlap,
            mode="gaussian",
            sigma_scale=inference.sigma_scale,
            device=self.device,
            sw_device=self.device,
        )
        self.transforms = inference_transforms(pre)

    @classmethod
    def from_bundle(cls, bundle, device: str | torch.device = "cpu", precision: str = "auto") -> Predictor:
        cfg = bundle.config
        return cls(
            bundle.model, bundle.preprocessing, cfg.data.patch_size, cfg.inference, cfg.postprocess, device, precision
        )

    @torch.no_grad()
    def predict_preprocessed(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, *S) float32 for a preprocessed image (B, 1, *S)."""
        x = torch.as_tensor(image).to(self.device, torch.float32)
        with autocast(self.device, self.dtype):
            logits = self.inferer(x, self.model)
        return torch.as_tensor(logits).float()

    def predict_file(self, image: Path | str, case: str | None = None, probabilities: bool = False) -> Prediction:
        """A CT file or DICOM folder -> labels in the file's own voxel grid (same shape and affine)."""
        data = self.transforms(as_record(case or Path(image).name, image))
        img: MetaTensor = data[IMAGE]
        original_affine = np.asarray(img.meta["original_affine"], dtype=np.float64)
        probs = torch.softmax(self.predict_preprocessed(img[None].as_tensor())[0], dim=0).cpu()
        out = MetaTensor(probs, meta=dict(img.meta))  # the meta carries the preprocessed affine
        out.applied_operations = list(img.applied_operations)
        inverted = self.transforms.inverse({IMAGE: out})[IMAGE]
        probs_in = torch.as_tensor(inverted)
        labels = probs_in.argmax(0).numpy().astype(np.uint8)
        if self.postprocessing is not None:
            labels = postprocess(labels, self.pre.label_names, self.postprocessing)
        return Prediction(labels, original_affine, probs_in.numpy() if probabilities else None)
