"""Hostile model bundles and configs (issue 12, classes 3 and 5, and `export --patch`): every number a bundle carries
is checked on load, as strictly as a training config, and every YAML seg3d reads refuses anchors and aliases.

Each damaged bundle is a copy of the tiny test bundle with one record changed; `seg3d infer` (and `seg3d export`)
must answer in one line naming the file and the key, exit 2, write nothing, and leave the bundle and the input as
they were. Bundles written by the current code still load unchanged, and `seg3d train` neither starts on nor writes
a preprocessing that would not load.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from attention3d import create_model, list_models
from pipeline.bounds import MAX_PATCH_EDGE
from pipeline.bundle import CONFIG, METADATA, PREPROCESSING, WEIGHTS, load_bundle, save_bundle
from pipeline.config import load_config
from pipeline.errors import Seg3dError
from pipeline.predict import Predictor
from pipeline.synthetic import synthesize
from pipeline.transforms import Preprocessing
from tests.pipeline._hostile import SEG3D, refused, small_ct, tree
from tests.pipeline.conftest import PRE, TINY

DAMAGED = "the bundle is damaged: re-export it from its run"


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return small_ct(tmp_path_factory.mktemp("input") / "ct.nii.gz", shape=(40, 40, 12))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A dataset that trains (two phantom cases, MSD layout)."""
    root = tmp_path_factory.mktemp("phantom")
    synthesize(root, cases=2, seed=0, test_cases=0)
    return root


def _json(name: str, change: Callable[[dict], object]) -> tuple[str, Callable[[Path], None]]:
    """A mutation of the JSON record `name`: `change` edits the parsed record in place, or returns a replacement."""

    def apply(folder: Path) -> None:
        raw = json.loads((folder / name).read_text())
        replaced = change(raw)
        (folder / name).write_text(json.dumps(raw if replaced is None else replaced))  # (NaN as Python writes it)

    return name, apply


def _config(change: Callable[[dict], object]) -> tuple[str, Callable[[Path], None]]:
    def apply(folder: Path) -> None:
        raw = yaml.safe_load((folder / CONFIG).read_text())
        change(raw)
        (folder / CONFIG).write_text(yaml.safe_dump(raw))

    return CONFIG, apply


def _text(name: str, text: str | bytes) -> tuple[str, Callable[[Path], None]]:
    def apply(folder: Path) -> None:
        if isinstance(text, bytes):
            (folder / name).write_bytes(text)
        else:
            (folder / name).write_text(text)

    return name, apply


def _set(key: str, value):
    return lambda raw: raw.__setitem__(key, value)


def _set_in(section: str, key: str, value):
    return lambda raw: raw[section].__setitem__(key, value)


def _unet(key: str, value):
    return lambda raw: raw["unet_config"].__setitem__(key, value)


