"""`seg3d export --format monai-bundle`: the folder MONAI's specification asks for, run by MONAI itself
(`python -m monai.bundle run`, `verify_net_in_out`) in a process where seg3d cannot be imported, on the real CT and on
a phantom stored LPS, against `seg3d infer` on the same files; bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import PostprocessConfig
from pipeline.monai_bundle_postprocess import keep_components
from pipeline.postprocess import postprocess
from pipeline.synthetic import CaseSpec, make_phantom, to_nifti

SITE = sysconfig.get_paths()["purelib"]
# `python -m monai.bundle ARGS` without seg3d: -I (no PYTHON* variables, no working folder on sys.path, no user site)
# and -S (no site: the .pth of seg3d's editable install is never read), then the environment's site-packages appended
# after the standard library, as site would have put it, minus the .pth files.
WITHOUT_SEG3D = (
    "import runpy, sys; sys.path.append(sys.argv.pop(1)); sys.argv[0] = 'monai.bundle';"
    " runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)"
)
MANDATORY = ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors")
TENSOR_KEYS = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data")
SPEC = CaseSpec(shape=(48, 48, 16), spacing=(0.9, 0.9, 2.5), orientation="LPS", tumour=True, decoys=1)


def monai_bundle(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m monai.bundle ARGS` in the bundle's folder, in a process that cannot import seg3d."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(bundle), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-I", "-S", "-c", WITHOUT_SEG3D, SITE, *args]
    return subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(bundle_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "monai_bundle"
    assert main(["export", "--model", str(bundle_dir), "--format", "monai-bundle", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The phantom stored LPS and the real CT (30 slices), side by side in one folder."""
    from tests.conftest import REAL_CT

    if not REAL_CT.is_dir():
        pytest.skip(f"real CT data not found at {REAL_CT} (it sits beside the repository as ../shared/data/real_ct)")
    folder = tmp_path_factory.mktemp("in")
    image, _, affine = make_phantom(np.random.default_rng(3), SPEC)
    nib.save(to_nifti(image, affine, "LPS"), folder / "phantom_LPS.nii.gz")
    (folder / "ct_small.nii.gz").write_bytes((REAL_CT / "ct_small.nii.gz").read_bytes())
    return folder


def test_the_folder_holds_what_the_specification_asks_for(exported, bundle_dir):
    names = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    for required in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "models/model.pt"):
        assert required in names
    assert "LICENSE" in names and "docs/README.md" in names and not any(n.startswith(".") for n in names)
    meta = json.loads((exported / "configs" / "metadata.json").read_text())
    assert all(isinstance(meta[k], str) and meta[k] for k in (*MANDATORY, "copyright"))
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert all(k in image and k in pred for k in TENSOR_KEYS)
    assert (image["format"], image["modality"], image["num_channels"]) == ("hounsfield", "CT", 1)
    assert image["spatial_shape"] == [32, 32, 16] and image["dtype"] == "float32"
    assert pred["channel_def"] == {"0": "background", "1": "pancreas", "2": "cancer"} and pred["num_channels"] == 3
    # The state dict is the bundle's network, tensor for tensor (loading it needs no pickle of code).
    from pipeline.bundle import load_bundle

    state = torch.load(exported / "models" / "model.pt", weights_only=True)
    reference = load_bundle(bundle_dir).model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    config = json.loads((exported / "configs" / "inference.json").read_text())
    assert config["inferer"]["roi_size"] == [32, 32, 16] and config["inferer"]["sigma_scale"] == 0.125
    assert config["inferer"]["mode"] == "gaussian" and config["inferer"]["overlap"] == 0.5


def test_the_torchscript_file_carries_the_configs_as_monai_deploy_reads_them(exported):
    """MONAI Deploy's MonaiBundleInferenceOperator loads a TorchScript bundle through MONAI's load_net_with_metadata,
    which reads metadata.json and the other configs from the file's extra files."""
    from monai.data import load_net_with_metadata

    net, meta, extra = load_net_with_metadata(exported / "models" / "model.ts", more_extra_files=("inference.json",))
    assert meta == json.loads((exported / "configs" / "metadata.json").read_text())
    assert json.loads(extra["inference.json"]) == json.loads((exported / "configs" / "inference.json").read_text())
    x = torch.zeros(1, 1, *meta["network_data_format"]["inputs"]["image"]["spatial_shape"])
    assert net(x).shape[1] == meta["network_data_format"]["outputs"]["pred"]["num_channels"]


