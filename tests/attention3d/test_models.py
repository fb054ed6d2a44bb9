from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from attention3d import AuxOutput, UNetConfig, create_model, list_models, unet_config
from attention3d.models.plugs import CONTEXTS, ContextKind, ContextOutput
from attention3d.models.unet import UNet
from tests.conftest import ROOT

VARIANTS = ["unet", "attention_unet", "danet", "emanet", "se_unet", "nonlocal_unet", "psanet", "pan", "encnet"]

# Parameters that by design receive no gradient: EMANet's EM iterations run without autograd, so the
# conv in front of them only shapes the bases (Li et al. 2019, and the reference code).
NO_GRAD_BY_DESIGN = {"emanet": ("conv_in.",)}


def _loss(out, num_classes: int = 3) -> torch.Tensor:
    """Sum of a cross-entropy on every spatial output plus a BCE on class-presence logits."""
    outs = out if isinstance(out, list) else [out]
    target = torch.randint(
        0, num_classes, (outs[0].shape[0], *outs[0].shape[2:]), generator=torch.Generator().manual_seed(0)
    )
    loss = 0.0
    for o in outs:
        if o.ndim == 2:
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(o, torch.ones_like(o))
        else:
            loss = loss + torch.nn.functional.cross_entropy(o, target)
    return loss


def test_registry_lists_every_variant():
    assert list_models() == sorted(VARIANTS)


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*attention_unet.*unet"):
        create_model("nope")


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match=r"unknown U-Net option\(s\) \['chanels'\]"):
        create_model("unet", chanels=(8, 16))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"strides": (2, 2)}, "strides needs one entry per downsampling"),
        ({"skip": "gates"}, "skip must be one of"),
        ({"context": "pam"}, "context must be one of"),
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),
        ({"deep_supervision": 4}, "deep_supervision must be in 0..3"),
    ],
)
def test_invalid_config_is_a_clear_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        create_model("unet", **bad)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 1, 32, 32, 32), (2, 1, 48, 64, 40)])
def test_every_model_forward_backward(name, shape):
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=3, in_channels=1, out_channels=3)
    x = torch.randn(shape)

    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (shape[0], 3, *shape[2:])
    assert torch.isfinite(logits).all()

    model.train()
    out = model(x)
    if model.has_aux:
        assert isinstance(out, list) and len(out) == len(model.output_names)
        assert out[0].shape == logits.shape
        for o, aux in zip(out[1:], model.aux_outputs):
            expected = (shape[0], 3, *shape[2:]) if aux.spatial else (shape[0], 3)
            assert o.shape == expected, aux.name
    else:
        assert isinstance(out, torch.Tensor)
    _loss(out).backward()

    skipped = NO_GRAD_BY_DESIGN.get(name, ())
    for pname, p in model.named_parameters():
        by_design = any(part in pname for part in skipped)
        if by_design:
            assert p.grad is None, f"{pname} should get no gradient by design"
        else:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", VARIANTS)
def test_every_model_in_2d(name):
    model = create_model(name, spatial_dims=2, channels=(8, 16, 32), strides=(2, 2)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 36, 28))
    assert out.shape == (2, 3, 36, 28)
    assert torch.isfinite(out).all()


def test_padding_equals_explicit_pad_then_crop():
    """A size that is not a multiple of the total stride behaves as if zero-padded at the far end and cropped."""
    torch.manual_seed(0)
    model = create_model("attention_unet", channels=(4, 8, 16), strides=(2, 2)).eval()
    x = torch.randn(1, 1, 13, 18, 10)
    padded = torch.zeros(1, 1, 16, 20, 12)
    padded[:, :, :13, :18, :10] = x
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[:, :, :13, :18, :10])


def test_attention_gates_are_returned_per_level():
    torch.manual_seed(0)
    model = create_model("attention_unet", channels=(4, 8, 16, 32), strides=(2, 2, 2)).eval()
    x = torch.randn(1, 1, 24, 32, 20)
    with torch.no_grad():
        logits, gates = model(x, return_gates=True)
    assert logits.shape == (1, 3, 24, 32, 20)
    assert len(gates) == 3
    for alpha in gates:
        assert alpha.shape == (1, 1, 24, 32, 20)
        assert 0.0 <= float(alpha.min()) and float(alpha.max()) <= 1.0
    # The gates differ per level (each has its own weights and gating signal).
    assert not torch.allclose(gates[0], gates[1])
    _, none = create_model("unet", channels=(4, 8), strides=(2,)).eval()(torch.randn(1, 1, 8, 8, 8), return_gates=True)
    assert none == []