def _truncate(folder: Path) -> None:
    lines = (folder / CONFIG).read_text().splitlines(keepends=True)
    (folder / CONFIG).write_text("".join(lines[: len(lines) // 2]))


NAN, INF = float("nan"), float("inf")
# id -> ((file, mutation), what the one line must say after "model bundle B: FILE: ")
DAMAGES = {
    # preprocessing.json: every field, type and range
    "nan mean": (_json(PREPROCESSING, _set("mean", NAN)), r"'mean' must be a finite number, got nan"),
    "inf mean": (_json(PREPROCESSING, _set("mean", INF)), r"'mean' must be a finite number, got inf"),
    "zero std": (_json(PREPROCESSING, _set("std", 0.0)), r"'std' must be a positive finite number, got 0\.0"),
    "negative std": (_json(PREPROCESSING, _set("std", -40.0)), r"'std' must be a positive finite number, got -40"),
    "reversed clip": (_json(PREPROCESSING, _set("clip", [250.0, -50.0])), r"'clip' must be \[low, high\] with low <"),
    "empty clip": (_json(PREPROCESSING, _set("clip", [40.0, 40.0])), r"'clip' must be \[low, high\] with low < high"),
    "nan clip": (_json(PREPROCESSING, _set("clip", [NAN, 250.0])), r"'clip' must be \[low, high\] in HU"),
    "zero spacing": (_json(PREPROCESSING, _set("target_spacing", [0.0, 2.0, 4.0])), r"'target_spacing' must be three"),
    "negative spacing": (_json(PREPROCESSING, _set("target_spacing", [-2, 2, 4])), r"'target_spacing' must be three"),
    "nan spacing": (_json(PREPROCESSING, _set("target_spacing", [2.0, NAN, 4.0])), r"positive finite spacings in mm"),
    "two spacings": (_json(PREPROCESSING, _set("target_spacing", [2.0, 2.0])), r"'target_spacing' must be three"),
    "text spacing": (_json(PREPROCESSING, _set("target_spacing", "2,2,4")), r"'target_spacing' must be .*got '2,2,4'"),
    "no labels": (
        _json(PREPROCESSING, lambda r: r.update(label_names=[], label_values=[])),
        r"'label_names' must list 2\.\.256 classes, background first, got \[\]",
    ),
    "background only": (
        _json(PREPROCESSING, lambda r: r.update(label_names=["background"], label_values=[0])),
        r"'label_names' must list 2\.\.256 classes",
    ),
    "label over 255": (
        _json(PREPROCESSING, _set("label_values", [0, 1, 300])),
        r"'label_values' must be whole numbers in 0\.\.255, got \[0, 1, 300\]",
    ),
    "negative label": (_json(PREPROCESSING, _set("label_values", [0, -1, 2])), r"whole numbers in 0\.\.255"),
    "fractional label": (_json(PREPROCESSING, _set("label_values", [0, 1.5, 2])), r"whole numbers in 0\.\.255"),
    "background not first": (_json(PREPROCESSING, _set("label_values", [1, 0, 2])), r"must start with 0"),
    "one value twice": (_json(PREPROCESSING, _set("label_values", [0, 1, 1])), r"gives one value to two classes"),
    "one name twice": (
        _json(PREPROCESSING, _set("label_names", ["background", "pancreas", "pancreas"])),
        r"'label_names' names a class twice",
    ),
    "names and values differ": (
        _json(PREPROCESSING, _set("label_values", [0, 1])),
        r"'label_values' must list one value per class of 'label_names' \(3\)",
    ),
    "name with a newline": (
        _json(PREPROCESSING, _set("label_names", ["background", "pan\ncreas", "cancer"])),
        r"'label_names' must be printable names of 1\.\.64 characters, got 'pan\\ncreas'",
    ),
    "text for a number": (_json(PREPROCESSING, _set("mean", "100")), r"'mean' must be a finite number, got '100'"),
    "true for a number": (_json(PREPROCESSING, _set("std", True)), r"'std' must be a positive finite number, got True"),
    "text for a flag": (_json(PREPROCESSING, _set("foreground_crop", "yes")), r"'foreground_crop' must be true or"),
    "unknown mode": (
        _json(PREPROCESSING, _set("intensity_mode", "zscore")),
        r"'intensity_mode' must be one of foreground, window, got 'zscore'",
    ),
    "missing key": (_json(PREPROCESSING, lambda r: r.pop("std") and None), r"'std' is missing"),
    "unknown key": (_json(PREPROCESSING, _set("gamma", 2)), r"unknown key 'gamma'; valid keys: target_spacing"),
    "preprocessing a list": (_json(PREPROCESSING, lambda r: [r]), r"must be a JSON object of preprocessing fields"),
    "preprocessing not JSON": (_text(PREPROCESSING, '{"mean": '), r"not valid JSON"),
    "preprocessing empty": (_text(PREPROCESSING, ""), r"not valid JSON"),
    "preprocessing not text": (_text(PREPROCESSING, b"\xff\xfe\x00{"), r"not UTF-8 text"),
    "preprocessing huge": (_text(PREPROCESSING, "{" + " " * (2 << 20) + "}"), r"larger than 1024 KiB"),
    "preprocessing nested": (_text(PREPROCESSING, "[" * 100_000), r"not valid JSON"),
    # config.yaml: the training config's own validation, plus the bounds training needs too
    "zero patch": (
        _config(_set_in("data", "patch_size", [0, 32, 16])),
        rf"'data\.patch_size': each edge must be a whole number of voxels in 1\.\.{MAX_PATCH_EDGE}, got \(0, 32, 16\)",
    ),
    "negative patch": (_config(_set_in("data", "patch_size", [-32, 32, 16])), r"'data\.patch_size': each edge"),
    "enormous patch": (_config(_set_in("data", "patch_size", [100000] * 3)), r"'data\.patch_size': each edge"),
    "patch of a billion voxels": (
        _config(_set_in("data", "patch_size", [1024] * 3)),
        r"'data\.patch_size': \(1024, 1024, 1024\) is 1,073,741,824 voxels",
    ),
    "nan target spacing": (
        _config(_set_in("data", "target_spacing", [NAN, 1.0, 1.0])),
        r"'data\.target_spacing\.0': Input should be a finite number",
    ),
    "zero target spacing": (
        _config(_set_in("data", "target_spacing", [0, 1.0, 1.0])),
        r"'data\.target_spacing\.0': Input should be greater than 0",
    ),
    "overlap of 1.5": (_config(_set_in("inference", "overlap", 1.5)), r"'inference\.overlap': Input should be less"),
    "unknown model": (_config(_set_in("model", "name", "unet3")), r"'model\.name': unknown model 'unet3'"),
    "unknown config key": (_config(_set_in("data", "gamma", 1)), r"unknown key 'data\.gamma'"),
    "config cut in half": ((CONFIG, _truncate), r"'\w+' is missing \(a bundle stores the whole resolved config\)"),
    "config empty": (_text(CONFIG, ""), r"'experiment' is missing"),
    "config a list": (_text(CONFIG, "- model\n- data\n"), r"a config is a mapping of sections"),
    "config not YAML": (_text(CONFIG, "model: [\n"), r"not valid YAML at line 2; fix the syntax"),
    "config alias": (
        _text(CONFIG, "experiment: &e x\nregistered_model: *e\n"),
        r"line 1: YAML anchors and aliases \(&name, \*name\) are not accepted",
    ),
    # metadata.json: a mapping with a network for one CT channel and one output per class, of a sane size
    "metadata a list": (_json(METADATA, lambda r: [r]), r"must be a JSON object, got list"),
    "metadata a number": (_json(METADATA, lambda r: 7), r"must be a JSON object, got int"),
    "metadata not JSON": (_text(METADATA, "{,}"), r"not valid JSON"),
    "no unet_config": (_json(METADATA, lambda r: r.pop("unet_config") and None), r"'unet_config' must be a JSON obj"),
    "unet_config a string": (_json(METADATA, _set("unet_config", "unet")), r"'unet_config' must be a JSON object"),
    "other model": (
        _json(METADATA, _set("model", "danet")),
        r"'model' is 'danet', but config\.yaml's model\.name is 'attention_unet'",
    ),
    "two input channels": (_json(METADATA, _unet("in_channels", 2)), r"'unet_config\.in_channels' must be 1, got 2"),
    "outputs not classes": (
        _json(METADATA, _unet("out_channels", 5)),
        r"'unet_config\.out_channels' must be 3 \(one per class of preprocessing\.json's label_names\), got 5",
    ),
    "outputs as text": (_json(METADATA, _unet("out_channels", "3")), r"'unet_config\.out_channels' must be 3"),
    "2D network": (_json(METADATA, _unet("spatial_dims", 2)), r"'unet_config\.spatial_dims' must be 3"),
    "channels over 4096": (
        _json(METADATA, _unet("channels", [100000, 8, 16])),
        r"'unet_config': channels must each be in 1\.\.4096, got \(100000, 8, 16\)",
    ),
    "zero channels": (_json(METADATA, _unet("channels", [0, 8, 16])), r"channels must each be in 1\.\.4096"),
    "absurd network": (
        _json(METADATA, _unet("channels", [4096, 4096, 4096])),
        r"'unet_config' describes a network larger than the weights file could fill",
    ),
    "zero stride": (_json(METADATA, _unet("strides", [0, 2])), r"strides must each be in 1\.\.8"),
    "even kernel": (_json(METADATA, _unet("kernel_size", 4)), r"kernel_size must be odd"),
    "negative kernel": (_json(METADATA, _unet("kernel_size", -1)), r"kernel_size must be odd and in 1\.\.9"),
    "nan dropout": (_json(METADATA, _unet("dropout", NAN)), r"'unet_config\.dropout': Input should be a finite"),
    "unknown norm": (_json(METADATA, _unet("norm", "nonsense")), r"'unet_config': norm 'nonsense' is not a MONAI norm"),
    "groups that do not divide": (
        _json(METADATA, _unet("norm", ["group", {"num_groups": 3}])),
        r"'unet_config' does not build \(num_channels \(4\) must be divisible by num_groups \(3\)\)",
    ),
    "unknown option": (_json(METADATA, _unet("gamma", 1)), r"unknown key 'unet_config\.gamma'"),
}


def _damaged(bundle_dir: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dir, folder)
    _, mutate = damage
    mutate(folder)
    return folder


@pytest.mark.parametrize("case", list(DAMAGES), ids=list(DAMAGES))
def test_a_damaged_bundle_is_refused_on_load_in_one_line_naming_file_and_key(case, bundle_dir, ct, tmp_path, capfd):
    (name, mutate), message = DAMAGES[case]
    folder = _damaged(bundle_dir, tmp_path, (name, mutate))
    out = tmp_path / "out"
    before, input_before = tree(folder), tree(ct.parent)
    line = refused(["infer", "--model", str(folder), "--input", str(ct), "--output", str(out)], capfd)
    head = f"seg3d infer: error: model bundle {folder}: {name}: "
    assert line.startswith(head), line
    assert re.search(message, line), line
    assert line.endswith(DAMAGED) and len(line) < 400, line
    assert not out.exists(), "nothing is written for a refused bundle"
    assert tree(folder) == before and tree(ct.parent) == input_before


@pytest.mark.parametrize("case", ["zero std", "absurd network", "enormous patch"])
def test_export_refuses_a_damaged_bundle_the_same_way(case, bundle_dir, tmp_path, capfd):
    (name, mutate), _ = DAMAGES[case]
    folder = _damaged(bundle_dir, tmp_path, (name, mutate))
    out = tmp_path / "deploy" / "model.pt"
    line = refused(["export", "--model", str(folder), "--format", "torchscript", "--output", str(out)], capfd)
    assert line.startswith(f"seg3d export: error: model bundle {folder}: {name}: ") and line.endswith(DAMAGED)
    assert not out.parent.exists()


def _weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(folder / WEIGHTS)
    change(state)
    save_file(state, folder / WEIGHTS)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["head.weight"].__setitem__((0, 0), float("nan")), r"tensor 'head\.weight' holds NaN"),
        (lambda s: s["head.weight"].__setitem__((0, 0), float("inf")), r"holds NaN or Inf values"),
        (
            lambda s: s.__setitem__("head.weight", s["head.weight"].to(torch.complex64)),
            r"is torch\.complex64",
        ),
        (lambda s: s.__setitem__("head.weight", s["head.weight"].long()), r"is torch\.int64, the model exp"),
    ],
    ids=["nan", "inf", "complex", "integer"],
)
def test_weights_that_are_not_finite_floats_are_refused(change, message, bundle_dir, ct, tmp_path, capfd):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dir, folder)
    assert "head.weight" in load_file(folder / WEIGHTS), "the tiny network's output convolution"
    _weights(folder, change)
    line = refused(["infer", "--model", str(folder), "--input", str(ct), "--output", str(tmp_path / "out")], capfd)
    assert re.search(message, line) and WEIGHTS in line, line
    assert not (tmp_path / "out").exists()


