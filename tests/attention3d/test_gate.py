import pytest
import torch
import torch.nn.functional as F

from attention3d.layers.gate import AttentionGate


def _conv(spatial_dims, x, weight, bias=None, stride=1):
    return (F.conv2d if spatial_dims == 2 else F.conv3d)(x, weight, bias, stride=stride)


def _reference(gate, spatial_dims, x, g):
    """Oktay et al. 2018, Sec. 2, written out with the module's weights."""
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    s = gate.subsample
    theta = _conv(spatial_dims, x, gate.theta.weight, None, stride=s)
    phi = _conv(spatial_dims, g, gate.phi.weight, gate.phi.bias)
    phi = F.interpolate(phi, size=theta.shape[2:], mode=mode, align_corners=False)
    q_att = _conv(spatial_dims, F.relu(theta + phi), gate.psi.weight, gate.psi.bias)
    alpha = F.interpolate(torch.sigmoid(q_att), size=x.shape[2:], mode=mode, align_corners=False)
    w_conv, w_norm = gate.W[0], gate.W[1]
    y = F.instance_norm(_conv(spatial_dims, alpha * x, w_conv.weight), weight=w_norm.weight, bias=w_norm.bias)
    return y, alpha


@pytest.mark.parametrize(
    ("spatial_dims", "x_size", "g_size", "subsample"),
    [
        (3, (8, 8, 8), (4, 4, 4), 2),
        (3, (5, 6, 7), (3, 3, 3), 2),  # odd extents: theta floors to (2, 3, 3), alpha is resized back
        (3, (9, 9, 9), (2, 2, 2), 3),
        (2, (12, 10), (6, 5), 2),
        (2, (7, 9), (2, 3), 1),
    ],
)
def test_gate_matches_paper_formula(spatial_dims, x_size, g_size, subsample):
    torch.manual_seed(0)
    gate = AttentionGate(spatial_dims, in_channels=6, gating_channels=10, subsample=subsample)
    with torch.no_grad():  # non-trivial affine so that the norm's parameters are exercised
        gate.W[1].weight.uniform_(0.5, 1.5)
        gate.W[1].bias.normal_()
    x = torch.randn(2, 6, *x_size)
    g = torch.randn(2, 10, *g_size)
    y, alpha = gate(x, g)
    y_ref, alpha_ref = _reference(gate, spatial_dims, x, g)
    assert alpha.shape == (2, 1, *x_size)
    assert y.shape == x.shape
    assert ((alpha > 0) & (alpha < 1)).all()
    torch.testing.assert_close(alpha, alpha_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_gate_structure():
    gate = AttentionGate(3, in_channels=8, gating_channels=16, subsample=2)
    assert gate.inter_channels == 4
    assert gate.theta.bias is None
    assert gate.theta.kernel_size == (2, 2, 2) and gate.theta.stride == (2, 2, 2) and gate.theta.padding == (0, 0, 0)
    assert gate.phi.bias is not None and gate.phi.kernel_size == (1, 1, 1)
    assert gate.psi.out_channels == 1 and gate.psi.bias is not None
    assert gate.W[0].in_channels == gate.W[0].out_channels == 8
    assert AttentionGate(2, in_channels=1, gating_channels=4).inter_channels == 1
    assert AttentionGate(2, in_channels=8, gating_channels=4, inter_channels=3).inter_channels == 3


def test_gate_gradients_reach_every_parameter():
    torch.manual_seed(0)
    gate = AttentionGate(3, in_channels=4, gating_channels=8)
    y, alpha = gate(torch.randn(2, 4, 6, 6, 6), torch.randn(2, 8, 3, 3, 3))
    (y.square().mean() + alpha.mean()).backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs", [{"spatial_dims": 1}, {"subsample": 0}, {"inter_channels": 0}])
def test_gate_rejects_bad_arguments(kwargs):
    args = {"spatial_dims": 3, "in_channels": 4, "gating_channels": 4, **kwargs}
    with pytest.raises(ValueError):
        AttentionGate(**args)


def test_gate_scaling_in_channels_last_equals_the_broadcast():
    """Channels-last inference multiplies by the expanded gate (faster than a broadcast along the innermost
    dimension): the same values, in x's layout, and gradients still reach both factors."""
    from attention3d.layers.gate import _scale

    x = torch.randn(2, 8, 6, 5, 4).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    alpha = torch.rand(2, 1, 6, 5, 4, requires_grad=True)
    y = _scale(x, alpha)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, alpha * x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, alpha.detach().expand_as(x))
    torch.testing.assert_close(alpha.grad, x.detach().sum(1, keepdim=True))