def test_gates_scale_the_skip_features():
    """Forcing every gate to alpha = 0 must change the output: the skip really passes through the gate."""
    torch.manual_seed(0)
    model = create_model("attention_unet", channels=(4, 8, 16), strides=(2, 2)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = model(x)
        for gate in model.skips:
            gate.psi.weight.zero_()
            gate.psi.bias.fill_(-1e4)  # alpha = sigmoid(-1e4) = 0 everywhere
        after = model(x)
        _, gates = model(x, return_gates=True)
    assert all(float(g.max()) == 0.0 for g in gates)
    assert not torch.allclose(before, after)


def test_deep_supervision_outputs_in_train_mode_only():
    model = create_model("unet", channels=(4, 8, 16, 32), strides=(2, 2, 2), deep_supervision=2)
    assert model.output_names == ["logits", "ds1", "ds2"]
    x = torch.randn(1, 1, 16, 24, 16)
    out = model.train()(x)
    assert [o.shape for o in out] == [(1, 3, 16, 24, 16)] * 3
    assert isinstance(model.eval()(x), torch.Tensor)


def test_anisotropic_strides_with_gates():
    model = create_model("attention_unet", channels=(4, 8, 16, 32), strides=((2, 2, 1), (2, 2, 1), (2, 2, 2))).eval()
    assert model.config.total_stride() == (8, 8, 2)
    with torch.no_grad():
        out, gates = model(torch.randn(1, 1, 40, 40, 6), return_gates=True)
    assert out.shape == (1, 3, 40, 40, 6)
    assert all(g.shape == (1, 1, 40, 40, 6) for g in gates)


def test_context_at_two_levels_names_its_aux_outputs():
    model = create_model("danet", channels=(4, 8, 16, 32), strides=(2, 2, 2), context_levels=2)
    assert model.output_names == ["logits", "pam2", "cam2", "pam3", "cam3"]


def test_wrong_input_channels_is_a_value_error():
    model = create_model("unet", channels=(4, 8), strides=(2,))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, 3 spatial axes\)"):
        model(torch.randn(1, 2, 8, 8, 8))


def test_config_round_trips_through_a_dict():
    from dataclasses import asdict

    model = create_model("psanet", channels=(4, 8, 16), strides=(2, 2), context_kwargs={"grid": 4})
    rebuilt = UNet(UNetConfig.from_kwargs(**asdict(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), rebuilt.eval()(x))


CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("study"))  # training configs


def test_there_is_a_config_per_variant_and_a_demo():
    names = {p.stem for p in CONFIGS}
    assert set(VARIANTS) | {"demo"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_builds_and_runs(path):
    spec = yaml.safe_load(path.read_text())["model"]
    model = create_model(spec.pop("name"), **spec).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)


# Key -> shape of every state_dict entry of the nine variants (and of a few non-default builds) as the U-Net built
# them when the plug points were chosen by if/elif on the kind name: bundles trained then must keep loading.
LAYOUTS = json.loads((Path(__file__).parent / "state_dict_layouts.json").read_text())


def test_the_layouts_cover_every_variant():
    assert {spec["model"] for spec in LAYOUTS.values()} == set(VARIANTS)


@pytest.mark.parametrize("key", sorted(LAYOUTS))
def test_earlier_state_dicts_load_into_todays_model(key):
    spec = LAYOUTS[key]
    model = create_model(spec["model"], **spec["options"])
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert list(shapes) == list(spec["state_dict"]), "the same parameter and buffer names, in the same order"
    assert shapes == spec["state_dict"]
    earlier = {name: torch.full(shape, 0.25) for name, shape in spec["state_dict"].items()}
    model.load_state_dict(earlier, strict=True)
    assert all(bool((t == 0.25).all()) for t in model.state_dict().values() if t.is_floating_point())