def _child_peak(argv: list[str]) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in KiB) of `argv` run in a fresh intermediate process, so that the peak is this
    command's alone and not that of an earlier child of the test session (RUSAGE_CHILDREN keeps the maximum)."""
    probe = (
        "import resource, subprocess, sys\n"
        f"done = subprocess.run({argv!r}, capture_output=True, text=True)\n"
        "sys.stderr.write(done.stderr)\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    code, peak = done.stdout.split()
    return int(code), done.stderr, int(peak)


def test_an_absurd_network_is_refused_before_it_takes_memory(bundle_dir, ct, tmp_path):
    """4096 channels on every level is about 3.6 GB of weights: refused from the size of the weights file before the
    network is built, so the command stays at what importing torch and MONAI costs."""
    folder = _damaged(bundle_dir, tmp_path, DAMAGES["absurd network"][0])
    out = tmp_path / "out"
    code, err, peak_kib = _child_peak(
        [SEG3D, "infer", "--model", str(folder), "--input", str(ct), "--output", str(out)]
    )
    assert code == 2 and err.count("\n") == 1 and "describes a network larger than the weights file" in err, err
    assert peak_kib < 1024 * 1024, f"peak {peak_kib / 1024:.0f} MiB"
    assert not out.exists()


# -- bundles written today --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_every_variant_saves_a_bundle_that_loads_unchanged_and_predicts(name, tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.name={name}", *TINY])
    model = create_model(name, out_channels=3, **cfg.model.overrides()).eval()
    folder = save_bundle(tmp_path / "bundle", model, cfg, PRE)
    bundle = load_bundle(folder)
    assert bundle.model.config == model.config and bundle.preprocessing == PRE and bundle.config == cfg
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), model(x))
    assert Predictor.from_bundle(bundle).patch_size == (32, 32, 16)


