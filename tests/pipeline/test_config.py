from __future__ import annotations

import pytest
import torch

from attention3d import create_model, list_models
from pipeline.cli import main
from pipeline.config import Config, load_config, save_config
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
        ["train.epochs=3", "data.target_spacing=null", "data.intensity.window=[-100, 200]", "model.channels=[4,8]"],
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
