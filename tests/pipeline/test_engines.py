"""The inference engines (pipeline/engines.py): ONNX Runtime against PyTorch on the same bundle and windows, `auto`'s
choice and its cache (kept per weights, engine versions and CPU context; never an engine whose check failed), the
fallback to PyTorch for a network the exporter cannot take, and `seg3d infer --backend` on the real CT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from pipeline import engines
from pipeline.bundle import load_bundle
from pipeline.engines import choose_engine, describe, network_key
from pipeline.predict import Predictor

SEG3D = str(Path(sys.executable).with_name("seg3d"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One engine cache for the module: the network is exported once, as on a user's machine."""
    return tmp_path_factory.mktemp("engine_cache")


@pytest.fixture(autouse=True)
def _use_cache(cache, monkeypatch):
    monkeypatch.setenv("SEG3D_CACHE", str(cache))


def _predictor(bundle_dir: Path, backend: str, notes=None) -> Predictor:
    return Predictor.from_bundle(load_bundle(bundle_dir), precision="fp32", backend=backend, notes=notes)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_each_engine_gives_pytorchs_probabilities_and_mask_on_the_real_ct(bundle_dir, real_ct, engine):
    ct = real_ct / "ct_small.nii.gz"
    out = {b: _predictor(bundle_dir, b).predict_file(ct, probabilities=True) for b in ("torch", engine)}
    assert float(np.abs(out[engine].probabilities - out["torch"].probabilities).max()) <= engines.TOLERANCE
    np.testing.assert_array_equal(out[engine].labels, out["torch"].labels)
    assert out["torch"].labels.shape == nib.load(ct).shape
    assert len(np.unique(out["torch"].labels)) > 1, "a constant mask would agree trivially"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    both = (a > 0).sum() + (b > 0).sum()
    return 1.0 if both == 0 else 2 * float(((a > 0) & (b > 0) & (a == b)).sum()) / both


def test_openvino_in_bf16_keeps_the_mask_within_dice_0_005_of_fp32_pytorch(bundle_dir, real_ct):
    """bf16 where the CPU has it (AMX, AVX512-BF16): the engine rounds as PyTorch's bf16 does, the mask stays."""
    from pipeline.devices import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AMX or AVX512-BF16): OpenVINO would run fp32, tested above")
    ct = real_ct / "ct_small.nii.gz"
    reference = _predictor(bundle_dir, "torch").predict_file(ct).labels
    bf16 = Predictor.from_bundle(load_bundle(bundle_dir), precision="bf16", backend="openvino")
    assert bf16.engine.precision == "bf16" and bf16.dtype == torch.bfloat16
    assert _dice(bf16.predict_file(ct).labels, reference) >= 0.995

    # The first block's convolutions stay in f32 in the compiled graph, as in PyTorch's bf16; every other one is bf16.
    first = [m for m in bf16.model.encoders[0].modules() if isinstance(m, nn.Conv3d)]
    assert all(type(m).__name__.startswith("Fp32") for m in first)
    runtime = bf16.engine.compiled.get_runtime_model()
    convs = [
        (op.get_friendly_name(), op.get_rt_info()["runtimePrecision"].astype(str))
        for op in runtime.get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    ]
    assert len(bf16.engine.f32_layers) == len(first) == 2
    assert [name for name, precision in convs if precision == "f32"] == bf16.engine.f32_layers
    assert {precision for name, precision in convs if name not in bf16.engine.f32_layers} == {"bf16"}


def test_auto_measures_once_then_reads_its_cache(bundle_dir, cache):
    said: list[str] = []
    first = _predictor(bundle_dir, "auto", said.append)
    assert first.engine_name in engines.ENGINES
    assert said and said[-1].startswith(f"backend auto: {first.engine_name} (measured")
    records = list((cache / "engines").glob("*.json"))
    (record,) = [r for r in records if r.stem == f"{json.loads(r.read_text()).get('key')}-float32"]
    saved = json.loads(record.read_text())
    assert set(saved["ms_per_batch"]) == {"torch", "onnxruntime", "openvino"}
    assert max(saved["max_difference"].values()) <= 1e-3

    said.clear()
    second = _predictor(bundle_dir, "auto", said.append)
    assert second.engine_name == first.engine_name and "(cached" in said[-1]


