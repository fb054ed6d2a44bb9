"""`seg3d export`: every registered variant to ONNX and TorchScript, run by onnxruntime / torch.jit.load and compared
with the PyTorch network; the sidecar; the CLI on a real bundle and on an MLflow run; bad input."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from attention3d import create_model, list_models
from pipeline.bundle import PREPROCESSING, load_bundle, save_bundle
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import Seg3dError
from pipeline.export import FORMATS, export_network, parse_patch, sidecar_path
from tests.pipeline.conftest import PRE

# Not a multiple of the total stride (4) along z: the padding and cropping inside the U-Net are exported too.
PATCH = (24, 20, 10)
TINY = {"channels": (4, 8, 16), "strides": (2, 2), "out_channels": 3}
EXT = {"onnx": "onnx", "torchscript": "pt"}


@pytest.fixture(autouse=True)
def one_thread():
    """The networks here are tiny: a second thread only adds spin-waiting, badly so on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    """Run the file as a deployment would, without seg3d."""
    if fmt == "onnx":
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"image": x.numpy()})[0]
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(x).numpy()


def _assert_reproduces(exported: np.ndarray, reference: torch.Tensor) -> None:
    ref = reference.numpy()
    assert exported.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert scale > 0.1  # untrained but not degenerate: a comparison of zeros would prove nothing
    np.testing.assert_allclose(exported, ref, rtol=0, atol=1e-4 * scale)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cases():
    for name in list_models():
        for fmt in FORMATS:
            marks = [pytest.mark.slow] if fmt == "onnx" else []  # the torch.export-based exporter takes seconds
            yield pytest.param(name, fmt, id=f"{name}-{fmt}", marks=marks)


@pytest.mark.parametrize("name, fmt", list(_cases()))
def test_every_variant_exports_and_reproduces_the_network(name, fmt, tmp_path):
    torch.manual_seed(0)
    net = create_model(name, **TINY).eval()
    out = tmp_path / f"{name}.{EXT[fmt]}"
    result = export_network(net, out, fmt=fmt, name=name, patch=PATCH)
    assert result.path == out and out.is_file()

    # A batch of 3, unlike the exporter's own check (2) and example (1): the batch axis must be truly dynamic.
    x = torch.randn(3, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = net(x)
    _assert_reproduces(_run(out, fmt, x), reference)

    side = json.loads(sidecar_path(out).read_text())
    assert side["model"] == name and side["format"] == fmt and side["patch_size"] == list(PATCH)
    assert side["sha256"] == _sha(out)
    assert side["input"]["shape"] == ["batch", 1, *PATCH] and side["output"]["shape"] == ["batch", 3, *PATCH]
    if fmt == "onnx":
        graph = onnx.load(str(out)).graph
        dims = graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, *PATCH]
        assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]


