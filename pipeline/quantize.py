"""`--precision int8`: the bundle's network quantized after training and run by an engine's int8 kernels (OpenVINO on
VNNI/AMX, or ONNX Runtime), used only where its masks agree with fp32 PyTorch on the calibration cases.

The exported ONNX network (pipeline/engines.py) is quantized by ONNX Runtime's post-training static quantization:
its convolutions get int8 weights per output channel and uint8 activations, their ranges calibrated (min-max) on
CALIBRATION_WINDOWS windows taken from the first CALIBRATION_CASES cases of the run, read and preprocessed exactly
as inference reads them (the bundle's own preprocessing). The result is a QDQ model: both engines run it, OpenVINO
fusing each quantize-dequantize pair into an int8 convolution.

The check: each calibration case is predicted whole (the Predictor's windows, blending and overlap) by fp32 PyTorch
and by the int8 engine; for every foreground class present in either, the Dice of the two masks must be at least
1 - MAX_DICE_LOSS (0.995). Pass or fail, the outcome is cached with the quantized model, keyed as engines.py keys an
export (weights, patch, batch, engine versions, CPU, threads): a passed check makes the next run start at once, a
failed one is refused at once with the same line, before any case is computed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.engines import _intact
from pipeline.errors import Seg3dError
from pipeline.fileio import atomic_write, atomic_write_text, sha256_file

CALIBRATION_CASES = 2
CALIBRATION_WINDOWS = 16
MAX_DICE_LOSS = 0.005
INT8_ENGINES = ("openvino", "onnxruntime")


def calibration_windows(images: list[torch.Tensor], patch: tuple[int, ...], count: int) -> list[np.ndarray]:
    """`count` windows (1, C, *patch) float32 spread evenly over the preprocessed images (each (1, C, *S)), on a
    regular grid of window positions as the sliding window visits them; images smaller than the patch are padded."""
    per_image = max(1, -(-count // max(1, len(images))))
    windows = []
    for image in images:
        x = image[0].float()
        pad = [max(0, p - s) for p, s in zip(patch, x.shape[1:])]
        if any(pad):
            x = torch.nn.functional.pad(x, [v for p in reversed(pad) for v in (0, p)])
        side = max(1, round(per_image ** (1 / len(patch))))
        grids = [np.linspace(0, s - p, min(side, s - p + 1)).round().astype(int) for s, p in zip(x.shape[1:], patch)]
        starts = np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, len(patch))
        pick = np.linspace(0, len(starts) - 1, min(per_image, len(starts))).round().astype(int)
        for a, b, c in starts[pick]:
            window = x[:, a : a + patch[0], b : b + patch[1], c : c + patch[2]]
            windows.append(window[None].contiguous().numpy().astype(np.float32))
    return windows[:count]


def quantize_onnx(onnx: Path, windows: list[np.ndarray]) -> Path:
    """`onnx` quantized (QDQ, int8) with activation ranges from `windows`, written atomically beside it as
    model-int8.onnx with a sidecar holding its SHA-256; returned as it is where that file is intact already."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from pipeline.export import sidecar_path

    output = onnx.with_name("model-int8.onnx")
    if _intact(output):
        return output
    import onnx as onnx_lib

    name = onnx_lib.load(str(onnx), load_external_data=False).graph.input[0].name

    class Windows(CalibrationDataReader):
        def __init__(self):
            self.rest = iter(windows)

        def get_next(self):
            window = next(self.rest, None)
            return None if window is None else {name: window}

    def write(tmp: Path) -> None:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # its advice to pre-process the graph, on the root logger, is not the user's
        try:
            _quantize(tmp)
        finally:
            logging.disable(previous)

    def _quantize(tmp: Path) -> None:
        quantize_static(
            str(onnx),
            str(tmp),
            Windows(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,  # asymmetric: the ReLU outputs use the whole range
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "ConvTranspose"],  # the arithmetic; gates and norms stay float
        )

    atomic_write(output, write, suffix=".onnx")
    atomic_write_text(sidecar_path(output), json.dumps({"sha256": sha256_file(output)}) + "\n")
    return output


