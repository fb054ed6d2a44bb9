from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attention3d.layers.encoding import ContextEncoding, se_loss

EPS = 1e-5  # BatchNorm1d's default epsilon


def _encoding_by_hand(enc: ContextEncoding, x: torch.Tensor, batch_stats: bool):
    """EncNet's Context Encoding Module with the residuals x_i - d_k materialised as (B, N, K, C)."""
    B, C = x.shape[:2]
    rows = x.reshape(B, C, -1).transpose(1, 2)  # (B, N, C)
    d = enc.codewords  # (K, C)
    s = torch.nn.functional.softplus(enc.raw_scales) + 1e-6  # (K,)
    r = rows[:, :, None, :] - d[None, None, :, :]  # (B, N, K, C)
    a = torch.softmax(-s * (r**2).sum(-1), dim=2)  # (B, N, K), over k
    e = torch.einsum("bnk,bnkc->bkc", a, r)  # (B, K, C)
    if batch_stats:  # per codeword over batch and channels, biased variance
        mean = e.mean(dim=(0, 2), keepdim=True)
        var = e.var(dim=(0, 2), unbiased=False, keepdim=True)
    else:
        mean = enc.norm.running_mean[None, :, None]
        var = enc.norm.running_var[None, :, None]
    e = (e - mean) / torch.sqrt(var + EPS) * enc.norm.weight[None, :, None] + enc.norm.bias[None, :, None]
    encoded = torch.relu(e).mean(1)  # (B, C)
    gamma = torch.sigmoid(encoded @ enc.fc.weight.T + enc.fc.bias)  # (B, C)
    gamma = gamma.reshape(B, C, *([1] * (x.ndim - 2)))
    y = torch.relu(x + x * gamma)
    se_logits = encoded @ enc.se_fc.weight.T + enc.se_fc.bias
    return y, se_logits, a


def _module(spatial_dims: int, channels: int = 5, codewords: int = 6, num_classes: int = 3) -> ContextEncoding:
    torch.manual_seed(0)
    enc = ContextEncoding(spatial_dims, channels, codewords=codewords, num_classes=num_classes).double()
    with torch.no_grad():
        # Codewords spread like the features, and a norm that is not the identity, so every term matters.
        enc.codewords.normal_()
        enc.norm.running_mean.uniform_(-0.2, 0.2)
        enc.norm.running_var.uniform_(0.5, 2.0)
        enc.norm.weight.uniform_(0.5, 1.5)
        enc.norm.bias.uniform_(-0.1, 0.3)
    return enc


@pytest.mark.parametrize("spatial_dims, shape", [(3, (2, 5, 3, 4, 2)), (2, (3, 5, 6, 5))])
def test_eval_mode_matches_the_formula_with_its_own_weights(spatial_dims, shape):
    enc = _module(spatial_dims).eval()
    x = torch.randn(shape, dtype=torch.float64)
    y, se_logits = enc(x)
    y_ref, se_ref, a = _encoding_by_hand(enc, x, batch_stats=False)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(se_logits, se_ref)
    # The assignments are soft: neither one-hot nor uniform, so the scales and distances are exercised.
    assert a.max() < 0.99 and (a.max(-1).values - a.min(-1).values).min() > 1e-3