def test_saving_does_not_move_the_random_state(bundle_dir, tmp_path):
    """save_bundle builds a network to check what it wrote; a training run's random state must not notice."""
    bundle = load_bundle(bundle_dir)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    save_bundle(tmp_path / "again", bundle.model, bundle.config, PRE)
    assert torch.equal(torch.rand(3), expected)


# -- what seg3d train computes and writes --------------------------------------------------------------------------


def test_save_bundle_never_writes_a_bundle_that_would_not_load(bundle_dir, tmp_path):
    """The last line of defence: whatever reached save_bundle, it loads what it wrote before moving it into place;
    the bundle already there stays, and no temporary is left."""
    good = load_bundle(bundle_dir)
    folder = save_bundle(tmp_path / "bundle", good.model, good.config, PRE)
    before = tree(tmp_path)
    bad = Preprocessing(**{**PRE.__dict__, "clip": (40.0, 40.0)})  # a training foreground of one intensity
    with pytest.raises(Seg3dError, match=r"not writing model bundle .*bundle: preprocessing\.json: 'clip' must be"):
        save_bundle(folder, good.model, good.config, bad)
    nan_model = create_model("attention_unet", channels=(4, 8, 16), strides=(2, 2), out_channels=3)
    with torch.no_grad():
        nan_model.head.weight.fill_(float("nan"))  # a run that diverged
    with pytest.raises(Seg3dError, match=r"not writing weights .*holds NaN or Inf values"):
        save_bundle(folder, nan_model, good.config, PRE)
    assert tree(tmp_path) == before


