from __future__ import annotations

from dataclasses import fields

import pytest
import torch
import yaml

from attention3d import UNetConfig, create_model, list_models
from pipeline.cli import main
from pipeline.config import Config, ModelConfig, load_config, save_config
from pipeline.errors import Seg3dError
from tests.conftest import ROOT

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("study"))  # training configs


def test_there_is_a_config_per_variant_and_a_demo():
    assert {p.stem for p in CONFIGS} >= set(list_models()) | {"demo"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_builds(path):
    cfg = load_config(path)
    model = create_model(cfg.model.name, in_channels=1, out_channels=3, **cfg.model.overrides()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32, 16))
    assert out.shape == (1, 3, 32, 32, 16)
    # The variant's own attention survives the config: a config that fixed nothing would build a plain U-Net.
    assert model.config.skip == create_model(cfg.model.name).config.skip
    assert model.config.context == create_model(cfg.model.name).config.context


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown key 'train.epoch'; valid keys here: epochs,"),
        ("trian.epochs=3", "unknown key 'trian'"),
        ("train.epochs=three", "'train.epochs': Input should be a valid integer"),
        ("train.lr=-1", "'train.lr': Input should be greater than 0"),
        ("model.name=unet3", "'model.name': unknown model 'unet3'; valid models: attention_unet"),
        ("data.patch_size=[64,64]", "'data.patch_size' has the wrong number of values"),
        ("train.fold=5", "fold must be in 0..4"),
        ("data.cache=ram", "'data.cache': Input should be 'memory', 'disk' or 'none'"),
        ("train.epochs", "is not key=value"),
        ("model.context=foo", "'model': context must be one of (None, 'dual', 'em',"),
        ("model.in_channels=2", "unknown key 'model.in_channels'; valid keys here: name, channels, strides,"),
        ("model.channels=[4,8]", "'model': strides needs one entry per downsampling (1), got 3"),
        ("model.kernel_size=three", "'model.kernel_size': Input should be a valid integer"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(Seg3dError) as err:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    text = str(err.value)
    assert message in text and "\n" not in text


def test_overrides_are_yaml_values_and_reach_nested_sections():
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            "train.epochs=3",
            "data.target_spacing=null",
            "data.intensity.window=[-100, 200]",
            "model.channels=[4,8]",
            "model.strides=[2]",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.data.target_spacing is None
    assert cfg.data.intensity.window == (-100.0, 200.0)
    assert cfg.model.overrides()["channels"] == [4, 8]
    assert "deep_supervision" not in cfg.model.overrides(), "unset options must fall back to the variant's defaults"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "danet.yaml", ["train.lr=0.0003"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.train.lr == 3e-4


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == Config() and cfg.registry_name == "seg3d-attention_unet"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(Seg3dError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1, 2\n")
    with pytest.raises(Seg3dError, match="not valid YAML at line"):
        load_config(bad)


def test_cli_train_with_an_unknown_key_is_one_line_and_exit_2(tmp_path, capsys):
    config = str(ROOT / "configs" / "demo.yaml")
    out = str(tmp_path / "r")
    code = main(["train", "--config", config, "--data", str(tmp_path), "--output", out, "train.epoch=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("seg3d train: error:") and "train.epoch" in err[0]
    assert not (tmp_path / "r").exists(), "nothing is written for a config error"


def test_the_model_section_has_every_unet_option_but_those_the_data_fixes():
    unet_options = {f.name for f in fields(UNetConfig)} - {"spatial_dims", "in_channels", "out_channels"}
    assert set(ModelConfig.model_fields) == unet_options | {"name"}
    assert {"act", "norm", "context_kwargs"} <= set(ModelConfig.model_fields)


def test_norm_and_act_with_arguments_from_yaml_reach_the_network(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n"
        "  name: danet\n"
        "  channels: [4, 8, 16]\n"
        "  strides: [2, [2, 2, 1]]\n"
        "  norm: [group, {num_groups: 2}]\n"
        "  act: [prelu, {init: 0.3}]\n"
        "  context_kwargs: {reduction: 2}\n"
    )
    cfg = load_config(path)
    model = create_model(cfg.model.name, in_channels=1, out_channels=3, **cfg.model.overrides())
    assert model.config.norm == ("group", {"num_groups": 2}) and model.config.act == ("prelu", {"init": 0.3})
    groups = [m for m in model.encoders.modules() if isinstance(m, torch.nn.GroupNorm)]
    preluses = [m for m in model.encoders.modules() if isinstance(m, torch.nn.PReLU)]
    assert groups and all(m.num_groups == 2 for m in groups)
    assert preluses and all(torch.allclose(m.weight, torch.tensor(0.3)) for m in preluses)
    assert model.contexts["2"].module.pam.qk_channels == 2  # context_kwargs reached the layer
    assert model.config.strides == (2, (2, 2, 1))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.skip=gates"], "'model': skip must be one of (None, 'gate', 'gau'), got 'gates'"),
        (["model.recalibration=cse"], "'model': recalibration must be one of"),
        (["model.deep_supervision=3"], "'model': deep_supervision must be in 0..2"),
        (["model.name=psanet", "model.context_kwargs={grdi: 4}"], "['grdi'] are not options of context 'psa'"),
        (["model.context_kwargs={grid: 4}"], "context_kwargs {'grid': 4} set without a context"),
        (["model.strides=[2, 2, [2, 2]]"], "'model': stride (2, 2) needs one entry per spatial axis (3)"),
    ],
)
def test_a_bad_model_value_is_refused_at_load_not_at_build(overrides, message):
    with pytest.raises(Seg3dError) as err:
        load_config(ROOT / "configs" / "demo.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_resolved_config_with_every_model_key_rebuilds_the_same_network(tmp_path):
    cfg = load_config(ROOT / "configs" / "psanet.yaml", ["model.channels=[4, 8, 16]", "model.strides=[2, 2]"])
    save_config(cfg, tmp_path / "c.yaml")
    written = yaml.safe_load((tmp_path / "c.yaml").read_text())["model"]
    assert set(written) == set(ModelConfig.model_fields), "the resolved config writes every key, null included"
    again = load_config(tmp_path / "c.yaml")
    assert again.model.overrides() == cfg.model.overrides()
    one = create_model(cfg.model.name, **cfg.model.overrides())
    two = create_model(again.model.name, **again.model.overrides())
    assert one.config == two.config and one.config.context == "psa" and one.config.context_kwargs == {"grid": 6}


def test_a_bundle_config_written_before_act_existed_still_loads(tmp_path):
    """config.yaml of bundles written by earlier versions: the old model keys, unset ones as null, no `act`."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "model:\n"
        "  name: encnet\n"
        "  channels: [4, 8, 16]\n"
        "  strides: [2, 2]\n"
        "  kernel_size: null\n"
        "  norm: batch\n"
        "  dropout: null\n"
        "  skip: null\n"
        "  context: null\n"
        "  context_levels: 1\n"
        "  context_kwargs: {codewords: 8}\n"
        "  recalibration: null\n"
        "  deep_supervision: null\n"
    )
    cfg = load_config(path)
    assert cfg.model.overrides() == {
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "norm": "batch",
        "context_levels": 1,
        "context_kwargs": {"codewords": 8},
    }
    model = create_model(cfg.model.name, **cfg.model.overrides())
    assert model.config.context == "encoding" and model.contexts["2"].module.codewords.shape[0] == 8


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.patch_size=[0,64,64]", "'data.patch_size': each edge must be a whole number of voxels in 1..1024"),
        ("data.patch_size=[2048,64,64]", "'data.patch_size': each edge must be a whole number of voxels in 1..1024"),
        ("data.patch_size=[1024,1024,64]", "is 67,108,864 voxels, more than the 33,554,432 allowed in one patch"),
        ("data.target_spacing=[0,1,1]", "'data.target_spacing.0': Input should be greater than 0, got 0"),
        ("data.target_spacing=[1,-1,1]", "'data.target_spacing.1': Input should be greater than 0, got -1"),
        ("data.target_spacing=[1,1,.nan]", "'data.target_spacing.2': Input should be a finite number, got nan"),
        ("data.body_threshold_hu=.inf", "'data.body_threshold_hu': Input should be a finite number, got inf"),
        ("data.intensity.window=[.nan, 240]", "'data.intensity.window.0': Input should be a finite number"),
        ("data.class_ratios=[0, 0, 0]", "class_ratios must be non-negative with a positive sum, got [0.0, 0.0, 0.0]"),
        ("model.channels=[4,8,16,5000]", "'model': channels must each be in 1..4096, got (4, 8, 16, 5000)"),
        ("model.channels=[0,8,16,32]", "'model': channels must each be in 1..4096"),
        ("model.strides=[0,2,2]", "'model': strides must each be in 1..8, got (0, 2, 2)"),
        ("model.kernel_size=-1", "'model': kernel_size must be odd and in 1..9, got -1"),
        ("model.dropout=1.0", "'model': dropout must be in [0, 1), got 1.0"),
        ("model.dropout=.nan", "'model.dropout': Input should be a finite number, got nan"),
        ("model.norm=nonsense", "'model': norm 'nonsense' is not a MONAI norm layer (Unsupported option 'NONSENSE'"),
        ("model.act=[relu, 5]", "'model': act ('relu', 5) is not a MONAI act layer (Layer specifiers must be"),
    ],
)
def test_numbers_training_cannot_use_are_refused_naming_the_key(override, message):
    with pytest.raises(Seg3dError) as err:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "experiment: &e x\nregistered_model: *e\n",
            ": line 1: YAML anchors and aliases (&name, *name) are not accepted",
        ),
        ("data:\n  patch_size: &p [32, 32, 16]\n", ": line 2: YAML anchors and aliases"),
        ("base: &b {epochs: 2}\ntrain:\n  <<: *b\n", ": line 1: YAML anchors and aliases"),
        ("train:\n  epochs: " + "9" * 5000 + "\n", ": a value cannot be read (Exceeds the limit (4300 digits)"),
        ("train: " + "[" * 5000 + "\n", ": nested too deeply to be a seg3d config"),
        ("train:\n  epochs: 2\x00\n", ": not YAML text (control character at offset 18)"),
        ("- train\n- data\n", ": a config is a mapping of sections"),
    ],
    ids=["alias", "anchor", "merge-key", "5000-digits", "deep", "control-character", "list"],
)
def test_hostile_yaml_is_refused_in_one_line_naming_the_file(text, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(Seg3dError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}{message}") and "\n" not in str(err.value), str(err.value)


def test_a_config_file_is_read_only_up_to_a_bound_and_as_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("experiment: x\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(Seg3dError, match=r"c\.yaml: larger than 1024 KiB"):
        load_config(path)
    path.write_bytes(b"experiment: \xff\xfe\n")
    with pytest.raises(Seg3dError, match=r"c\.yaml: not UTF-8 text \(byte 12\)"):
        load_config(path)


def test_overrides_refuse_anchors_and_keep_text_that_is_not_yaml():
    with pytest.raises(Seg3dError, match=r"^override 'experiment=&a x': line 1: YAML anchors and aliases"):
        load_config(None, ["experiment=&a x"])
    assert load_config(None, ["experiment=a: [b"]).experiment == "a: [b"  # not YAML: taken as the text it is
    assert load_config(None, ["experiment='*a'"]).experiment == "*a"  # quoted, a star is text


def test_echoed_values_and_keys_are_cut_short():
    for override in (
        "data.cache=" + "y" * 100_000,
        "train." + "k" * 100_000 + "=1",
        "experiment=" + "[" * 100 + "]" * 100,
    ):
        with pytest.raises(Seg3dError) as err:
            load_config(None, [override])
        assert len(str(err.value)) < 400, len(str(err.value))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_the_resolved_config_a_run_and_a_bundle_store_loads_again(path, tmp_path):
    """Anchors are refused on reading, so what seg3d writes must have none (model_dump builds fresh containers)."""
    cfg = load_config(path, ["data.intensity.window=[-100, 200]", "data.intensity.percentiles=[1, 99]"])
    save_config(cfg, tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert "&" not in text and "*" not in text
    assert load_config(tmp_path / "c.yaml") == cfg
