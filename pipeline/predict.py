"""Predictor: files -> arrays -> logits, with the bundle's own preprocessing (nnU-Net's layered predictor).

One sliding-window path serves validation during training and `seg3d infer`: MONAI's sliding-window inference with
Gaussian blending (sigma = patch * sigma_scale, 1/8 as nnU-Net) and batched windows, optionally mirrored over all
8 flip combinations (test-time augmentation). `predict_file` reads the input once (refusing what is not a CT in HU
by check-data's own rule), maps the probabilities back into the input's own voxel grid (pipeline/grid.py) and
post-processes the labels (pipeline/postprocess.py); pipeline/writers.py puts a Prediction into files, from what
was read (the Prediction's `source`), never from the input read again.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from attention3d.fusion import fold_batch_norms
from pipeline.config import InferenceConfig, PostprocessConfig
from pipeline.devices import autocast, resolve_precision
from pipeline.engines import (
    ENGINES,
    cache_folder,
    check_engine,
    choice_record,
    choose_engine,
    confirm_choice,
    describe,
    engine_network,
    export_onnx,
)
from pipeline.errors import Seg3dError
from pipeline.grid import Grid, argmax_classes, labels_in_grid, resample_to_grid
from pipeline.imageio import SourceFile, Volume, read_volume
from pipeline.integrity import check_intensities
from pipeline.postprocess import inside_rules, postprocess
from pipeline.transforms import IMAGE, Preprocessing, inference_transforms

FLIPS = [dims for k in range(4) for dims in itertools.combinations((2, 3, 4), k)]  # the 8 mirrorings of (B, C, X, Y, Z)


@dataclass
class Prediction:
    labels: np.ndarray  # uint8 class indices in the input's stored voxel grid
    affine: np.ndarray  # the input's RAS affine
    probabilities: np.ndarray | None = None  # (K, *S) float32 in the input grid, when asked for
    gate: np.ndarray | None = None  # the finest attention-gate map in [0, 1], input grid, when asked for
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    source: SourceFile | None = None  # the input as it was read: its identity and NIfTI header, for the writers


class _Timed(nn.Module):
    """The network as the sliding window sees it: times its own forward calls (the rest of the sliding window is
    stitching) and appends the finest attention-gate map as one more channel when asked to, so that the gate
    is blended and inverted exactly like the logits."""

    def __init__(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype, gates: bool, channels_last: bool):
        super().__init__()
        self.model, self.device, self.dtype, self.gates = model, device, dtype, gates
        self.channels_last = channels_last
        self.seconds = 0.0
        self.calls = 0

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
        self.calls += 1
        return out


def keep_first_block_in_fp32(model: nn.Module) -> list[nn.Module]:
    """Run the convolutions of the network's first block (those at the image's full resolution, before the first
    downsampling: `model.encoders[0]` of an attention3d U-Net, else the first convolution alone) outside autocast, in
    fp32. In bf16 the image's intensities and the first features would be rounded to 8 bits of mantissa before
    their sums. Measured on the study's attention_unet against fp32's masks (pancreas Dice): all in bf16, 0.9922 on
    the real CT and 0.9923 on the 512 x 512 x 200 phantom; the first convolution alone in fp32, 1.0000 and 0.9869;
    the whole first block in fp32, 1.0000 and 0.9955 (and the first two blocks 0.9984 on the phantom, at 15% more
    time). The first block costs about 5% more time than the stem alone on the real CT (21.6 against 20.5 s
    in-process). Only on a model that is not trained further: each convolution's class becomes a subclass whose
    forward does this (weights, keys and copies stay as they are). Returns the convolutions (empty for a network
    without any)."""
    encoders = getattr(model, "encoders", None)
    first = encoders[0] if isinstance(encoders, nn.ModuleList) and len(encoders) else None
    convs = [m for m in (model if first is None else first).modules() if isinstance(m, nn.modules.conv._ConvNd)]
    convs = convs if first is not None else convs[:1]
    for conv in convs:
        if not getattr(conv, "_fp32_block", False):
            cls = type(conv)
            if cls not in _FP32_CONVS:
                _FP32_CONVS[cls] = type(f"Fp32{cls.__name__}", (cls,), {"forward": _fp32_forward, "_fp32_block": True})
            conv.__class__ = _FP32_CONVS[cls]
    return convs


def _fp32_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        return super(type(self), self).forward(x.float())


_FP32_CONVS: dict[type, type] = {}


class Predictor:
    """Layered: `predict_file` (path -> Prediction in the input grid) -> `predict_probabilities` (preprocessed
    tensor -> class probabilities) -> `predict_preprocessed` (preprocessed tensor -> logits)."""

    def __init__(
        self,
        model: nn.Module,
        pre: Preprocessing,
        *,
        patch_size: tuple[int, int, int],
        inference: InferenceConfig,
        postprocessing: PostprocessConfig | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        tta: bool = False,
        channels_last: bool = False,
        fold_norms: bool = False,
        backend: str = "torch",
        fp32_first_block: bool = False,
        notes: Callable[[str], None] | None = None,
    ):
        """`channels_last` converts the model's weights in place (NDHWC), the layout oneDNN's 3D convolutions on CPU
        run fastest in (docs/benchmarks.md, "design measurements"). Only for a model that is not trained further.
        `fold_norms` runs a copy of the model with its batch norms folded into the convolutions before them (the
        same function, one pass less over every feature map); the given model is left as it is.
        `backend` (pipeline/engines.py): the engine that runs the network's windows on the CPU; `auto` measures
        and says its choice to `notes`. Gate maps (`gates=True`) always come from PyTorch.
        `fp32_first_block`: in bf16 or fp16, the first block's convolutions run in fp32 (keep_first_block_in_fp32;
        OpenVINO's bf16 does the same in its graph); only for a model that is not trained further.
        `postprocessing` is checked against the model's class names here (a Seg3dError names a class it lacks)."""
        if postprocessing is not None:
            inside_rules(postprocessing, pre.label_names)
        self.device = torch.device(device)
        model = model.eval()
        if fold_norms and any(isinstance(m, _BatchNorm) for m in model.modules()):
            model = copy.deepcopy(model)
            fold_batch_norms(model)
        self.model = model.to(self.device)
        self.patch_size = tuple(patch_size)
        self.engine: nn.Module | None = None  # the network a non-PyTorch engine runs; None: PyTorch's own
        self.engine_name = check_engine(backend)
        # int8 (pipeline/quantize.py): an engine runs the quantized network once prepare_int8 has calibrated and
        # checked it; PyTorch's side (the check's reference, gate maps) runs fp32.
        self.int8_backend = backend if precision == "int8" else None
        if self.int8_backend == "torch":
            raise Seg3dError(
                "--precision int8 runs on an engine's int8 kernels; add --backend openvino, onnxruntime or auto"
            )
        self.dtype = resolve_precision("fp32" if self.int8_backend else precision, self.device)
        built: dict[str, nn.Module] = {}
        if backend != "torch":
            if self.device.type != "cpu":
                raise Seg3dError(f"--backend {backend} runs on the CPU; on {self.device.type} use --backend torch")
            cache = cache_folder(notes)  # found (or replaced by a temporary one, said once) before any export
            self.engine_cache, batch = cache, inference.sw_batch_size
            try:
                self.onnx = onnx = export_onnx(self.model, self.patch_size, batch, cache)  # once, for every engine
                for name in () if self.int8_backend else ENGINES[1:] if backend == "auto" else (backend,):
                    built[name] = engine_network(name, onnx, batch, self.dtype)
            except Seg3dError as err:  # a layer the exporter or an engine cannot take: said in one line
                if self.int8_backend:
                    raise Seg3dError(f"--precision int8: {err}; run with --precision bf16 or fp32") from None
                if notes:
                    notes(f"backend {backend}: {err}; running the network in PyTorch")
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        if fp32_first_block and self.dtype != torch.float32:
            keep_first_block_in_fp32(self.model)  # after the export: the engines' graphs are traced from the plain one
        self.pre = pre
        self.notes = notes
        self.last_network: _Timed | None = None
        self.choice = None  # auto's EngineChoice
        self.choice_record = None  # where auto's choice is cached, until a run has confirmed its timing (once)
        if backend == "auto" and not self.int8_backend:
            timed = _Timed(self.model, device=self.device, dtype=self.dtype, gates=False, channels_last=channels_last)
            choice = choose_engine(
                self.model,
                {"torch": timed, **built},
                self.patch_size,
                inference.sw_batch_size,
                cache=cache,
                notes=notes,
                precision=str(self.dtype).removeprefix("torch."),
            )
            if notes:
                notes(describe(choice))
            backend = choice.engine
            self.choice = choice
            self.choice_record = choice_record(choice, str(self.dtype).removeprefix("torch."), cache)
        self.engine = built.get(backend)
        self.engine_name = backend if self.engine is not None else "torch"
        if self.engine_name == "onnxruntime":
            self.dtype = torch.float32  # ONNX Runtime runs the exported network in fp32 (gate maps then too)
        self.postprocessing = postprocessing
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
        backend: str = "torch",
        notes: Callable[[str], None] | None = None,
    ) -> Predictor:
        cfg = bundle.config
        inference = cfg.inference if overlap is None else cfg.inference.model_copy(update={"overlap": overlap})
        return cls(
            bundle.model,
            pre=bundle.preprocessing,
            patch_size=cfg.data.patch_size,
            inference=inference,
            postprocessing=cfg.postprocess if postprocess else None,
            device=device,
            precision=precision,
            tta=tta,
            channels_last=torch.device(device).type == "cpu",
            fold_norms=True,
            backend=backend,
            fp32_first_block=True,
            notes=notes,
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

    def prepare_int8(self, sources: list[tuple[str, Path]], notes: Callable[[str], None] | None = None) -> dict:
        """With precision="int8": quantize, calibrate and check on `sources` (case, path), or read the cached check
        (pipeline/quantize.py); the int8 engine then runs the windows."""
        from pipeline.quantize import prepare_int8

        return prepare_int8(self, sources, notes)

    def _network(self, gates: bool) -> _Timed:
        if self.int8_backend and self.engine is None:
            raise RuntimeError("precision int8: call prepare_int8 with calibration cases before predicting")
        if self.engine is not None and not gates:
            return _Timed(self.engine, device=self.device, dtype=self.dtype, gates=False, channels_last=False)
        return _Timed(self.model, device=self.device, dtype=self.dtype, gates=gates, channels_last=self.channels_last)

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
        """Logits (B, K, *S) float32 for a preprocessed image (B, 1, *S); no mirroring (validation). The network
        that ran (its batches and seconds) is `last_network` afterwards."""
        network = self.last_network = self._network(gates=False)
        return torch.as_tensor(self._window(torch.as_tensor(image).float(), network))

    @torch.no_grad()
    def predict_probabilities(self, image: torch.Tensor, gates: bool = False) -> tuple[torch.Tensor, float]:
        """Class probabilities (B, K, *S), averaged over the 8 mirrorings with TTA; with `gates`, the blended
        finest gate map is channel K. Returns them and the seconds spent inside the network."""
        network = self._network(gates=gates and self.has_gates)
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
        chosen = self.model if self.engine is None else self.engine
        if self.choice_record is not None and network.model is chosen and network.calls:
            confirm_choice(self.choice, 1000 * network.seconds / network.calls, self.choice_record, self.notes)
            self.choice_record = None  # once per Predictor: its first case says whether the measurement held
        return total, network.seconds

    def predict_file(
        self,
        image: Path | str,
        case: str | None = None,
        probabilities: bool = False,
        gates: bool = False,
        notes: Callable[[str], None] | None = None,
    ) -> Prediction:
        """A CT file or DICOM folder -> labels in the file's own voxel grid (same shape and affine). The file is read
        once; `notes` receives what is worth saying about it (geometry, units, a HU warning) before any compute."""
        t = time.perf_counter()
        name = case or Path(image).name
        volume = self.read_input(image, case=name, notes=notes)
        source = volume.source
        record = {"case": name, IMAGE: volume}
        del volume  # the chain's copy is the only one kept through the network
        data = self.transforms(record, end=1)
        del record
        return self._predict_loaded(
            data, source, load_s=time.perf_counter() - t, probabilities=probabilities, gates=gates
        )

    def read_input(
        self, image: Path | str, case: str | None = None, notes: Callable[[str], None] | None = None
    ) -> Volume:
        """Read a CT once, refusing what is not in HU by check-data's rule; its notes go to `notes`."""
        name = case or Path(image).name
        volume = read_volume(image, case=name, kind="image")
        for note in [*volume.notes, *_hu_warnings(volume.array, image, case=name)]:
            if notes is not None:
                notes(str(note))
        return volume

    def predict_volume(self, volume: Volume, case: str, probabilities: bool = False, gates: bool = False) -> Prediction:
        """predict_file on a CT read already (read_input), left as it is: an ensemble's members share one read."""
        t = time.perf_counter()
        data = self.transforms({"case": case, IMAGE: volume}, end=1)
        return self._predict_loaded(
            data, volume.source, load_s=time.perf_counter() - t, probabilities=probabilities, gates=gates
        )

    def _predict_loaded(
        self, data: dict, source: SourceFile | None, *, load_s: float, probabilities: bool, gates: bool
    ) -> Prediction:
        timings = {"load": load_s}
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
        return Prediction(
            labels, original_affine, full.numpy() if full is not None else None, gate, timings, source=source
        )


def _hu_warnings(array: np.ndarray, image: Path | str, case: str) -> list[str]:
    """check-data's HU rule (pipeline.integrity.check_intensities) on the image inference was given: an error
    refuses it, with the fix; warnings are returned, to be said before the compute."""
    findings: list[tuple[str, str]] = []
    check_intensities(array, lambda level, message: findings.append((level, message)))
    said = [(level, f"image {Path(image).name}: {message.removeprefix('image ')}") for level, message in findings]
    for level, message in said:
        if level == "error":
            raise Seg3dError(message, case=case)
    return [message for _, message in said]
