"""The training loss: DiceCE on the main logits plus one term per auxiliary output, chosen by its declared kind."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss
from torch import nn

from attention3d import AuxOutput, se_loss
from pipeline.config import Config, LossConfig


def aux_weight(aux: AuxOutput, lc: LossConfig) -> float:
    """The weight of one auxiliary term: deep supervision at level i weighs deep_supervision ** i (nnU-Net), branch
    logits the loss key named after their branch (pam, cam), class presence the SE-loss weight se."""
    if aux.kind == "deep_supervision":
        return lc.deep_supervision**aux.level
    if aux.kind == "branch_logits":
        if aux.source not in type(lc).model_fields:
            raise ValueError(
                f"no loss weight for branch {aux.source!r} of {aux.name!r}: add the key {aux.source!r} to the loss "
                "section (pipeline.config.LossConfig)"
            )
        return getattr(lc, aux.source)
    if aux.kind == "class_presence":
        return lc.se
    raise ValueError(f"no loss for auxiliary output {aux.name!r} of kind {aux.kind!r}")


class SegLoss(nn.Module):
    """DiceCE on the main logits plus the model's auxiliaries (`model.aux_outputs`): DiceCE on every spatial
    output (deep supervision, branch logits), the SE-loss of EncNet (Zhang et al. 2018, Sec. 3.2) on class
    presence, each with the weight `aux_weight` gives it."""

    def __init__(self, cfg: Config, aux_outputs: Sequence[AuxOutput], num_classes: int):
        super().__init__()
        lc = cfg.loss
        self.dice_ce = DiceCELoss(
            include_background=False,
            to_onehot_y=True,
            softmax=True,
            batch=lc.batch_dice,
            lambda_dice=lc.dice_weight,
            lambda_ce=lc.ce_weight,
        )
        self.aux_outputs = list(aux_outputs)
        self.num_classes = num_classes
        self.weights = [aux_weight(aux, lc) for aux in self.aux_outputs]

    def forward(self, outputs, label: torch.Tensor) -> torch.Tensor:
        outs = outputs if isinstance(outputs, list) else [outputs]
        if len(outs) != 1 + len(self.aux_outputs):
            raise ValueError(f"expected the logits and {len(self.aux_outputs)} auxiliary output(s), got {len(outs)}")
        loss = self.dice_ce(outs[0].float(), label)
        for aux, w, out in zip(self.aux_outputs, self.weights, outs[1:]):
            if w == 0:
                continue
            if aux.spatial:
                loss = loss + w * self.dice_ce(out.float(), label)
            else:
                loss = loss + w * se_loss(out.float(), label, self.num_classes)
        return loss