def test_aux_outputs_declare_their_kind_level_and_source():
    model = create_model("danet", channels=(4, 8, 16, 32), strides=(2, 2, 2), context_levels=2, deep_supervision=1)
    assert model.aux_outputs == [
        AuxOutput("ds1", "deep_supervision", 1),
        AuxOutput("pam2", "branch_logits", 2, "pam"),
        AuxOutput("cam2", "branch_logits", 2, "cam"),
        AuxOutput("pam3", "branch_logits", 3, "pam"),
        AuxOutput("cam3", "branch_logits", 3, "cam"),
    ]
    assert model.output_names == ["logits", *(a.name for a in model.aux_outputs)]
    assert create_model("encnet", channels=(4, 8), strides=(2,)).aux_outputs == [
        AuxOutput("se1", "class_presence", 1, "se")
    ]
    assert not create_model("psanet", channels=(4, 8), strides=(2,)).aux_outputs
    with pytest.raises(ValueError, match="kind must be one of"):
        AuxOutput("x1", "logits", 1)


class _ToyContext(nn.Module):
    """A context module with one branch of features and one class-presence output, as a table entry sees it."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, scale: float = 1.0):
        super().__init__()
        self.mix = (
            nn.Conv3d(in_channels, in_channels, 1) if spatial_dims == 3 else nn.Conv2d(in_channels, in_channels, 1)
        )
        self.presence = nn.Linear(in_channels, num_classes)
        self.scale = scale

    def forward(self, x):
        y = self.mix(x) * self.scale
        return y, y, self.presence(y.flatten(2).mean(-1))


def test_a_new_context_module_is_one_table_entry(monkeypatch):
    entry = ContextKind(
        _ToyContext,
        lambda cfg, channels: {
            "spatial_dims": cfg.spatial_dims,
            "in_channels": channels,
            "num_classes": cfg.out_channels,
        },
        outputs=(ContextOutput("toy", "branch_logits", head=True), ContextOutput("hit", "class_presence")),
    )
    monkeypatch.setitem(CONTEXTS, "toy", entry)
    model = create_model("unet", channels=(4, 8, 16), strides=(2, 2), context="toy", context_kwargs={"scale": 2.0})
    assert model.contexts["2"].module.scale == 2.0
    assert set(model.contexts["2"].aux_heads) == {"toy"}
    assert model.aux_outputs == [
        AuxOutput("toy2", "branch_logits", 2, "toy"),
        AuxOutput("hit2", "class_presence", 2, "hit"),
    ]
    out = model.train()(torch.randn(2, 1, 12, 16, 8))
    assert [tuple(o.shape) for o in out] == [(2, 3, 12, 16, 8), (2, 3, 12, 16, 8), (2, 3)]
    with pytest.raises(
        ValueError, match=r"\['scal'\] are not options of context 'toy' \(_ToyContext\); valid options: scale"
    ):
        create_model("unet", channels=(4, 8), strides=(2,), context="toy", context_kwargs={"scal": 2.0})


def test_context_kwargs_are_checked_against_the_layer():
    with pytest.raises(
        ValueError, match=r"\['grdi'\] are not options of context 'psa' .*valid options: inter_channels, grid"
    ):
        create_model("psanet", context_kwargs={"grdi": 4})
    with pytest.raises(ValueError, match="valid options: reduction, act, dropout"):
        create_model("danet", context_kwargs={"norm": "batch"})  # the U-Net wires the norm itself
    with pytest.raises(ValueError, match="set without a context"):
        create_model("unet", context_kwargs={"grid": 4})
    assert create_model(
        "encnet", channels=(4, 8), strides=(2,), context_kwargs={"norm": "instance"}
    ).config.context_kwargs


@pytest.mark.parametrize("name", VARIANTS)
def test_unet_config_is_what_create_model_builds(name):
    options = {"channels": (4, 8, 16), "strides": (2, (2, 2, 1)), "deep_supervision": 1}
    assert unet_config(name, **options) == create_model(name, **options).config
    with pytest.raises(ValueError, match=r"unknown model 'nope'; valid models: attention_unet"):
        unet_config("nope")
