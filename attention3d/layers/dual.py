"""Dual attention of DANet (Fu et al. 2019, arXiv:1809.02983): position attention (Sec. 3.2, Eqs. 1-2),
channel attention (Sec. 3.3, Eqs. 3-4) and the head that runs both side by side (Sec. 3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attention3d.layers._factory import check_spatial_dims, conv, conv_norm_act


class PositionAttention(nn.Module):
    """DANet's position attention module (PAM).

    With q, k = 1x1x1 convolutions C -> max(1, C // reduction) and v = 1x1x1 convolution C -> C (all with bias),
    every position i aggregates all positions j with its own softmax-normalised row:

        S_ij = softmax_j(q_i . k_j)        (Eq. 1; no 1/sqrt(d) scaling, as in the paper)
        y_i  = gamma * sum_j S_ij v_j + x_i  (Eq. 2; gamma a learned scalar starting at 0)

    Two paths compute the same thing, chosen by the plain attribute `fused` (True by default):

    - fused: `scaled_dot_product_attention(q, k, v, scale=1.0)`, which never materialises the N x N map.
      PyTorch's CPU flash kernel is only taken when q, k and v are 4-d, contiguous and share one head
      dimension; otherwise SDPA silently falls back to the math path, which does build the N x N map
      (9 GiB at 32^3 tokens). q and k are therefore zero-padded along the feature axis to v's width C,
      which leaves every q_i . k_j unchanged, and all three are laid out as contiguous (B, 1, N, C).
    - manual: bmm + softmax, kept as the readable reference; it holds the (B, N, N) map in memory.
    """

    def __init__(self, spatial_dims: int, in_channels: int, reduction: int = 8) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        self.in_channels = in_channels
        self.qk_channels = max(1, in_channels // reduction)
        self.query = conv(spatial_dims, in_channels, self.qk_channels, kernel_size=1, bias=True)
        self.key = conv(spatial_dims, in_channels, self.qk_channels, kernel_size=1, bias=True)
        self.value = conv(spatial_dims, in_channels, in_channels, kernel_size=1, bias=True)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        q = self.query(x).flatten(2)  # (B, C', N) with N = prod(S)
        k = self.key(x).flatten(2)  # (B, C', N)
        v = self.value(x).flatten(2)  # (B, C, N)
        out = self._fused(q, k, v) if self.fused else self._manual(q, k, v)  # (B, C, N)
        return self.gamma * out.reshape(b, c, *x.shape[2:]) + x

    @staticmethod
    def _manual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        energy = torch.bmm(q.transpose(1, 2), k)  # (B, N, N): energy[b, i, j] = q_i . k_j
        attn = torch.softmax(energy, dim=-1)  # row i normalised over j
        # out[:, :, i] = sum_j attn[i, j] v[:, :, j]; without the transpose position i would get column i.
        return torch.bmm(v, attn.transpose(1, 2))  # (B, C, N)

    @staticmethod
    def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c, dtype = v.shape[1], v.dtype
        # SDPA wants q, k and v in one dtype, which autocast or a bf16 value path need not give.
        pad = (0, c - q.shape[1])
        q = F.pad(q.to(dtype).transpose(1, 2), pad).unsqueeze(1).contiguous()  # (B, 1, N, C)
        k = F.pad(k.to(dtype).transpose(1, 2), pad).unsqueeze(1).contiguous()  # (B, 1, N, C)
        v = v.transpose(1, 2).unsqueeze(1).contiguous()  # (B, 1, N, C)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, 1, N, C)
        return out.squeeze(1).transpose(1, 2)  # (B, C, N)


class ChannelAttention(nn.Module):
    """DANet's channel attention module (CAM), as in the authors' code.

    With X the input as (B, C, N) and E = X X^T (B, C, C):

        A = softmax(rowmax(E) - E) over the last axis
        y = gamma * reshape(A X) + x        (Eq. 4; gamma a learned scalar starting at 0)

    A follows the released code rather than Eq. 3's softmax(E): it equals softmax(-E), so a channel draws
    most from the channels least similar to it.

    No convolutions: the channels attend to each other directly, so it takes no constructor arguments.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x.flatten(2)  # (B, C, N) with N = prod(S)
        energy = torch.bmm(feats, feats.transpose(1, 2))  # (B, C, C)
        energy = energy.amax(dim=-1, keepdim=True) - energy  # (B, C, C)
        attn = torch.softmax(energy, dim=-1)
        out = torch.bmm(attn, feats)  # (B, C, N)
        return self.gamma * out.reshape(x.shape) + x


class DualAttentionHead(nn.Module):
    """DANet's head: position and channel attention on parallel branches, summed (Sec. 3.4).

    inter = max(1, in_channels // 4). Each branch is conv3-norm-act (in -> inter) -> attention ->
    conv3-norm-act (inter -> inter). Three classifiers, each channel dropout + 1x1x1 conv inter ->
    out_channels (with bias), read the sum of both branches, the PAM branch and the CAM branch.
    The dropout is nn.Dropout2d / nn.Dropout3d to match `spatial_dims`, as the original's Dropout2d.

    `forward` returns `(fused_out, pam_out, cam_out)`, each (B, out_channels, *S); the two branch outputs
    serve as auxiliary deep-supervision logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        reduction: int = 8,
        norm: str | tuple = "instance",
        act: str | tuple = "relu",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        inter = max(1, in_channels // 4)
        self.inter_channels = inter

        def cna(cin: int, cout: int) -> nn.Sequential:
            return conv_norm_act(spatial_dims, cin, cout, kernel_size=3, norm_name=norm, act_name=act)

        self.pam_in = cna(in_channels, inter)
        self.pam = PositionAttention(spatial_dims, inter, reduction=reduction)
        self.pam_out = cna(inter, inter)
        self.cam_in = cna(in_channels, inter)
        self.cam = ChannelAttention()
        self.cam_out = cna(inter, inter)

        dropout_type = nn.Dropout2d if spatial_dims == 2 else nn.Dropout3d

        def classifier() -> nn.Sequential:
            return nn.Sequential(dropout_type(dropout), conv(spatial_dims, inter, out_channels, 1, bias=True))

        self.head_fused = classifier()
        self.head_pam = classifier()
        self.head_cam = classifier()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pam = self.pam_out(self.pam(self.pam_in(x)))  # (B, inter, *S)
        cam = self.cam_out(self.cam(self.cam_in(x)))  # (B, inter, *S)
        fused = pam + cam
        return self.head_fused(fused), self.head_pam(pam), self.head_cam(cam)
