from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention3d.layers.pyramid import FeaturePyramidAttention, GlobalAttentionUpsample

EPS = 1e-5  # torch's default norm epsilon


def _convnd(spatial_dims: int):
    return {2: F.conv2d, 3: F.conv3d}[spatial_dims]


def _up(x: torch.Tensor, size) -> torch.Tensor:
    mode = {4: "bilinear", 5: "trilinear"}[x.ndim]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def _instance_norm(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per sample and channel over the grid, biased variance, then the affine map."""
    dims = tuple(range(2, z.ndim))
    mean = z.mean(dims, keepdim=True)
    var = z.var(dims, unbiased=False, keepdim=True)
    shape = (1, -1) + (1,) * (z.ndim - 2)
    return (z - mean) / torch.sqrt(var + EPS) * weight.reshape(shape) + bias.reshape(shape)


def _randomise_affine(module: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1 and biases at 0; random values make the transcription check them too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.modules.instancenorm._InstanceNorm, torch.nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.5)


def _assert_every_param_learns(module: torch.nn.Module, *inputs: torch.Tensor) -> None:
    out = module(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert p.grad.abs().sum() > 0, f"{name} received a zero gradient"


# --- Feature Pyramid Attention ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spatial_dims, shape",
    [
        (3, (2, 4, 16, 16, 16)),
        (3, (2, 4, 7, 9, 5)),  # odd and non-cubic: every pyramid level rounds up differently per axis
        (3, (1, 4, 3, 2, 5)),
        (2, (2, 4, 11, 6)),
        (2, (1, 4, 2, 2)),
    ],
)
def test_fpa_keeps_the_grid_and_maps_channels(spatial_dims, shape):
    fpa = FeaturePyramidAttention(spatial_dims, in_channels=4, out_channels=6)
    y = fpa(torch.randn(shape))
    assert y.shape == (shape[0], 6, *shape[2:])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_fpa_at_a_2x2x2_bottleneck_trains_with_batch_size_1(norm):
    # Every pyramid level and the pooled branch are 1 voxel here; instance norm, and batch norm at batch
    # size 1, would raise on them, so only the 1x1x1 projection may carry a norm.
    fpa = FeaturePyramidAttention(3, in_channels=8, out_channels=4, norm=norm).train()
    x = torch.randn(1, 8, 2, 2, 2, requires_grad=True)
    y = fpa(x)
    assert y.shape == (1, 4, 2, 2, 2)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    norm_types = (torch.nn.modules.instancenorm._InstanceNorm, torch.nn.modules.batchnorm._BatchNorm)
    normed = [name for name, m in fpa.named_modules() if isinstance(m, norm_types)]
    assert normed == ["proj.1"]


def _fpa_by_hand(fpa: FeaturePyramidAttention, x: torch.Tensor) -> torch.Tensor:
    conv = _convnd(x.ndim - 2)

    def conv_relu(seq, z, stride):
        c = seq[0]
        return torch.relu(conv(z, c.weight, c.bias, stride=stride, padding=c.weight.shape[-1] // 2))

    proj_conv, proj_norm = fpa.proj[0], fpa.proj[1]
    proj = torch.relu(_instance_norm(conv(x, proj_conv.weight), proj_norm.weight, proj_norm.bias))
    d1 = conv_relu(fpa.down1, x, 2)
    d2 = conv_relu(fpa.down2, d1, 2)
    d3 = conv_relu(fpa.down3, d2, 2)
    c1, c2, c3 = conv_relu(fpa.conv1, d1, 1), conv_relu(fpa.conv2, d2, 1), conv_relu(fpa.conv3, d3, 1)
    p = c2 + _up(c3, c2.shape[2:])
    p = c1 + _up(p, c1.shape[2:])
    att = _up(conv(p, fpa.expand.weight, fpa.expand.bias), x.shape[2:])
    gap = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    glob = conv(gap, fpa.glob.weight, fpa.glob.bias).expand_as(proj)
    return proj * att + glob


@pytest.mark.parametrize("spatial_dims, shape", [(3, (2, 3, 9, 7, 6)), (2, (2, 3, 13, 10))])
def test_fpa_matches_the_formula_with_its_own_weights(spatial_dims, shape):
    torch.manual_seed(0)
    fpa = FeaturePyramidAttention(spatial_dims, in_channels=3, out_channels=5, mid_channels=2).double().eval()
    _randomise_affine(fpa, seed=1)
    x = torch.randn(shape, dtype=torch.float64)
    expected = _fpa_by_hand(fpa, x)
    torch.testing.assert_close(fpa(x), expected)
    # Neither term is trivial, so the check covers both the pyramid product and the global branch.
    assert (expected - expected.mean(dim=tuple(range(2, x.ndim)), keepdim=True)).abs().max() > 1e-3


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fpa_pyramid_is_7_5_3_with_stride_2_going_down(spatial_dims):
    fpa = FeaturePyramidAttention(spatial_dims, in_channels=3, out_channels=5)
    layers = {"down1": (7, 2), "down2": (5, 2), "down3": (3, 2), "conv1": (7, 1), "conv2": (5, 1), "conv3": (3, 1)}
    for name, (kernel, stride) in layers.items():
        c = getattr(fpa, name)[0]
        assert c.kernel_size == (kernel,) * spatial_dims, name
        assert c.stride == (stride,) * spatial_dims, name
        assert c.padding == (kernel // 2,) * spatial_dims, name
    assert fpa.proj[0].kernel_size == fpa.glob.kernel_size == fpa.expand.kernel_size == (1,) * spatial_dims
    assert fpa.down1[0].out_channels == fpa.expand.in_channels == max(1, 5 // 4)


@pytest.mark.parametrize("spatial_dims, shape", [(3, (2, 3, 16, 12, 10)), (2, (2, 3, 24, 20))])
def test_fpa_gradients_reach_every_parameter(spatial_dims, shape):
    torch.manual_seed(0)
    fpa = FeaturePyramidAttention(spatial_dims, in_channels=3, out_channels=6, mid_channels=3).train()
    _assert_every_param_learns(fpa, torch.randn(shape))


# --- Global Attention Upsample ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spatial_dims, high_shape, low_shape",
    [
        (3, (2, 8, 4, 4, 4), (2, 4, 8, 8, 8)),
        (3, (2, 8, 3, 4, 2), (2, 4, 5, 7, 3)),  # odd, non-cubic, not an exact factor of 2
        (3, (1, 8, 1, 1, 1), (1, 4, 2, 2, 2)),  # the bottleneck step of a deep 3D U-Net at batch size 1
        (2, (2, 8, 3, 5), (2, 4, 6, 9)),
        (2, (1, 8, 1, 1), (1, 4, 3, 3)),
    ],
)
def test_gau_returns_lows_grid_and_channels_in_train_mode(spatial_dims, high_shape, low_shape):
    gau = GlobalAttentionUpsample(spatial_dims, high_channels=8, low_channels=4).train()
    out = gau(torch.randn(high_shape), torch.randn(low_shape))
    assert out.shape == low_shape
    assert torch.isfinite(out).all()


def _gau_by_hand(gau: GlobalAttentionUpsample, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    conv = _convnd(high.ndim - 2)
    up = _up(conv(high, gau.up.weight, gau.up.bias), low.shape[2:])
    gap = high.mean(dim=tuple(range(2, high.ndim)), keepdim=True)  # (B, Ch, 1, ...)
    v = conv(gap, gau.gate[0].weight)  # (B, Cl, 1, ...), no bias
    # Layer norm of the pooled channel vector: statistics over the Cl values of each sample.
    dims = tuple(range(1, v.ndim))
    v = (v - v.mean(dims, keepdim=True)) / torch.sqrt(v.var(dims, unbiased=False, keepdim=True) + EPS)
    shape = (1, -1) + (1,) * (v.ndim - 2)
    w = torch.sigmoid(v * gau.gate[1].weight.reshape(shape) + gau.gate[1].bias.reshape(shape))
    low_conv, low_norm = gau.low[0], gau.low[1]
    lo = _instance_norm(conv(low, low_conv.weight, padding=1), low_norm.weight, low_norm.bias)
    return up + lo * w


@pytest.mark.parametrize(
    "spatial_dims, high_shape, low_shape",
    [(3, (2, 6, 3, 4, 2), (2, 4, 7, 8, 5)), (2, (2, 6, 5, 3), (2, 4, 9, 6))],
)
def test_gau_matches_the_formula_with_its_own_weights(spatial_dims, high_shape, low_shape):
    torch.manual_seed(0)
    gau = GlobalAttentionUpsample(spatial_dims, high_channels=6, low_channels=4).double().eval()
    _randomise_affine(gau, seed=2)
    high = torch.randn(high_shape, dtype=torch.float64)
    low = torch.randn(low_shape, dtype=torch.float64)
    torch.testing.assert_close(gau(high, low), _gau_by_hand(gau, high, low))


def test_gau_gate_is_per_sample_and_channel():
    torch.manual_seed(0)
    gau = GlobalAttentionUpsample(3, high_channels=6, low_channels=4).eval()
    high, low = torch.randn(2, 6, 3, 3, 3), torch.randn(2, 4, 6, 6, 6)
    # With the upsampling path zeroed the output is the normalised low branch times w, so low's features
    # at a given channel are rescaled by one factor per sample, and the factors differ across samples.
    with torch.no_grad():
        gau.up.weight.zero_()
        gau.up.bias.zero_()
    out = gau(high, low)
    lo = gau.low(low)
    ratio = (out / lo).flatten(2)  # (B, Cl, N)
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    assert ((ratio > 0) & (ratio < 1)).all()
    assert not torch.allclose(ratio[0, :, 0], ratio[1, :, 0])


@pytest.mark.parametrize(
    "spatial_dims, high_shape, low_shape",
    [(3, (2, 6, 3, 4, 2), (2, 4, 7, 8, 5)), (2, (1, 6, 5, 3), (1, 4, 9, 6))],
)
def test_gau_gradients_reach_every_parameter(spatial_dims, high_shape, low_shape):
    torch.manual_seed(0)
    gau = GlobalAttentionUpsample(spatial_dims, high_channels=6, low_channels=4).train()
    _assert_every_param_learns(gau, torch.randn(high_shape), torch.randn(low_shape))


def test_invalid_spatial_dims_is_a_value_error():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        FeaturePyramidAttention(1, 4, 4)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        GlobalAttentionUpsample(4, 4, 4)