@pytest.mark.parametrize("batch", [1, 3])
def test_train_mode_normalises_each_codeword_over_batch_and_channels(batch):
    enc = _module(3).train()
    x = torch.randn(batch, 5, 3, 3, 2, dtype=torch.float64)
    y, se_logits = enc(x)
    y_ref, se_ref, _ = _encoding_by_hand(enc, x, batch_stats=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(se_logits, se_ref)


@pytest.mark.parametrize(
    "spatial_dims, shape, num_classes",
    [(3, (2, 8, 5, 3, 7), 4), (3, (1, 8, 1, 1, 1), None), (2, (2, 8, 9, 4), None), (2, (1, 8, 3, 3), 2)],
)
def test_shapes_and_optional_se_head(spatial_dims, shape, num_classes):
    enc = ContextEncoding(spatial_dims, 8, codewords=4, num_classes=num_classes).train()
    y, se_logits = enc(torch.randn(shape))
    assert y.shape == shape
    assert (y >= 0).all()
    if num_classes is None:
        assert se_logits is None and enc.se_fc is None
    else:
        assert se_logits.shape == (shape[0], num_classes)


def test_initialisation_follows_the_original():
    K, C = 32, 16
    enc = ContextEncoding(3, C, codewords=K)
    bound = 1 / math.sqrt(K * C)
    assert enc.codewords.shape == (K, C)
    assert enc.codewords.abs().max() <= bound
    assert enc.codewords.std() > bound / 4  # uniform over the range, not collapsed to 0
    s = enc.scales
    assert s.shape == (K,)
    assert (s >= 0.1 - 1e-6).all() and (s <= 1.0).all()


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_distances_are_computed_without_a_b_n_k_c_tensor():
    B, C, K, S = 2, 5, 6, (4, 3, 5)
    enc = ContextEncoding(3, C, codewords=K).train()
    x = torch.randn(B, C, *S, requires_grad=True)
    with _LargestTensor() as largest:
        y, _ = enc(x)
        y.sum().backward()
    N = math.prod(S)
    assert largest.numel < B * N * K * C
    assert largest.numel >= B * N * max(K, C)  # the mode did see the (B, N, K) distances


@pytest.mark.parametrize("raw", [-1e4, -100.0, 0.0, 50.0])
def test_scales_stay_positive_whatever_the_raw_parameter(raw):
    enc = ContextEncoding(3, 4, codewords=5, num_classes=2)
    with torch.no_grad():
        enc.raw_scales.fill_(raw)
    assert (enc.scales > 0).all()
    y, se_logits = enc(torch.randn(2, 4, 3, 3, 3))
    assert torch.isfinite(y).all() and torch.isfinite(se_logits).all()


def test_gradients_reach_codewords_scales_fcs_and_norm():
    torch.manual_seed(0)
    enc = ContextEncoding(3, 6, codewords=5, num_classes=3).train()
    x = torch.randn(2, 6, 4, 3, 3)
    label = torch.randint(0, 3, (2, 4, 3, 3))
    y, se_logits = enc(x)
    loss = (y * torch.randn(y.shape)).sum() + se_loss(se_logits, label)
    loss.backward()
    expected = {"codewords", "raw_scales", "fc.weight", "fc.bias", "se_fc.weight", "se_fc.bias", "norm.weight"}
    assert {name for name, _ in enc.named_parameters()} == expected | {"norm.bias"}
    for name, p in enc.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert p.grad.abs().sum() > 0, f"{name} received a zero gradient"


def test_encoding_ignores_autocast():
    # ||x||^2 - 2 x.d + ||d||^2 cancels in half precision, so the encoding keeps the parameters' precision.
    torch.manual_seed(0)
    enc = ContextEncoding(3, 8, codewords=4).eval()
    x = torch.randn(2, 8, 4, 4, 4) * 10
    reference = enc.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = enc.encode(x)
        y, _ = enc(x)
    assert encoded.dtype == torch.float32
    torch.testing.assert_close(encoded, reference)
    assert y.shape == x.shape


# --- SE-loss ------------------------------------------------------------------------------------------------


def _label() -> tuple[torch.Tensor, torch.Tensor]:
    """A (2, 4, 3, 5) label: sample 0 holds classes {0, 2}, sample 1 holds {1, 3, 4}."""
    label = torch.zeros(2, 4, 3, 5, dtype=torch.long)
    label[0, :2] = 2
    label[1] = 1
    label[1, 0, 0, 0] = 3
    label[1, 3, 2, 4] = 4
    presence = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0, 1.0]])
    return label, presence


def _bce_by_hand(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = 1 / (1 + torch.exp(-logits))
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


def test_se_loss_is_bce_against_class_presence():
    label, presence = _label()
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, -3.0], [-0.5, 1.5, 0.2, -2.0, 1.0]], dtype=torch.float64)
    expected = _bce_by_hand(logits, presence.double())
    torch.testing.assert_close(se_loss(logits, label), expected)
    torch.testing.assert_close(se_loss(logits, label, num_classes=5), expected)
    torch.testing.assert_close(se_loss(logits, label[:, None]), expected)  # (B, 1, *S)
    torch.testing.assert_close(se_loss(logits, label.float()), expected)  # float ids, as MONAI loads them
    # The loss is lowest where the logits agree with the presence vector.
    assert se_loss(20 * (2 * presence - 1), label) < 1e-6


@pytest.mark.parametrize(
    "label, num_classes, message",
    [
        (torch.full((2, 3, 3), 5), None, r"label ids must lie in \[0, 5\)"),
        (torch.full((2, 3, 3), -1), None, r"label ids must lie in \[0, 5\)"),
        (torch.zeros(2, 3, 3), 4, "num_classes=4 but logits have 5 columns"),
        (torch.full((2, 3, 3), 0.5), None, "integer class ids"),
        (torch.zeros(3, 3, 3), None, "B=2"),
    ],
)
def test_se_loss_rejects_bad_labels(label, num_classes, message):
    with pytest.raises(ValueError, match=message):
        se_loss(torch.zeros(2, 5), label, num_classes=num_classes)


def test_se_loss_with_the_module_head_trains_the_head():
    torch.manual_seed(0)
    enc = ContextEncoding(2, 4, codewords=3, num_classes=5)
    label, _ = _label()
    _, se_logits = enc(torch.randn(2, 4, 4, 3))
    se_loss(se_logits, label).backward()
    assert enc.se_fc.weight.grad.abs().sum() > 0
    assert enc.fc.weight.grad is None  # the SE head does not pass through the channel attention
