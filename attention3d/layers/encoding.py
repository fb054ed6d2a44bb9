"""Context Encoding Module and Semantic Encoding loss of EncNet.

Zhang, Dana, Shi, Zhang, Wang, Tyagi, Agrawal, "Context Encoding for Semantic Segmentation", CVPR 2018,
arXiv:1803.08904, Sec. 3 and Fig. 2, in 2D or 3D.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from attention3d.layers._factory import check_spatial_dims
from attention3d.layers._factory import norm as norm_layer

# Floor on the smoothing factors: softplus of a very negative parameter underflows to exactly 0, which
# would make every soft assignment uniform and cut the scales' gradient.
_MIN_SCALE = 1e-6


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))  # log(exp(y) - 1), stable for small and large y


class ContextEncoding(nn.Module):
    """Context Encoding Module (EncNet Sec. 3): an Encoding Layer summarises the whole volume in K
    codewords, and the summary rescales the channels of x (featuremap attention).

    With the rows x_i (i = 1..N, N = prod(S)) of x seen as a set of C-dim features, learnable codewords
    d_k (K x C) and smoothing factors s_k > 0:

        a_ik    = softmax_k(-s_k ||x_i - d_k||^2)
        e_k     = sum_i a_ik (x_i - d_k)                        (B, K, C)
        encoded = mean_k ReLU(norm(e))_k                        (B, C), norm over the K codewords
        gamma   = sigmoid(FC(encoded))                          (B, C)
        y       = ReLU(x + x * gamma)                           gamma broadcast over the grid

    `forward` returns `(y, se_logits)`, where se_logits = FC(encoded) (B, num_classes) feeds `se_loss` (the
    SE-loss, Sec. 3) and is None when `num_classes` is None. `norm` is a 1D norm over the K codewords on
    (B, K, C), BatchNorm1d(K) for "batch" as in the original; it works at batch size 1 because every
    codeword has C values.

    The smoothing factors are s = softplus(raw) + 1e-6, positive whatever raw becomes; they start in
    [0.1, 1), codewords uniform in +-1/sqrt(K*C) as in the original code. The distances are expanded as
    ||x||^2 - 2 x.d + ||d||^2, so (B, N, K, C) is never built; the encoding runs in the parameters' precision
    with autocast off, because that expansion cancels badly in half precision.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        codewords: int = 32,
        num_classes: int | None = None,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if codewords < 1:
            raise ValueError(f"codewords must be >= 1, got {codewords}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        self.channels = channels
        self.num_codewords = codewords
        self.num_classes = num_classes
        self.codewords = nn.Parameter(torch.empty(codewords, channels))  # (K, C)
        self.raw_scales = nn.Parameter(torch.empty(codewords))  # (K,), s = softplus(raw) + _MIN_SCALE
        self.norm = norm_layer(norm, 1, codewords)  # 1D norm with K features on (B, K, C)
        self.fc = nn.Linear(channels, channels)
        self.se_fc = nn.Linear(channels, num_classes) if num_classes is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.num_codewords * self.channels)
        with torch.no_grad():
            self.codewords.uniform_(-bound, bound)
            scales = torch.empty_like(self.raw_scales).uniform_(0.1, 1.0)
            self.raw_scales.copy_(_inverse_softplus(scales - _MIN_SCALE))

    @property
    def scales(self) -> torch.Tensor:
        """The smoothing factors s_k, shape (K,), always > 0."""
        return F.softplus(self.raw_scales) + _MIN_SCALE

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoded context vector mean_k ReLU(norm(e))_k of x (B, C, *S), shape (B, C)."""
        dtype = self.codewords.dtype
        device_type = x.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            rows = x.flatten(2).transpose(1, 2).to(dtype)  # (B, N, C), N = prod(S)
            d = self.codewords  # (K, C)
            dist = (
                rows.pow(2).sum(-1, keepdim=True)  # (B, N, 1)
                - 2.0 * rows @ d.t()  # (B, N, K)
                + d.pow(2).sum(-1)  # (K,)
            )  # (B, N, K): ||x_i - d_k||^2
            assign = torch.softmax(-self.scales * dist, dim=-1)  # (B, N, K), a_ik
            # sum_i a_ik (x_i - d_k) = sum_i a_ik x_i - (sum_i a_ik) d_k
            e = assign.transpose(1, 2) @ rows - assign.sum(1).unsqueeze(-1) * d  # (B, K, C)
            return F.relu(self.norm(e)).mean(1)  # (B, C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoded = self.encode(x)  # (B, C)
        gamma = torch.sigmoid(self.fc(encoded))  # (B, C)
        gamma = gamma.reshape(*gamma.shape, *([1] * (x.ndim - 2))).to(x.dtype)  # (B, C, 1, ...)
        y = F.relu(x + x * gamma)
        se_logits = self.se_fc(encoded) if self.se_fc is not None else None  # (B, num_classes)
        return y, se_logits


def se_loss(logits: torch.Tensor, label: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Semantic Encoding loss (EncNet Sec. 3): binary cross-entropy, averaged over batch and classes, between
    `logits` (B, num_classes) and the presence of each class anywhere in `label` (B, *S) or (B, 1, *S), which
    holds integer class ids (a float label with whole values is accepted, as MONAI's loaders give).

    Raises ValueError for label ids outside [0, num_classes) or shapes that do not match.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, num_classes), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1] if num_classes is None else num_classes
    if num_classes != logits.shape[1]:
        raise ValueError(f"num_classes={num_classes} but logits have {logits.shape[1]} columns")
    if label.ndim < 2 or label.shape[0] != logits.shape[0]:
        raise ValueError(
            f"label must be (B, *S) or (B, 1, *S) with B={logits.shape[0]}, got shape {tuple(label.shape)}"
        )
    if label.is_floating_point() and not torch.equal(label, label.round()):
        raise ValueError("label must hold integer class ids, got non-integer values")
    ids = label.reshape(label.shape[0], -1).long()  # (B, prod(S)); a channel axis of 1 flattens away
    if ids.numel() > 0:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"label ids must lie in [0, {num_classes}), got values in [{low}, {high}]")
    present = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)  # (B, num_classes)
    present.scatter_(1, ids.to(logits.device), 1.0)
    return F.binary_cross_entropy_with_logits(logits, present)
