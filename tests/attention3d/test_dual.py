import pytest
import torch
from torch import nn

from attention3d.layers.dual import ChannelAttention, DualAttentionHead, PositionAttention
from tests.attention3d._peak_memory import peak_growth


def _pam(spatial_dims, channels, reduction=8, gamma=0.7, seed=0):
    torch.manual_seed(seed)
    pam = PositionAttention(spatial_dims, channels, reduction=reduction)
    with torch.no_grad():
        pam.gamma.fill_(gamma)
    return pam


def _conv1x1(x, conv):
    return torch.einsum("oc,bcn->bon", conv.weight.flatten(1), x.flatten(2)) + conv.bias[None, :, None]


def _pam_reference(pam, x):
    """DANet Eqs. 1-2 with the module's weights: out_i = sum_j S_ij v_j, S_ij = softmax_j(q_i . k_j)."""
    q, k, v = (_conv1x1(x, conv) for conv in (pam.query, pam.key, pam.value))  # (B, C', N), (B, C', N), (B, C, N)
    s = torch.softmax(torch.einsum("bci,bcj->bij", q, k), dim=-1)  # (B, N, N), rows sum to one
    out = torch.einsum("bij,bcj->bci", s, v)
    return pam.gamma * out.reshape(x.shape) + x, s, v


# N = 16 * 16 * 32 = 8192 positions: the (N, N) float32 attention map is 256 MiB, each of q, k, v and the output
# 0.5 MiB, so a forward that builds the map raises the peak memory by far more than one that does not.
MAP_BYTES = (16 * 16 * 32) ** 2 * 4
_PAM_SETUP = """
from attention3d.layers.dual import PositionAttention
pam = PositionAttention(3, 16)
with torch.no_grad():
    pam.gamma.fill_(0.7)
    x = torch.randn(1, 16, 16, 16, 32)
    small = torch.randn(1, 16, 4, 4, 4)
    for fused in (True, False):
        pam.fused = fused
        pam(small)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pam(small)
pam.fused = True
"""


@pytest.fixture(scope="module")
def pam_peak_growth() -> dict[str, int]:
    """Peak-memory growth of one PAM forward at N = 8192 in a fresh process, per path."""
    return peak_growth(
        _PAM_SETUP,
        [
            ("fused", "with torch.no_grad(): pam(x)"),
            ("fused_bf16_autocast", "with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16): pam(x)"),
            ("manual", "pam.fused = False\nwith torch.no_grad(): pam(x)"),
        ],
    )


CASES = [(2, 16, 8, (6, 7)), (3, 16, 8, (4, 5, 3)), (3, 4, 8, (3, 4, 4)), (3, 24, 8, (4, 4, 4)), (2, 6, 1, (5, 5))]