def _constant_foreground_dataset(root: Path) -> Path:
    """Two cases whose organ is one intensity throughout: clip percentiles low == high."""
    import nibabel as nib
    import numpy as np

    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for i in range(2):
        image = np.full((40, 40, 12), -1000, dtype=np.int16)
        image[5:-5, 5:-5, :] = 40
        label = np.zeros(image.shape, dtype=np.uint8)
        label[15:25, 15:25, 3:9] = 1
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), root / folder / f"case_{i}.nii.gz")
    doc = {
        "labels": {"0": "background", "1": "organ"},
        "training": [
            {"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"} for i in range(2)
        ],
    }
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


def test_train_refuses_preprocessing_that_would_not_load_before_any_run_folder(tmp_path, capfd):
    data = _constant_foreground_dataset(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    tiny = {  # (a run of one step, should it not be refused)
        "model": {"channels": [4, 8, 16], "strides": [2, 2]},
        "data": {"patch_size": [16, 16, 8], "num_workers": 0},
        "train": {"epochs": 1, "iterations_per_epoch": 1, "folds": 2},
    }
    config.write_text(yaml.safe_dump(tiny))
    run = tmp_path / "run"
    before = tree(data)
    argv = ["train", "--config", str(config), "--data", str(data), "--output", str(run)]
    line = refused([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], capfd)
    assert f"dataset {data}: the preprocessing computed from its training cases: 'clip' must be" in line, line
    assert "data.intensity.mode=window" in line
    assert not run.exists() and tree(data) == before


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.target_spacing=[0,1,1]", r"'data\.target_spacing\.0': Input should be greater than 0, got 0"),
        ("data.target_spacing=[.nan,1,1]", r"'data\.target_spacing\.0': Input should be a finite number, got nan"),
        ("data.patch_size=[100000,100000,100000]", r"'data\.patch_size': each edge must be a whole number"),
        ("model.channels=[4,8,16,32,100000]", r"'model': channels must each be in 1\.\.4096"),
        ("train.lr=.inf", r"'train\.lr': Input should be a finite number, got inf"),
    ],
)
def test_train_refuses_bad_numbers_on_the_command_line_before_any_run_folder(
    override, message, phantom, tmp_path, capfd
):
    """On a dataset that trains, so that the number is the only thing wrong."""
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: attention_unet\n")
    run = tmp_path / "run"
    before = tree(phantom)
    line = refused(["train", "--config", str(config), "--data", str(phantom), "--output", str(run), override], capfd)
    assert re.search(message, line) and str(config) in line, line
    assert not run.exists() and tree(phantom) == before


# -- YAML anchors and aliases; long values -------------------------------------------------------------------------