def test_monai_runs_it_without_seg3d_and_agrees_with_seg3d_infer(exported, bundle_dir, inputs, tmp_path):
    probe = monai_bundle(exported, "--help")  # fire's help: monai.bundle's command line itself is there
    assert probe.returncode == 0, probe.stderr[-2000:]
    isolated = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        "import sys; sys.path.append(sys.argv[1]); import monai; import pipeline",
        SITE,
    ]
    refused = subprocess.run(isolated, cwd=exported, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert "No module named 'pipeline'" in refused.stderr  # monai imports there, seg3d's packages do not
    refused = subprocess.run(
        [*isolated[:4], isolated[4].replace("pipeline", "attention3d"), SITE],
        cwd=exported,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert "No module named 'attention3d'" in refused.stderr

    out = tmp_path / "monai_out"
    run = monai_bundle(
        exported,
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(inputs),
        "--output_dir",
        str(out),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["ct_small_seg.nii.gz", "phantom_LPS_seg.nii.gz"]
    for name in ("phantom_LPS", "ct_small"):
        source = inputs / f"{name}.nii.gz"
        ours = tmp_path / f"seg3d_{name}.nii.gz"
        argv = ["infer", "--model", str(bundle_dir), "--input", str(source), "--output", str(ours)]
        assert main([*argv, "--precision", "fp32"]) == 0
        theirs, ref, src = nib.load(out / f"{name}_seg.nii.gz"), nib.load(ours), nib.load(source)
        assert theirs.shape == ref.shape == src.shape
        np.testing.assert_allclose(theirs.affine, src.affine, atol=1e-5)
        np.testing.assert_allclose(ref.affine, src.affine, atol=1e-5)
        a, b = np.asarray(ref.dataobj), np.asarray(theirs.dataobj)
        for c in (1, 2):
            assert (a == c).any(), f"{name}: no voxel of class {c}; a Dice of empty masks would prove nothing"
            dice = 2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum())
            assert dice >= 0.99, f"{name} class {c}: Dice {dice:.4f}"


def test_monai_verifies_the_network_against_network_data_format(exported):
    args = ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", "--device", "cpu"]
    done = monai_bundle(exported, "verify_net_in_out", "network_def", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data shape of network is verified with no error" in done.stdout + done.stderr
    # The same check fails when the metadata lies about the network: it is not a check that always passes.
    wrong = monai_bundle(
        exported,
        "verify_net_in_out",
        "network_def",
        *args,
        "--_meta_#network_data_format#outputs#pred#num_channels",
        "5",
    )
    assert wrong.returncode != 0 and "output channel number `3` doesn't match: `5`" in wrong.stderr


@pytest.mark.parametrize("seed", range(6))
def test_the_bundles_post_processing_is_seg3ds(seed):
    """scripts/postprocess.py's rules against pipeline.postprocess on random blobby label maps."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.normal(size=(40, 36, 20)), 1.5)
    kind = ndimage.gaussian_filter(rng.normal(size=(40, 36, 20)), 2.0)  # which class, independent of where
    foreground = blobs > np.quantile(blobs, 0.85)  # sparse blobs: several components
    labels = np.where(foreground, np.where(kind > 0, 2, 1), 0).astype(np.uint8)
    names = ["background", "pancreas", "cancer"]
    for cfg, inside in ((PostprocessConfig(), [[2, 1]]), (PostprocessConfig(largest_component=False), [[2, 1]])):
        expected = postprocess(labels, names, cfg)
        assert not np.array_equal(expected, labels)  # the rules change something here
        np.testing.assert_array_equal(keep_components(labels, cfg.largest_component, inside), expected)


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _newer_format(bundle_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in bundle_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, "bundle_format": 2}))
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown bundle", r"model .*nope not found"),
        ("newer bundle format", r"metadata.json has format 2, this seg3d reads format 1"),
        ("output not empty", r"--output .*full exists and is not empty; give a new or empty folder"),
        ("output is a file", r"--output .*a_file is a file; a MONAI Bundle is a folder"),
        ("overwrite", r"--overwrite does not apply to --format monai-bundle"),
        ("ensemble", r"is an ensemble .*nothing was written"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, message, bundle_dir, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "full").mkdir()
    (work / "full" / "keep.txt").write_text("mine")
    (work / "a_file").write_text("x")
    model, output, extra = str(bundle_dir), work / "new", []
    if case == "unknown bundle":
        model = str(work / "nope")
    elif case == "newer bundle format":
        model = str(_newer_format(bundle_dir, tmp_path / "newer"))
    elif case == "output not empty":
        output = work / "full"
    elif case == "output is a file":
        output = work / "a_file"
    elif case == "overwrite":
        extra = ["--overwrite"]
    else:
        from pipeline.ensemble import save_ensemble

        model = str(save_ensemble(tmp_path / "ens", {"a": bundle_dir, "b": bundle_dir}, postprocess=False))
    before = _files(work)
    code = main(["export", "--model", model, "--format", "monai-bundle", "--output", str(output), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("seg3d export: error: ")
    assert re.search(message, err), err
    assert _files(work) == before
    assert (work / "full" / "keep.txt").read_text() == "mine"


def test_an_empty_output_folder_is_filled(bundle_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["export", "--model", str(bundle_dir), "--format", "monai-bundle", "--output", str(out)]) == 0
    assert (out / "configs" / "inference.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary folder left beside it