@pytest.mark.parametrize(("spatial_dims", "channels", "reduction", "size"), CASES)
def test_pam_fused_matches_manual(spatial_dims, channels, reduction, size):
    pam = _pam(spatial_dims, channels, reduction)
    x = torch.randn(2, channels, *size, requires_grad=True)
    assert pam.fused
    y_fused = pam(x)
    (g_fused,) = torch.autograd.grad(y_fused.square().sum(), x)
    pam.fused = False
    y_manual = pam(x)
    (g_manual,) = torch.autograd.grad(y_manual.square().sum(), x)
    assert not torch.allclose(y_fused, x)  # gamma != 0: the attention term is really there
    torch.testing.assert_close(y_fused, y_manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_manual, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("spatial_dims", "channels", "reduction", "size"), CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_pam_matches_paper_formula(spatial_dims, channels, reduction, size, fused):
    pam = _pam(spatial_dims, channels, reduction)
    pam.fused = fused
    x = torch.randn(2, channels, *size)
    with torch.no_grad():
        y = pam(x)
        y_ref, s, v = _pam_reference(pam, x)
        # The reference has to be able to tell i from j: S is not symmetric, and aggregating by columns
        # (the missing-transpose bug, out_i = sum_j S_ji v_j) gives a different answer.
        assert not torch.allclose(s, s.transpose(1, 2), atol=1e-3)
        y_bug = pam.gamma * torch.einsum("bji,bcj->bci", s, v).reshape(x.shape) + x
        assert not torch.allclose(y_bug, y_ref, atol=1e-3)
    assert pam.qk_channels == max(1, channels // reduction)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_pam_starts_as_identity():
    pam = PositionAttention(3, 16)
    assert isinstance(pam.gamma, nn.Parameter) and pam.gamma.shape == (1,) and pam.gamma.item() == 0
    x = torch.randn(1, 16, 3, 3, 3)
    torch.testing.assert_close(pam(x), x, rtol=0, atol=0)


def test_pam_fused_path_never_materialises_the_n_by_n_map(pam_peak_growth):
    """SDPA falls back to its math path, which builds the map, when q, k and v are not laid out for the flash
    kernel; the manual path builds it by design. Peak memory tells the two apart in any torch version."""
    assert pam_peak_growth["manual"] > MAP_BYTES, pam_peak_growth  # the measure sees a map when one is built
    assert pam_peak_growth["fused"] < MAP_BYTES / 4, pam_peak_growth


def test_pam_fused_path_under_bf16_autocast(pam_peak_growth):
    pam = _pam(3, 16)
    x = torch.randn(2, 16, 4, 4, 4)
    with torch.no_grad():
        pam.fused = False
        y_ref = pam(x)
        pam.fused = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = pam(x)
    # A bfloat16 map would be MAP_BYTES / 2: under autocast too, the fused path builds none.
    assert pam_peak_growth["fused_bf16_autocast"] < MAP_BYTES / 4, pam_peak_growth
    assert y.dtype == torch.float32  # the residual keeps x's dtype
    torch.testing.assert_close(y, y_ref, rtol=0.02, atol=0.02)


def test_pam_fused_path_in_bf16():
    pam = _pam(2, 16).to(torch.bfloat16)
    x = torch.randn(2, 16, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        y_fused = pam(x)
        pam.fused = False
        y_manual = pam(x)
    assert y_fused.dtype == torch.bfloat16
    torch.testing.assert_close(y_fused.float(), y_manual.float(), rtol=0.02, atol=0.05)


def test_pam_gradients_reach_every_parameter():
    pam = _pam(3, 16)
    pam(torch.randn(2, 16, 3, 4, 4)).square().mean().backward()
    for name, p in pam.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [(6, 5), (3, 4, 5)])
def test_cam_matches_reference(size):
    torch.manual_seed(0)
    cam = ChannelAttention()
    assert isinstance(cam.gamma, nn.Parameter) and cam.gamma.shape == (1,) and cam.gamma.item() == 0
    x = torch.randn(2, 8, *size)
    torch.testing.assert_close(cam(x), x, rtol=0, atol=0)
    with torch.no_grad():
        cam.gamma.fill_(0.3)
    feats = x.flatten(2)  # (B, C, N)
    energy = torch.einsum("bcn,bdn->bcd", feats, feats)
    attn = torch.softmax(energy.max(dim=-1, keepdim=True).values - energy, dim=-1)
    y_ref = 0.3 * torch.einsum("bcd,bdn->bcn", attn, feats).reshape(x.shape) + x
    y = cam(x)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert cam.gamma.grad is not None and cam.gamma.grad.abs() > 0


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (8, 6)), (3, (6, 5, 4))])
def test_dual_head_composition(spatial_dims, size):
    torch.manual_seed(0)
    head = DualAttentionHead(spatial_dims, in_channels=32, out_channels=3).eval()
    with torch.no_grad():
        head.pam.gamma.fill_(0.5)
        head.cam.gamma.fill_(0.5)
    assert head.inter_channels == 8 and head.pam.in_channels == 8 and head.pam.qk_channels == 1
    dropout_type = nn.Dropout2d if spatial_dims == 2 else nn.Dropout3d
    for classifier in (head.head_fused, head.head_pam, head.head_cam):
        assert isinstance(classifier[0], dropout_type) and classifier[0].p == 0.1
        assert classifier[1].in_channels == 8 and classifier[1].out_channels == 3 and classifier[1].bias is not None
    for branch in (head.pam_in, head.pam_out, head.cam_in, head.cam_out):
        assert branch[0].kernel_size == (3,) * spatial_dims

    x = torch.randn(2, 32, *size)
    with torch.no_grad():
        fused_out, pam_out, cam_out = head(x)
        pam = head.pam_out(head.pam(head.pam_in(x)))
        cam = head.cam_out(head.cam(head.cam_in(x)))
        expected = [head.head_fused[1](pam + cam), head.head_pam[1](pam), head.head_cam[1](cam)]
    for out, ref in zip((fused_out, pam_out, cam_out), expected):
        assert out.shape == (2, 3, *size)
        torch.testing.assert_close(out, ref)


def test_dual_head_gradients_reach_every_parameter():
    torch.manual_seed(0)
    head = DualAttentionHead(3, in_channels=16, out_channels=2, dropout=0.0)
    with torch.no_grad():
        head.pam.gamma.fill_(0.5)
        head.cam.gamma.fill_(0.5)
    fused_out, pam_out, cam_out = head(torch.randn(2, 16, 4, 4, 4))
    (fused_out.square().mean() + pam_out.square().mean() + cam_out.square().mean()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dual_head_small_input_channels():
    head = DualAttentionHead(2, in_channels=2, out_channels=1)
    assert head.inter_channels == 1
    outs = head(torch.randn(1, 2, 5, 5))
    assert all(o.shape == (1, 1, 5, 5) for o in outs)


def test_dual_rejects_bad_arguments():
    with pytest.raises(ValueError):
        PositionAttention(1, 8)
    with pytest.raises(ValueError):
        PositionAttention(3, 8, reduction=0)
    with pytest.raises(ValueError):
        DualAttentionHead(4, 8, 2)
