"""The optimiser and its learning-rate schedule, from `cfg.train`.

Weight decay pulls a parameter towards zero. That regularises the weights of convolutions and linear layers (rank
>= 2), but on a bias, a norm's scale and shift, or a learned scalar such as DANet's PAM/CAM gamma (which starts at 0
and must grow for its branch to act at all) it only fights the fit. So, as is standard (timm's
`param_groups_weight_decay` splits the same way), the parameters form two groups: rank >= 2 with
`train.weight_decay`, everything else with none. AdamW's decay is decoupled from the gradient step (Loshchilov &
Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, Algorithm 2 line 12); SGD's is added to the gradient.

Schedules are per optimiser step (train.epochs * train.iterations_per_epoch steps in all): poly,
lr_t = lr * (1 - t / T) ** poly_power (nnU-Net); cosine annealing to 0; or constant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Config


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The parameters as two groups: rank >= 2 decayed by `weight_decay`, the rest not decayed."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(
    cfg: Config, model: nn.Module, total_steps: int, *, like: dict[str, Any] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and schedule for `total_steps` steps.

    `like` is an optimiser state a checkpoint holds. A state with a single parameter group comes from a run started
    before norms, biases and gammas were exempt from decay; that run gets its one-group optimiser back, so that it
    resumes exactly as it began and its state loads."""
    t = cfg.train
    if like is not None and len(like["param_groups"]) == 1:
        groups: Any = [{"params": list(model.parameters()), "weight_decay": t.weight_decay}]
    else:
        groups = decay_groups(model, t.weight_decay)
    if t.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=t.lr)
    if t.schedule == "poly":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.PolynomialLR(
            opt, total_iters=total_steps, power=t.poly_power
        )
    elif t.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    return opt, sched
