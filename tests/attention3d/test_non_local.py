import itertools
import math

import pytest
import torch

from attention3d.layers.non_local import NonLocalBlock


def _conv1x1(x, conv):
    """A 1x1(x1) convolution written as a matrix product over channels."""
    w = conv.weight.reshape(conv.weight.shape[0], -1)  # (out, in)
    return torch.einsum("oc,bc...->bo...", w, x) + conv.bias.view(1, -1, *([1] * (x.ndim - 2)))


def _max_pool_reference(t):
    """Max over windows of 2 per axis (1 on axes of size 1); a last, partial window on odd axes is kept."""
    spatial = t.shape[2:]
    kernel = [2 if s >= 2 else 1 for s in spatial]
    out_size = [math.ceil(s / k) for s, k in zip(spatial, kernel)]
    out = t.new_empty(*t.shape[:2], *out_size)
    for cell in itertools.product(*[range(n) for n in out_size]):
        window = t[(..., *[slice(i * k, i * k + k) for i, k in zip(cell, kernel)])]
        out[(..., *cell)] = window.flatten(2).amax(-1)
    return out


def _instance_norm_reference(t, weight, bias, eps=1e-5):
    axes = tuple(range(2, t.ndim))
    mean = t.mean(axes, keepdim=True)
    var = t.var(axes, keepdim=True, unbiased=False)
    shape = (1, -1, *([1] * len(axes)))
    return (t - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape)


def _non_local_reference(block, x):
    """Wang et al. 2018, eqs. (1), (3), (6), embedded Gaussian, with logits scaled by 1/sqrt(d)."""
    b, _, *spatial = x.shape
    d = block.inter_channels
    theta = _conv1x1(x, block.theta)
    phi, g = _conv1x1(x, block.phi), _conv1x1(x, block.g)
    if block.subsample:
        phi, g = _max_pool_reference(phi), _max_pool_reference(g)
    theta, phi, g = theta.reshape(b, d, -1), phi.reshape(b, d, -1), g.reshape(b, d, -1)
    y = torch.zeros_like(theta)
    for i in range(theta.shape[-1]):
        logits = torch.stack([theta[:, :, i].mul(phi[:, :, j]).sum(1) for j in range(phi.shape[-1])], dim=1)
        f = torch.softmax(logits / math.sqrt(d), dim=1)  # (B, M): exp(theta_i . phi_j) / C(x)
        y[:, :, i] = (f[:, None, :] * g).sum(-1)
    w_y = _conv1x1(y.reshape(b, d, *spatial), block.w_z)
    return x + _instance_norm_reference(w_y, block.norm.weight, block.norm.bias)


CASES = [
    (2, (6, 4), True),
    (2, (5, 1), True),  # an odd axis and an axis of size 1
    (3, (4, 2, 6), True),
    (3, (1, 3, 5), True),
    (3, (3, 2, 3), False),
]


@pytest.mark.parametrize(("spatial_dims", "size", "subsample"), CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_identity_at_initialisation(spatial_dims, size, subsample, fused):
    torch.manual_seed(0)
    block = NonLocalBlock(spatial_dims, 6, subsample=subsample)
    block.fused = fused
    x = torch.randn(2, 6, *size)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize(("spatial_dims", "size", "subsample"), CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_matches_transcription(spatial_dims, size, subsample, fused):
    torch.manual_seed(0)
    block = NonLocalBlock(spatial_dims, 6, inter_channels=4, subsample=subsample).double()
    with torch.no_grad():
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    block.fused = fused
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    out = block(x)
    assert not torch.allclose(out, x)
    torch.testing.assert_close(out, _non_local_reference(block, x))


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (7, 5)), (3, (5, 4, 3))])
def test_fused_matches_manual(spatial_dims, size):
    # float64: the instance norm after W_z divides by the std of a small map, which in float32 lifts the
    # kernels' different summation order above 1e-5; in float64 both paths must agree to rounding.
    torch.manual_seed(0)
    block = NonLocalBlock(spatial_dims, 8).double()
    with torch.no_grad():
        block.norm.weight.fill_(1.0)
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    block.fused = True
    fused = block(x)
    block.fused = False
    torch.testing.assert_close(fused, block(x), rtol=1e-10, atol=1e-10)


def test_pooling_halves_every_axis_it_can():
    """Axes of size 1 are kept, odd axes round up (their last slice is pooled alone), even axes halve."""
    block = NonLocalBlock(3, 4)
    assert block._pool(torch.randn(1, 2, 1, 5, 4)).shape == (1, 2, 1, 3, 2)
    assert block._pool(torch.randn(1, 2, 1, 1, 1)).shape == (1, 2, 1, 1, 1)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = NonLocalBlock(3, 6)
    x = torch.randn(2, 6, 4, 4, 4, requires_grad=True)
    # at initialisation only the zeroed norm can learn, and it must, or the block stays the identity
    block(x).sin().sum().backward()
    assert block.norm.weight.grad.abs().sum() > 0
    block.zero_grad()
    with torch.no_grad():
        block.norm.weight.fill_(1.0)
    block(x).sin().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_default_inter_channels_and_affine_norm_required():
    assert NonLocalBlock(3, 7).inter_channels == 3
    assert NonLocalBlock(3, 1).inter_channels == 1
    with pytest.raises(ValueError, match="affine"):
        NonLocalBlock(3, 8, norm=("instance", {"affine": False}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_manual_on_cuda(dtype):
    torch.manual_seed(0)
    block = NonLocalBlock(3, 64).cuda().to(dtype)
    with torch.no_grad():
        block.norm.weight.fill_(1.0)
    x = torch.randn(2, 64, 8, 12, 10, device="cuda", dtype=dtype)
    block.fused = True
    fused = block(x)
    block.fused = False
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(fused, block(x), rtol=tol, atol=tol)


def test_fused_path_never_materialises_the_n_by_m_map():
    """SDPA silently falls back to its N x M math path on non-contiguous inputs; the fused path must not. Peak memory
    in a fresh process tells the paths apart in any torch version: at 32 x 32 x 16 (N = 16384, M = N / 8 after the
    subsampling) the float32 map is 128 MiB, each of theta, phi, g and y at most 0.5 MiB."""
    from tests.attention3d._peak_memory import peak_growth

    map_bytes = 16384 * 2048 * 4
    setup = """
from attention3d.layers.non_local import NonLocalBlock
block = NonLocalBlock(3, 16).eval()
x = torch.randn(1, 16, 32, 32, 16)
with torch.no_grad():
    for fused in (False, True):
        block.fused = fused
        block(torch.randn(1, 16, 4, 4, 4))
"""
    growth = peak_growth(
        setup,
        [
            ("fused", "with torch.no_grad(): block(x)"),
            ("manual", "block.fused = False\nwith torch.no_grad(): block(x)"),
        ],
    )
    assert growth["manual"] > map_bytes, growth  # the measure sees a map when one is built
    assert growth["fused"] < map_bytes / 4, growth
