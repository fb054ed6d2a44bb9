import pytest
import torch

from attention3d.layers.squeeze import SpatialChannelSqueezeExcitation, SqueezeExcitation


def _cse_reference(x, w1, b1, w2, b2):
    """Hu et al. 2018, eqs. (2)-(4), written out on flattened positions."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)  # (B, C, N)
    z = flat.sum(-1) / flat.shape[-1]  # eq. (2): z_c = 1/N sum_i u_c(i)
    s = torch.sigmoid(torch.relu(z @ w1.T + b1) @ w2.T + b2)  # eq. (3)
    return (flat * s[:, :, None]).reshape(x.shape)  # eq. (4)


def _sse_reference(x, w, bias):
    """Roy et al. 2018 sSE: q(i) = sigmoid(sum_c w_c x_c(i) + b), out = q * x."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)  # (B, C, N)
    q = torch.sigmoid(torch.einsum("c,bcn->bn", w, flat) + bias)  # (B, N)
    return (flat * q[:, None, :]).reshape(x.shape)


SHAPES = [(2, (5, 6)), (3, (3, 4, 5))]


def _features(b, c, *size, dtype=torch.float32):
    """Random features whose channel means differ: zero-mean noise would squeeze to z ~ 0 and leave the
    excitation's ReLU all but dead."""
    return torch.randn(b, c, *size, dtype=dtype) + 2 * torch.randn(b, c, *([1] * len(size)), dtype=dtype)


@pytest.mark.parametrize(("spatial_dims", "size"), SHAPES)
@pytest.mark.parametrize(("channels", "reduction"), [(8, 4), (3, 16)])
def test_se_matches_transcription(spatial_dims, size, channels, reduction):
    torch.manual_seed(0)
    se = SqueezeExcitation(spatial_dims, channels, reduction).double()
    assert se.fc1.out_features == max(1, channels // reduction)
    x = _features(2, channels, *size, dtype=torch.float64)
    expected = _cse_reference(x, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias)
    torch.testing.assert_close(se(x), expected)


@pytest.mark.parametrize(("spatial_dims", "size"), SHAPES)
def test_scse_is_the_sum_of_channel_and_spatial_gates(spatial_dims, size):
    torch.manual_seed(0)
    block = SpatialChannelSqueezeExcitation(spatial_dims, 8, reduction=2).double()
    x = _features(2, 8, *size, dtype=torch.float64)
    cse = block.cse
    expected = _cse_reference(x, cse.fc1.weight, cse.fc1.bias, cse.fc2.weight, cse.fc2.bias) + _sse_reference(
        x, block.sse.weight.reshape(-1), block.sse.bias
    )
    torch.testing.assert_close(block(x), expected)


def test_gates_are_data_dependent():
    """Channel gates differ between samples and spatial gates between positions: a constant gate would pass a
    shape test but is not SE."""
    torch.manual_seed(0)
    block = SpatialChannelSqueezeExcitation(3, 8, reduction=2)
    x = _features(2, 8, 4, 4, 4)
    ratio = block.cse(x) / x  # the channel gate s_c, one value per (sample, channel)
    assert not torch.allclose(ratio[0], ratio[1])
    spatial_gate = torch.sigmoid(block.sse(x))
    assert spatial_gate.std() > 0


@pytest.mark.parametrize("cls", [SqueezeExcitation, SpatialChannelSqueezeExcitation])
def test_gradients_reach_every_parameter(cls):
    torch.manual_seed(0)
    block = cls(3, 8, reduction=2)
    x = _features(2, 8, 3, 4, 5).requires_grad_()
    block(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs", [{"channels": 0}, {"reduction": 0}, {"spatial_dims": 1}])
def test_bad_arguments_raise(kwargs):
    args = {"spatial_dims": 3, "channels": 8, "reduction": 2} | kwargs
    with pytest.raises(ValueError):
        SqueezeExcitation(**args)