def test_a_choice_measured_on_a_busy_machine_is_measured_again(bundle_dir, real_ct):
    """The record says the chosen engine took far longer per batch than a real case finds (as when the machine was
    busy while auto timed it): the case says so in one line, the record is marked stale, and the next run measures
    again; a run that matches its figure leaves the record alone."""
    said: list[str] = []
    first = _predictor(bundle_dir, "auto", said.append)  # measured, or read from the module's cache
    record = Path(os.environ["SEG3D_CACHE"]) / "engines" / f"{first.choice.key}-float32.json"
    saved = json.loads(record.read_text())
    engine = saved["engine"]
    busy = {**saved, "ms_per_batch": {**saved["ms_per_batch"], engine: 50 * saved["ms_per_batch"][engine]}}
    record.write_text(json.dumps(busy))

    said.clear()
    predictor = _predictor(bundle_dir, "auto", said.append)
    assert predictor.engine_name == engine and "(cached" in said[-1]
    predictor.predict_file(real_ct / "ct_small.nii.gz")
    assert len(said) == 2 and said[-1].startswith(f"backend auto: {engine} ran its batches in")
    assert "the next run measures the engines again" in said[-1]
    assert json.loads(record.read_text())["stale"] is True

    said.clear()
    again = _predictor(bundle_dir, "auto", said.append)
    assert "(measured" in said[-1] and "stale" not in json.loads(record.read_text())
    again.predict_file(real_ct / "ct_small.nii.gz")  # its own fresh figure: nothing to say, nothing marked
    assert len(said) == 1 and "stale" not in json.loads(record.read_text())


def test_a_cached_choice_is_kept_for_its_weights_only():
    torch.manual_seed(0)
    model = nn.Conv3d(1, 3, 3, padding=1).eval()
    assert not choose_engine(model, {"torch": model}, (16, 16, 8), 2).cached
    assert choose_engine(model, {"torch": model}, (16, 16, 8), 2).cached
    with torch.no_grad():
        model.weight.add_(0.1)
    assert not choose_engine(model, {"torch": model}, (16, 16, 8), 2).cached


def test_a_damaged_cached_export_is_exported_again(bundle_dir, real_ct, cache):
    predictor = _predictor(bundle_dir, "onnxruntime")  # the module's export, cached by the first test
    (path,) = [p for p in (cache / "engines").glob("*/model.onnx")]
    path.write_bytes(path.read_bytes()[:-100])
    again = _predictor(bundle_dir, "onnxruntime")
    assert engines._intact(path)
    x = torch.randn(2, 1, *predictor.patch_size)
    torch.testing.assert_close(again.engine(x), predictor.engine(x))


def test_the_key_changes_with_the_weights_the_engine_versions_the_cpu_the_threads_and_the_recipe(monkeypatch):
    torch.manual_seed(0)
    model = nn.Conv3d(1, 3, 3, padding=1)
    key = network_key(model, (16, 16, 8), 2)
    assert network_key(model, (16, 16, 8), 2) == key
    assert network_key(model, (16, 16, 16), 2) != key and network_key(model, (16, 16, 8), 4) != key
    real, real_cpu = engines._versions, engines._cpu()
    for engine in ("onnxruntime", "openvino"):
        monkeypatch.setattr(engines, "_versions", lambda e=engine: {**real(), e: "0.0.0"})
        assert network_key(model, (16, 16, 8), 2) != key
    monkeypatch.undo()
    monkeypatch.setattr(engines, "_cpu", lambda: "AMD EPYC 9654 (x86_64)")  # the same cache on another machine
    assert engines._cpu() != real_cpu and network_key(model, (16, 16, 8), 2) != key
    monkeypatch.undo()
    monkeypatch.setattr(engines, "GRAPH_RECIPE", engines.GRAPH_RECIPE - 1)  # a cache from before the f32 first block
    assert network_key(model, (16, 16, 8), 2) != key
    monkeypatch.undo()
    changed = nn.Conv3d(1, 3, 3, padding=1)  # another bundle's weights
    assert network_key(changed, (16, 16, 8), 2) != key
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert network_key(model, (16, 16, 8), 2) != key
    finally:
        torch.set_num_threads(threads)


