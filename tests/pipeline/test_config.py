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

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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
