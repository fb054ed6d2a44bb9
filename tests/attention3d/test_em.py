import math

import pytest
import torch
import torch.nn.functional as F

from attention3d.layers.em import EMAttention


def _em(channels=8, spatial_dims=3, bases=5, stages=3, momentum=0.9, seed=0):
    torch.manual_seed(seed)
    em = EMAttention(spatial_dims, channels, bases=bases, stages=stages, momentum=momentum)
    with torch.no_grad():  # non-trivial affine so that the norm's parameters are exercised
        em.norm.weight.uniform_(0.5, 1.5)
        em.norm.bias.normal_(0, 0.1)
    return em


def _reference(em, x):
    """EMANet's EMAU (Li et al. 2019, Sec. 3) written out with the module's weights and buffer.
    Returns the output and the final bases (B, C, K)."""
    b = x.shape[0]
    w_in = em.conv_in.weight.flatten(1)
    feats = torch.einsum("oc,bcn->bon", w_in, x.flatten(2)) + em.conv_in.bias[None, :, None]  # (B, C, N)
    mu = em.mu.clone().repeat(b, 1, 1)  # (B, C, K)
    for _ in range(em.stages):
        z = torch.softmax(torch.einsum("bcn,bck->bnk", feats, mu), dim=2)  # (B, N, K)
        z_ = z / (1e-6 + z.sum(dim=1, keepdim=True))
        mu = torch.einsum("bcn,bnk->bck", feats, z_)
        mu = mu / (1e-6 + torch.linalg.vector_norm(mu, dim=1, keepdim=True))
    recon = F.relu(torch.einsum("bck,bnk->bcn", mu, z)).reshape(x.shape)
    out = torch.einsum("oc,bc...->bo...", em.conv_out.weight.flatten(1), recon)
    out = F.instance_norm(out, weight=em.norm.weight, bias=em.norm.bias)
    return F.relu(out + x), mu


@pytest.mark.parametrize(("spatial_dims", "size"), [(3, (4, 5, 3)), (2, (7, 6))])
def test_em_matches_paper_formula(spatial_dims, size):
    em = _em(spatial_dims=spatial_dims).eval()
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        y_ref, _ = _reference(em, x)
        y = em(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_em_buffer_initialisation():
    torch.manual_seed(0)
    em = EMAttention(3, channels=16, bases=64)
    assert em.mu.shape == (1, 16, 64)
    assert "mu" in dict(em.named_buffers()) and "mu" not in dict(em.named_parameters())
    assert "mu" in em.state_dict()
    torch.testing.assert_close(torch.linalg.vector_norm(em.mu, dim=1), torch.ones(1, 64), rtol=0, atol=1e-5)
    assert em.conv_in.bias is not None and em.conv_out.bias is None
    assert math.isclose(EMAttention(2, 4).momentum, 0.9) and EMAttention(2, 4).stages == 3


def test_em_train_mode_updates_buffer_by_moving_average():
    em = _em(momentum=0.8).train()
    x = torch.randn(3, 8, 4, 4, 4)
    mu0 = em.mu.clone()
    with torch.no_grad():
        y_ref, mu_final = _reference(em, x)  # the forward uses the buffer as it was before the update
    y = em(x)
    expected = 0.8 * mu0 + 0.2 * mu_final.mean(dim=0, keepdim=True)
    assert not torch.allclose(em.mu, mu0, atol=1e-4)
    torch.testing.assert_close(em.mu, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-5, atol=1e-5)


def test_em_eval_mode_leaves_buffer_unchanged():
    em = _em().eval()
    mu0 = em.mu.clone()
    em(torch.randn(2, 8, 4, 4, 4))
    torch.testing.assert_close(em.mu, mu0, rtol=0, atol=0)


def test_em_gradients_skip_the_em_iterations():
    em = _em().train()
    x = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    em(x).square().mean().backward()
    assert em.conv_in.weight.grad is None and em.conv_in.bias.grad is None
    assert em.mu.grad is None and not em.mu.requires_grad
    for p in (em.conv_out.weight, em.norm.weight, em.norm.bias, x):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_em_iterations_run_in_float32_under_autocast():
    em = _em().eval()
    feats = torch.randn(2, 8, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, z = em.em(feats)
        y = em(torch.randn(2, 8, 4, 4, 4))
    assert mu.dtype == z.dtype == torch.float32
    assert em.mu.dtype == torch.float32 and torch.isfinite(y).all()
    # Same numbers as an fp32 run on the same (bf16-rounded) features: autocast did not reach the loop.
    mu_ref, z_ref = em.em(feats.float())
    torch.testing.assert_close(mu, mu_ref, rtol=0, atol=0)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)


def test_em_buffer_stays_float32_when_training_under_autocast():
    em = _em().train()
    mu0 = em.mu.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        em(torch.randn(2, 8, 4, 4, 4))
    assert em.mu.dtype == torch.float32 and not torch.equal(em.mu, mu0)


@pytest.mark.parametrize(
    "kwargs", [{"spatial_dims": 1}, {"bases": 0}, {"stages": 0}, {"momentum": 1.5}, {"momentum": -0.1}]
)
def test_em_rejects_bad_arguments(kwargs):
    args = {"spatial_dims": 3, "channels": 4, **kwargs}
    with pytest.raises(ValueError):
        EMAttention(**args)
