"""The optimiser: weight decay on the weights of rank >= 2 only, and the one-group optimiser of older runs."""

from __future__ import annotations

import pytest
import torch

from attention3d import create_model
from pipeline.config import load_config
from pipeline.optimizer import build_optimizer

LR, DECAY, MOMENTUM = 0.1, 0.5, 0.99


def _danet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("danet", channels=(4, 8, 16), strides=(2, 2), out_channels=3, norm="batch")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.5)  # PAM/CAM start at 0, which decay would leave at 0 anyway
    return model


def _cfg(optimizer: str):
    overrides = [
        f"train.lr={LR}",
        f"train.weight_decay={DECAY}",
        f"train.momentum={MOMENTUM}",
        "train.schedule=constant",
    ]
    return load_config(None, [f"train.optimizer={optimizer}", *overrides])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_decay_shrinks_conv_weights_and_leaves_biases_norms_and_gammas(optimizer):
    """One step with zero gradients, so that decay alone moves a parameter: AdamW's decoupled decay scales a weight
    by 1 - lr * wd; SGD's decay is a gradient wd * w, which Nesterov momentum takes (1 + momentum) times on the first
    step. A bias, a norm's weight or DANet's gamma must not move at all."""
    model = _danet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, _ = build_optimizer(_cfg(optimizer), model, total_steps=10)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()

    params = dict(model.named_parameters())
    flat = [n for n, p in params.items() if p.ndim < 2]
    assert {"contexts.2.module.pam.gamma", "contexts.2.module.cam.gamma", "head.bias"} <= set(flat)
    assert any(".norm1.weight" in n for n in flat)
    for name in flat:
        assert torch.equal(params[name], before[name]), f"{name} was decayed"
    factor = 1 - LR * DECAY if optimizer == "adamw" else 1 - LR * DECAY * (1 + MOMENTUM)
    weights = [n for n, p in params.items() if p.ndim >= 2]
    assert len(weights) > 10
    for name in weights:
        torch.testing.assert_close(params[name], before[name] * factor, msg=f"{name} was not decayed")


def test_the_groups_split_the_parameters_by_rank():
    model = _danet()
    opt, _ = build_optimizer(_cfg("adamw"), model, total_steps=10)
    decayed, kept = opt.param_groups
    assert (decayed["weight_decay"], kept["weight_decay"]) == (DECAY, 0.0)
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters() if p.ndim >= 2}
    assert {id(p) for p in kept["params"]} == {id(p) for p in model.parameters() if p.ndim < 2}


def test_a_checkpoint_of_a_one_group_optimiser_gets_that_optimiser_back():
    """A run started before the fix saved one group that decays everything; it resumes with the same optimiser
    (its state loads, its decay stays), while a fresh run's two groups could not load that state."""
    model = _danet()
    old = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=DECAY)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    saved = old.state_dict()

    opt, sched = build_optimizer(_cfg("adamw"), model, total_steps=10, like=saved)
    opt.load_state_dict(saved)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == DECAY
    assert torch.equal(opt.state[next(model.parameters())]["exp_avg"], old.state[next(model.parameters())]["exp_avg"])
    assert len(sched.get_last_lr()) == 1

    fresh, _ = build_optimizer(_cfg("adamw"), model, total_steps=10, like=None)
    with pytest.raises(ValueError, match="parameter groups"):
        fresh.load_state_dict(saved)