def mask_agreement(reference: torch.Tensor, candidate: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Dice of the argmax masks of two logit volumes (1, K, *S), for each foreground class present in either."""
    a, b = reference.argmax(1), candidate.argmax(1)
    dice = {}
    for k, name in enumerate(names[1:], start=1):
        in_a, in_b = a == k, b == k
        total = int(in_a.sum()) + int(in_b.sum())
        if total:
            dice[name] = round(2 * int((in_a & in_b).sum()) / total, 5)
    return dice


def refusal(check: dict) -> str:
    worst = min(check["dice"], key=check["dice"].get)
    return (
        f"--precision int8: the int8 network's {worst} mask differs from fp32's on the calibration cases (Dice"
        f" {check['dice'][worst]:.4f}, below {1 - MAX_DICE_LOSS:.3f}); run with --precision bf16 or fp32"
    )


def read_check(record: Path) -> dict | None:
    try:
        check = json.loads(record.read_text())
        return check if isinstance(check.get("dice"), dict) and isinstance(check.get("passed"), bool) else None
    except (OSError, ValueError, AttributeError):
        return None


def run_check(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    images: list[torch.Tensor],
    names: list[str],
) -> dict:
    """Whole-image logits of `reference` (fp32 PyTorch) and `candidate` (int8) on each calibration image; the worst
    Dice per class over the images, and whether every class kept 1 - MAX_DICE_LOSS."""
    dice: dict[str, float] = {}
    with torch.no_grad():
        for image in images:
            for name, value in mask_agreement(reference(image), candidate(image), names).items():
                dice[name] = min(value, dice.get(name, 1.0))
    if not dice:
        raise Seg3dError(
            "--precision int8: no calibration case has a foreground voxel in fp32 or int8, so the check cannot tell"
            " the masks apart; calibrate on cases that show the structures (put one first) or use --precision bf16"
        )
    return {"dice": dice, "passed": min(dice.values()) >= 1 - MAX_DICE_LOSS, "cases": len(images)}


def prepare_int8(predictor, sources: list[tuple[str, Path]], notes: Callable[[str], None] | None = None) -> dict:
    """Give `predictor` (made with precision="int8") its int8 engine: quantized and checked on `sources` (case,
    path; the first CALIBRATION_CASES are read and preprocessed as inference reads them), or read from the cache.
    Seg3dError where the check fails (now or in the cached record) or no engine can run the quantized network."""
    from pipeline.engines import _best_ms, engine_network, network_key
    from pipeline.predict import IMAGE, _Timed

    p = predictor
    batch = p.inference.sw_batch_size
    record = p.engine_cache / f"{network_key(p.model, p.patch_size, batch)}-int8-{p.int8_backend}.json"
    check = read_check(record)
    if check is not None and not check["passed"]:
        raise Seg3dError(refusal(check) + f" (cached in {record}; delete it to check again)")
    int8_onnx = p.onnx.with_name("model-int8.onnx")
    if check is not None and _intact(int8_onnx) and check.get("engine") in INT8_ENGINES:
        p.engine, p.engine_name = engine_network(check["engine"], int8_onnx, batch, torch.float32), check["engine"]
        if notes:
            notes(f"int8: {describe_check(check)} (cached)")
        return check

    images = []
    for case, path in sources[:CALIBRATION_CASES]:
        data = p.transforms({"case": case, IMAGE: p.read_input(path, case=case, notes=notes)})
        images.append(data[IMAGE][None].as_tensor().float())
    int8_onnx = quantize_onnx(p.onnx, calibration_windows(images, p.patch_size, CALIBRATION_WINDOWS))
    built, why = {}, {}
    for name in INT8_ENGINES if p.int8_backend == "auto" else (p.int8_backend,):
        try:
            built[name] = engine_network(name, int8_onnx, batch, torch.float32)
        except Seg3dError as err:
            why[name] = str(err)
    if not built:
        raise Seg3dError(f"--precision int8: {'; '.join(why.values())}; run with --precision bf16 or fp32")
    generator = torch.Generator().manual_seed(0)
    timing = [torch.randn(batch, *images[0].shape[1:2], *p.patch_size, generator=generator) for _ in range(3)]
    ms = _best_ms(built, timing)
    engine = min(ms, key=ms.get)

    def whole(network: torch.nn.Module, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        timed = _Timed(network, device=p.device, dtype=torch.float32, gates=False, channels_last=channels_last)
        return lambda x: torch.as_tensor(p._window(x, timed))

    check = run_check(whole(p.model, p.channels_last), whole(built[engine], False), images, p.pre.label_names)
    check.update(engine=engine, ms_per_batch=ms, windows=CALIBRATION_WINDOWS)
    try:
        atomic_write_text(record, json.dumps(check, indent=2) + "\n")
    except OSError as err:
        if notes:
            notes(f"int8 check not cached ({err.strerror or err}); the next run quantizes and checks again")
    if not check["passed"]:
        raise Seg3dError(refusal(check))
    p.engine, p.engine_name = built[engine], engine
    if notes:
        notes(f"int8: {describe_check(check)}")
    return check


def describe_check(check: dict) -> str:
    dice = ", ".join(f"{name} {value:.4f}" for name, value in check["dice"].items())
    cases = f"{check['cases']} calibration case(s)"
    return f"{check['engine']} runs the quantized network; its masks against fp32's on {cases}: Dice {dice}"
