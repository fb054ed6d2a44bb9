"""Which attention variant runs in which CPU engine: every registered variant, at the demo config's widths with seeded
random weights, through the path `seg3d infer --backend` takes (pipeline/engines.py: the checked ONNX export, then
ONNX Runtime and OpenVINO), against PyTorch fp32 on the same batch of windows. A variant the exporter or an engine
cannot take is what `--backend` falls back to PyTorch for, with one line; the table says which, and why.

    python -m benchmarks.variant_engines [--write]

With --write the table becomes the section "variant-engines" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from attention3d import create_model, list_models
from attention3d.fusion import fold_batch_norms
from benchmarks._report import ROOT, table, write_section
from pipeline.config import load_config
from pipeline.engines import TOLERANCE, engine_network, export_onnx
from pipeline.errors import Seg3dError
from pipeline.predict import _Timed

COLUMNS = [
    ("variant", "variant"),
    ("torch", "PyTorch fp32 (as seg3d runs it)"),
    ("onnxruntime", "ONNX Runtime"),
    ("openvino", "OpenVINO"),
]


def _ms(network, x: torch.Tensor) -> float:
    with torch.no_grad():
        network(x)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            network(x)
            best = min(best, time.perf_counter() - start)
    return 1000 * best


def variant_row(name: str, cfg, cache: Path) -> dict:
    patch, batch = tuple(cfg.data.patch_size), cfg.inference.sw_batch_size
    torch.manual_seed(0)
    model = create_model(name, channels=tuple(cfg.model.channels), strides=tuple(cfg.model.strides), out_channels=3)
    model.eval()
    x = torch.randn(batch, 1, *patch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = torch.softmax(model(x).float(), 1)
    served = copy.deepcopy(model)  # as the Predictor runs it: batch norms folded, channels-last
    fold_batch_norms(served)
    served = _Timed(served.to(memory_format=torch.channels_last_3d), device=torch.device("cpu"),
                    dtype=torch.float32, gates=False, channels_last=True)  # fmt: skip
    row = {"variant": name, "torch": f"{_ms(served, x):.0f} ms"}
    try:
        onnx = export_onnx(model, patch, batch, cache)
    except Seg3dError as err:
        why = f"export refused: {str(err)[:120]}"
        return {**row, "onnxruntime": why, "openvino": why}
    for engine in ("onnxruntime", "openvino"):
        try:
            network = engine_network(engine, onnx, batch, torch.float32)
        except Seg3dError as err:
            row[engine] = f"falls back: {str(err)[:120]}"
            continue
        with torch.no_grad():
            diff = float((torch.softmax(network(x), 1) - reference).abs().max())
        verdict = "runs" if diff <= TOLERANCE else "differs, not chosen by auto"
        row[engine] = f"{verdict} ({_ms(network, x):.0f} ms, max diff {diff:.1e})"
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    rows = []
    with tempfile.TemporaryDirectory(prefix="seg3d-variant-engines-") as cache:
        for name in list_models():
            rows.append(variant_row(name, cfg, Path(cache)))
            print(rows[-1], flush=True)
    patch = " x ".join(map(str, cfg.data.patch_size))
    body = (
        "### Which variant runs in which CPU engine\n\n"
        f"`python -m benchmarks.variant_engines`: each registered variant at the demo config's widths "
        f"({list(cfg.model.channels)}, strides {list(cfg.model.strides)}), seeded random weights, one batch of "
        f"{cfg.inference.sw_batch_size} windows of {patch} in fp32, exported as `seg3d infer --backend` exports it "
        f"(checked against PyTorch). 'runs': probabilities within {TOLERANCE:g} of PyTorch's (what `auto` requires); "
        "ms: best of 3 per batch after a warm-up. Where an engine cannot take a variant, `--backend` runs it in "
        "PyTorch and says so in one line.\n\n" + table(rows, COLUMNS)
    )
    print(body)
    if args.write:
        write_section("variant-engines", body)


if __name__ == "__main__":
    main()