def test_embedded_record_matches_the_sidecar(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "unet.pt"
    export_network(create_model("unet", **TINY), out, fmt="torchscript", name="unet", patch=PATCH, info={"k": 1})
    files = {"seg3d.json": ""}
    torch.jit.load(str(out), _extra_files=files)
    embedded, side = json.loads(files["seg3d.json"]), json.loads(sidecar_path(out).read_text())
    assert embedded["k"] == side["k"] == 1
    assert {k: v for k, v in side.items() if k in embedded} == embedded


def test_parse_patch():
    assert parse_patch("96, 96,64") == (96, 96, 64)
    for bad in ("96,96", "96,96,0", "a,b,c", "96,96,96,96", "\u00b2,2,2", "9" * 5000 + ",1,1"):
        with pytest.raises(Seg3dError, match="three positive integers"):
            parse_patch(bad)
    # The bounds of a config's data.patch_size: a patch no network could run is refused before any allocation.
    with pytest.raises(Seg3dError, match=r"^--patch '100000,100000,100000': each edge must be .* in 1\.\.1024"):
        parse_patch("100000,100000,100000")
    with pytest.raises(Seg3dError, match=r"is 1,073,741,824 voxels, more than the 33,554,432 allowed"):
        parse_patch("1024,1024,1024")
    assert parse_patch("1024,1024,16") == (1024, 1024, 16)


# -- the CLI on a real bundle -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """An untrained attention_unet bundle, as tests/pipeline/test_infer.py makes it."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.name=attention_unet", "data.patch_size=[32, 32, 16]"])
    model = create_model("attention_unet", **TINY)
    return save_bundle(tmp_path_factory.mktemp("bundle") / "bundle", model, cfg, PRE)


def _check_cli_export(bundle_dir: Path, out: Path, fmt: str, patch: tuple[int, int, int]) -> None:
    bundle = load_bundle(bundle_dir)
    x = torch.randn(2, 1, *patch, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = bundle.model(x)
    _assert_reproduces(_run(out, fmt, x), reference)
    side = json.loads(sidecar_path(out).read_text())
    assert side["model"] == "attention_unet" and side["patch_size"] == list(patch)
    assert side["preprocessing"] == json.loads((bundle_dir / PREPROCESSING).read_text())
    assert side["labels"] == {"background": 0, "pancreas": 1, "cancer": 2}
    assert side["sliding_window"]["overlap"] == bundle.config.inference.overlap


@pytest.mark.slow
def test_cli_exports_a_bundle_to_onnx_with_its_patch_size(bundle_dir, tmp_path, capsys):
    out = tmp_path / "deploy" / "model.onnx"
    assert main(["export", "--model", str(bundle_dir), "--format", "onnx", "--output", str(out)]) == 0
    _check_cli_export(bundle_dir, out, "onnx", (32, 32, 16))
    printed = capsys.readouterr().out
    assert str(bundle_dir / PREPROCESSING) in printed and str(sidecar_path(out)) in printed


def test_cli_exports_a_bundle_to_torchscript_with_another_patch(bundle_dir, tmp_path):
    out = tmp_path / "model.pt"
    argv = ["export", "--model", str(bundle_dir), "--format", "torchscript", "--output", str(out)]
    assert main([*argv, "--patch", "40,24,12"]) == 0
    _check_cli_export(bundle_dir, out, "torchscript", (40, 24, 12))


@pytest.mark.slow
def test_cli_exports_from_an_mlflow_run(bundle_dir, tmp_path):
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "export-test", tmp_path)
    run_id = tracker.start("r", tags={})
    tracker.log_artifacts(bundle_dir, "bundle")
    tracker.end()
    out = tmp_path / "from_run.pt"
    argv = ["export", "--model", f"runs:/{run_id}/bundle", "--tracking-uri", uri, "--format", "torchscript"]
    assert main([*argv, "--output", str(out)]) == 0
    _check_cli_export(bundle_dir, out, "torchscript", (32, 32, 16))
    assert json.loads(sidecar_path(out).read_text())["source"] == f"runs:/{run_id}/bundle"


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing bundle", "model .*nope not found"),
        ("unknown format", "unknown export format 'tflite'; choose one of onnx, torchscript"),
        ("output under a file", "cannot be created: .*not_a_folder is a file"),
        ("output is a folder", "is a folder; give a file name"),
        ("bad patch", "--patch '32,32' must be three positive integers"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, message, bundle_dir, tmp_path, capsys):
    (tmp_path / "not_a_folder").write_text("x")
    (tmp_path / "a_folder").mkdir()
    argv = {"model": str(bundle_dir), "format": "torchscript", "output": str(tmp_path / "m.pt")}
    extra: list[str] = []
    if case == "missing bundle":
        argv["model"] = str(tmp_path / "nope")
    elif case == "unknown format":
        argv["format"] = "tflite"
    elif case == "output under a file":
        argv["output"] = str(tmp_path / "not_a_folder" / "m.pt")
    elif case == "output is a folder":
        argv["output"] = str(tmp_path / "a_folder")
    else:
        extra = ["--patch", "32,32"]
    before = _files(tmp_path)
    code = main(["export", *(x for k, v in argv.items() for x in (f"--{k}", v)), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("seg3d export: error: ")
    assert re.search(message, err), err
    assert _files(tmp_path) == before


def test_existing_output_needs_overwrite(bundle_dir, tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"an older export")
    argv = ["export", "--model", str(bundle_dir), "--format", "torchscript", "--output", str(out)]
    assert main(argv) == 2
    assert "exists; --overwrite replaces it" in capsys.readouterr().err
    assert out.read_bytes() == b"an older export" and not sidecar_path(out).exists()
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(sidecar_path(out).read_text())["sha256"] == _sha(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.json"]  # no temporary file left
