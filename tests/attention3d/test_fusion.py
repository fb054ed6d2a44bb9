"""Folding eval-mode batch norms into convolutions: the same function, fewer layers."""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from attention3d import create_model, list_models
from attention3d.fusion import fold_batch_norms


def _randomise_statistics(model: nn.Module) -> None:
    """Fresh batch norms are the identity (mean 0, var 1, weight 1, bias 0): folding them would prove nothing."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.25)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("name", list_models())
def test_folding_keeps_every_variant_the_same_function(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, out_channels=3, channels=[8, 16, 32], strides=[2, 2], norm="batch")
    _randomise_statistics(model)
    model.eval()
    x = torch.randn(2, 1, 32, 32, 16)
    before = sum(isinstance(m, _BatchNorm) for m in model.modules())
    with torch.no_grad():
        expected = model(x)
        folded = fold_batch_norms(model)
        got = model(x)
    after = sum(isinstance(m, _BatchNorm) for m in model.modules())
    # Every conv block's two norms at least (3 encoder + 2 decoder blocks), whatever attention sits elsewhere.
    assert folded >= 10 and after == before - folded
    torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


def test_attention_unet_has_no_batch_norm_left_and_gates_are_unchanged():
    torch.manual_seed(0)
    model = create_model("attention_unet", in_channels=1, out_channels=3, channels=[8, 16], strides=[2], norm="batch")
    _randomise_statistics(model)
    model.eval()
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        _, gates = model(x, return_gates=True)
        assert fold_batch_norms(model) == 2 * 3 + 1  # 3 conv blocks x 2, and the gate's W
        _, gates_folded = model(x, return_gates=True)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    torch.testing.assert_close(gates_folded[0], gates[0], atol=1e-5, rtol=1e-5)


def test_instance_norm_models_are_left_alone_and_training_models_refused():
    model = create_model("attention_unet", in_channels=1, out_channels=3, channels=[8, 16], strides=[2]).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fold_batch_norms(model) == 0
    assert model.state_dict().keys() == state.keys()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(model.train())