def alias_bomb(levels: int = 8) -> str:
    """The issue's config: a valid key whose value is `levels` nested aliases, nine of the level below each. Under
    400 bytes; echoed with repr, eight levels made a 350 MB error line and 1.4 GB of memory."""
    lines = ["experiment:", '  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_config_is_refused_in_one_line_with_little_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert bomb.stat().st_size < 500
    run = tmp_path / "run"
    code, err, peak_kib = _child_peak(
        [SEG3D, "train", "--config", str(bomb), "--data", str(tmp_path), "--output", str(run)]
    )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err[:500]
    assert err.startswith(f"seg3d train: error: {bomb}: line 2: YAML anchors and aliases"), err[:500]
    assert peak_kib < 200 * 1024, f"peak {peak_kib / 1024:.0f} MiB"
    assert not run.exists()


@pytest.mark.parametrize(
    "override",
    ["experiment=&a x", "model.channels=[&c 4, *c, *c]", "data.target_spacing=*s"],
    ids=["anchor", "anchor-and-alias", "alias"],
)
def test_an_override_with_an_anchor_or_alias_is_refused(override, tmp_path, capfd):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: attention_unet\n")
    argv = ["train", "--config", str(config), "--data", str(tmp_path), "--output", str(tmp_path / "run"), override]
    line = refused(argv, capfd)
    assert f"override '{override}': line 1: YAML anchors and aliases" in line, line


def test_a_long_bad_value_is_echoed_cut_short(tmp_path, capfd):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"cache": "x" * 100_000}}))
    argv = ["train", "--config", str(config), "--data", str(tmp_path), "--output", str(tmp_path / "run")]
    line = refused(argv, capfd)
    assert "'data.cache': Input should be 'memory', 'disk' or 'none', got 'xxx" in line and "x...x" in line
    assert len(line) < 300, len(line)
    config.write_text("model:\n  name: attention_unet\n")
    line = refused([*argv, "x" * 100_000 + "=1"], capfd)
    assert "unknown key 'xxxx" in line and len(line) < 400, len(line)


def test_a_long_bad_value_in_a_bundle_is_echoed_cut_short(bundle_dir, ct, tmp_path, capfd):
    folder = _damaged(bundle_dir, tmp_path, _json(PREPROCESSING, _set("intensity_mode", "z" * 100_000)))
    line = refused(["infer", "--model", str(folder), "--input", str(ct), "--output", str(tmp_path / "o")], capfd)
    assert "'intensity_mode' must be one of foreground, window, got 'zzz" in line and len(line) < 400, len(line)
    # A post-processing rule naming a class the model lacks is refused when the Predictor is built (with
    # --no-postprocess the bundle still runs): the name, however long, is echoed cut short too.
    folder = _damaged(bundle_dir, tmp_path / "2", _config(_set_in("postprocess", "inside", {"t" * 100_000: "cancer"})))
    line = refused(["infer", "--model", str(folder), "--input", str(ct), "--output", str(tmp_path / "o")], capfd)
    assert "postprocess.inside names 'ttt" in line and len(line) < 400, len(line)
    assert not (tmp_path / "o").exists()


# -- seg3d export --patch -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch, message",
    [
        ("100000,100000,100000", rf"each edge must be a whole number of voxels in 1\.\.{MAX_PATCH_EDGE}"),
        ("1024,1024,1024", r"is 1,073,741,824 voxels, more than the 33,554,432 allowed in one patch"),
        ("9" * 5000 + ",1,1", r"must be three positive integers X,Y,Z"),
        ("\u00b2,2,2", r"must be three positive integers X,Y,Z"),
    ],
    ids=["huge", "billion-voxels", "5000-digits", "superscript"],
)
def test_export_refuses_an_absurd_patch_in_one_line_and_writes_nothing(patch, message, bundle_dir, tmp_path, capfd):
    out = tmp_path / "deploy" / "model.pt"
    argv = ["export", "--model", str(bundle_dir), "--format", "torchscript", "--output", str(out), "--patch", patch]
    before = tree(bundle_dir)
    line = refused(argv, capfd)
    assert re.search(message, line) and len(line) < 300, line
    assert not out.parent.exists() and tree(bundle_dir) == before


def test_the_patch_bounds_are_generous_for_real_networks():
    """nnU-Net's largest 3D patches (about 320 per edge) and long thin ones stay well inside the bounds."""
    cfg = load_config(None, ["data.patch_size=[320, 320, 320]"])
    assert math.prod(cfg.data.patch_size) == 320**3
    assert load_config(None, ["data.patch_size=[1024, 1024, 16]"]).data.patch_size == (1024, 1024, 16)
