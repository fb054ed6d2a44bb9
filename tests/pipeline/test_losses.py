from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from attention3d import AuxOutput, create_model, se_loss
from attention3d.models.plugs import CONTEXTS, ContextKind, ContextOutput
from pipeline.config import load_config
from pipeline.losses import SegLoss

WEIGHTS = ["loss.pam=0.3", "loss.cam=0.7", "loss.se=0.25", "loss.deep_supervision=0.4"]


def test_loss_adds_each_auxiliary_with_its_weight():
    """The DANet loss is DiceCE(main) + w_pam DiceCE(pam) + w_cam DiceCE(cam); EncNet adds w_se SE-loss."""
    cfg = load_config(None, ["loss.pam=0.3", "loss.cam=0.7", "loss.se=0.25", "loss.deep_supervision=0.5"])
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))
    outs = [torch.randn(2, 3, 8, 8, 8) for _ in range(3)]
    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    pam, cam = AuxOutput("pam4", "branch_logits", 4, "pam"), AuxOutput("cam4", "branch_logits", 4, "cam")
    got = SegLoss(cfg, [pam, cam], 3)(outs, label)
    want = dice_ce(outs[0], label) + 0.3 * dice_ce(outs[1], label) + 0.7 * dice_ce(outs[2], label)
    torch.testing.assert_close(got, want)
    se = torch.randn(2, 3)
    ds = [AuxOutput("ds1", "deep_supervision", 1), AuxOutput("ds2", "deep_supervision", 2)]
    got = SegLoss(cfg, [*ds, AuxOutput("se4", "class_presence", 4, "se")], 3)([*outs, se], label)
    want = dice_ce(outs[0], label) + 0.5 * dice_ce(outs[1], label) + 0.25 * dice_ce(outs[2], label)
    torch.testing.assert_close(got, want + 0.25 * se_loss(se, label, 3))


def _dc(out, label):
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)(out, label)


def _se(out, label):
    return se_loss(out, label, 3)


# Each aux-producing variant, its train-mode outputs, and the loss written out term by term (weights of WEIGHTS:
# pam 0.3, cam 0.7, se 0.25, deep supervision 0.4 ** level), as the loss computed it when it read the names.
FOUR = {"channels": (4, 8, 16, 32), "strides": (2, 2, 2)}
CASES = [
    ("danet", {}, ["logits", "pam3", "cam3"], lambda o, y: _dc(o[0], y) + 0.3 * _dc(o[1], y) + 0.7 * _dc(o[2], y)),
    ("encnet", {}, ["logits", "se3"], lambda o, y: _dc(o[0], y) + 0.25 * _se(o[1], y)),
    (
        "unet",
        {"deep_supervision": 2},
        ["logits", "ds1", "ds2"],
        lambda o, y: _dc(o[0], y) + 0.4 * _dc(o[1], y) + 0.16 * _dc(o[2], y),
    ),
    (
        "danet",
        {"deep_supervision": 1, "context_levels": 2},
        ["logits", "ds1", "pam2", "cam2", "pam3", "cam3"],
        lambda o, y: (
            _dc(o[0], y)
            + 0.4 * _dc(o[1], y)
            + 0.3 * _dc(o[2], y)
            + 0.7 * _dc(o[3], y)
            + 0.3 * _dc(o[4], y)
            + 0.7 * _dc(o[5], y)
        ),
    ),
    (
        "encnet",
        {"deep_supervision": 2, "context_levels": 2},
        ["logits", "ds1", "ds2", "se2", "se3"],
        lambda o, y: (
            _dc(o[0], y) + 0.4 * _dc(o[1], y) + 0.16 * _dc(o[2], y) + 0.25 * _se(o[3], y) + 0.25 * _se(o[4], y)
        ),
    ),
]


@pytest.mark.parametrize(("name", "options", "names", "formula"), CASES, ids=[" ".join(c[2][1:]) for c in CASES])
def test_every_aux_variant_loss_equals_the_written_out_formula(name, options, names, formula):
    cfg = load_config(None, WEIGHTS)
    torch.manual_seed(0)
    model = create_model(name, out_channels=3, **FOUR, **options).train()
    assert model.output_names == names
    x = torch.randn(2, 1, 16, 16, 16)
    label = torch.randint(0, 3, (2, 1, 16, 16, 16))
    outs = model(x)
    got = SegLoss(cfg, model.aux_outputs, 3)(outs, label)
    torch.testing.assert_close(got, formula(outs, label))


def test_a_zero_weight_drops_its_term_and_a_wrong_output_count_is_refused():
    cfg = load_config(None, ["loss.pam=0", "loss.cam=0.7"])
    torch.manual_seed(0)
    label = torch.randint(0, 3, (1, 1, 8, 8, 8))
    outs = [torch.randn(1, 3, 8, 8, 8) for _ in range(3)]
    aux = [AuxOutput("pam4", "branch_logits", 4, "pam"), AuxOutput("cam4", "branch_logits", 4, "cam")]
    loss = SegLoss(cfg, aux, 3)
    assert loss.weights == [0.0, 0.7]
    torch.testing.assert_close(loss(outs, label), _dc(outs[0], label) + 0.7 * _dc(outs[2], label))
    with pytest.raises(ValueError, match=r"the logits and 2 auxiliary output\(s\), got 2"):
        loss(outs[:2], label)


def test_a_branch_without_a_loss_weight_is_named():
    with pytest.raises(ValueError, match="no loss weight for branch 'psa' of 'psa4': add the key 'psa' to the loss"):
        SegLoss(load_config(None), [AuxOutput("psa4", "branch_logits", 4, "psa")], 3)


class _PresenceContext(nn.Module):
    """A context module that only a table entry knows: features plus one class-presence output."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.presence = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return x, self.presence(x.flatten(2).mean(-1))


def test_a_new_context_module_gets_its_loss_term_by_kind(monkeypatch):
    entry = ContextKind(
        _PresenceContext,
        lambda cfg, channels: {"in_channels": channels, "num_classes": cfg.out_channels},
        outputs=(ContextOutput("hit", "class_presence"),),
    )
    monkeypatch.setitem(CONTEXTS, "presence", entry)
    torch.manual_seed(0)
    model = create_model("unet", out_channels=3, context="presence", **FOUR).train()
    outs = model(torch.randn(2, 1, 16, 16, 16))
    label = torch.randint(0, 3, (2, 1, 16, 16, 16))
    got = SegLoss(load_config(None, WEIGHTS), model.aux_outputs, 3)(outs, label)
    torch.testing.assert_close(got, _dc(outs[0], label) + 0.25 * _se(outs[1], label))