def test_auto_never_picks_an_engine_whose_check_failed():
    """A candidate that is faster than PyTorch but wrong is left out, with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 3, 3, padding=1)).eval()

    def wrong(x: torch.Tensor) -> torch.Tensor:  # instant, and constant logits
        return torch.zeros(x.shape[0], 3, *x.shape[2:])

    choice = choose_engine(model, {"torch": model, "onnxruntime": wrong}, (16, 16, 8), 2)
    assert choice.engine == "torch" and "onnxruntime" not in choice.ms_per_batch
    assert "differ from PyTorch's" in choice.rejected["onnxruntime"] and "not eligible" in describe(choice)


class _Stateful(nn.Module):
    """A network that keeps Python state between calls: the exported graph freezes it, so the export's own check
    against PyTorch fails (an engine must never run what it does not reproduce)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x) * self.calls


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino", "auto"])
def test_a_network_the_exporter_cannot_take_runs_in_pytorch_with_one_line(engine):
    from pipeline.config import InferenceConfig
    from tests.pipeline.conftest import PRE

    said: list[str] = []
    predictor = Predictor(
        _Stateful(),
        PRE,
        patch_size=(16, 16, 8),
        inference=InferenceConfig(),
        backend=engine,
        notes=said.append,
    )
    assert predictor.engine is None and predictor.engine_name == "torch"
    assert said[0].startswith(f"backend {engine}: ") and "running the network in PyTorch" in said[0]
    assert len(said) == (2 if engine == "auto" else 1)  # auto then says its choice: torch, the one left
    probabilities, _ = predictor.predict_probabilities(torch.randn(1, 1, 20, 18, 10))
    assert probabilities.shape == (1, 3, 20, 18, 10)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_seg3d_infer_backend_writes_the_mask_pytorch_writes(bundle_dir, real_ct, cache, tmp_path, engine):
    ct = real_ct / "ct_small.nii.gz"
    out = tmp_path / "ct.nii.gz"
    command = [SEG3D, "infer", "--model", str(bundle_dir), "--input", str(ct), "--output", str(out)]
    done = subprocess.run(
        [*command, "--precision", "fp32", "--backend", engine],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SEG3D_CACHE": str(cache)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "ct_manifest.json").read_text())["settings"]["engine"] == engine
    written = nib.load(out)
    np.testing.assert_array_equal(np.asarray(written.dataobj), _predictor(bundle_dir, "torch").predict_file(ct).labels)
    np.testing.assert_allclose(written.affine, nib.load(ct).affine, atol=1e-5)


def test_an_unwritable_cache_falls_back_to_a_temporary_folder_with_one_line(bundle_dir, tmp_path, monkeypatch):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SEG3D_CACHE", str(blocked / "cache"))
    said: list[str] = []
    predictor = _predictor(bundle_dir, "onnxruntime", said.append)
    assert predictor.engine is not None and predictor.engine_name == "onnxruntime"
    assert len(said) == 1 and "cannot be written" in said[0] and "using" in said[0]
    said.clear()  # auto exports and records its choice: the cache is looked for, and its trouble said, once
    assert _predictor(bundle_dir, "auto", said.append).engine_name in engines.ENGINES
    assert [line for line in said if "cannot be written" in line] == said[:1] and len(said) == 2
    assert blocked.read_text() == "not a folder"


def test_in_bf16_an_engine_may_round_as_much_as_twice_pytorchs_own_bf16():
    """The bar is PyTorch at the Predictor's precision: bf16 rounding is what the user asked for; a larger error
    is still refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 3, 3, padding=1)).eval()

    def rounded(scale: float):
        def network(x: torch.Tensor) -> torch.Tensor:
            logits = model(x)
            return logits + scale * torch.sin(1000 * logits)  # a deterministic error of about `scale`

        return network

    candidates = {"torch": rounded(0.01), "openvino": rounded(0.015), "onnxruntime": rounded(0.5)}
    choice = choose_engine(model, candidates, (16, 16, 8), 2, precision="bfloat16")
    assert choice.max_difference["torch"] > engines.TOLERANCE  # the bar is PyTorch's, not 1e-3
    assert "openvino" in choice.ms_per_batch and "onnxruntime" in choice.rejected
