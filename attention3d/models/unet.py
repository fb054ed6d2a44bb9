"""One configurable U-Net with three plug points for attention, and its registered variants.

The backbone is the nnU-Net-style U-Net of MONAI's DynUNet blocks (Isensee et al. 2021, arXiv:1809.10486):
two conv-norm-act per level, strided convolution down, transposed convolution up, instance norm.
Attention plugs in at

- the skip connections (`skip`): Oktay's attention gates ("gate") or PAN's global attention upsample ("gau");
- the deepest level(s) (`context`): DANet ("dual"), EMANet ("em"), non-local ("nonlocal"), PSANet ("psa"),
  PAN's feature pyramid attention ("fpa") or EncNet's context encoding ("encoding");
- every conv block (`recalibration`): squeeze-excitation ("se") or its spatial-and-channel form ("scse").

Output contract:

- eval mode: `forward(x)` returns the logits (B, out_channels, *S) at the input's resolution;
- train mode: a model with auxiliary outputs returns a list whose first element is the main logits, followed
  by the auxiliaries named in `model.output_names[1:]`: "ds<level>" deep-supervision logits and "pam<level>" /
  "cam<level>" DANet branch logits, all resized to the input's resolution, then "se<level>" EncNet
  class-presence logits (B, out_channels) for the SE-loss. A model without auxiliaries returns the logits;
- `forward(x, return_gates=True)` returns `(output, gates)` with one attention-gate map per gated skip,
  (B, 1, *S) resized to the input's resolution, finest level first (empty for models without gates).

Inputs whose size is not a multiple of the total stride are zero-padded at the far end and the outputs are
cropped back, so any patch size works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, get_conv_layer
from torch import nn

from attention3d.layers import (
    AttentionGate,
    ContextEncoding,
    DualAttentionHead,
    EMAttention,
    FeaturePyramidAttention,
    GlobalAttentionUpsample,
    NonLocalBlock,
    PointwiseSpatialAttention,
    SpatialChannelSqueezeExcitation,
    SqueezeExcitation,
)
from attention3d.layers._factory import conv, resize
from attention3d.models._registry import register_model

SKIPS = (None, "gate", "gau")
CONTEXTS = (None, "dual", "em", "nonlocal", "psa", "fpa", "encoding")
RECALIBRATIONS = (None, "se", "scse")


@dataclass
class UNetConfig:
    """Everything that defines a U-Net; stored beside trained weights so inference rebuilds the same net."""

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 3
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    # One stride per downsampling (len(channels) - 1); each an int or one int per axis (anisotropic CT).
    strides: tuple[int | tuple[int, ...], ...] = (2, 2, 2, 2)
    kernel_size: int = 3
    norm: str | tuple = "instance"
    act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
    dropout: float = 0.0
    skip: str | None = None
    context: str | None = None
    context_levels: int = 1  # how many of the deepest levels get the context module
    context_kwargs: dict = field(default_factory=dict)
    recalibration: str | None = None
    deep_supervision: int = 0  # number of coarser decoder levels with their own logits in training

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.strides = tuple(tuple(s) if isinstance(s, (list, tuple)) else int(s) for s in self.strides)
        if isinstance(self.norm, list):
            self.norm = tuple(self.norm)
        if isinstance(self.act, list):
            self.act = tuple(self.act)
        levels = len(self.channels)
        checks = [
            (self.spatial_dims in (2, 3), f"spatial_dims must be 2 or 3, got {self.spatial_dims}"),
            (levels >= 2, f"channels needs at least 2 levels, got {self.channels}"),
            (
                len(self.strides) == levels - 1,
                f"strides needs one entry per downsampling ({levels - 1}), got {len(self.strides)}",
            ),
            (self.skip in SKIPS, f"skip must be one of {SKIPS}, got {self.skip!r}"),
            (self.context in CONTEXTS, f"context must be one of {CONTEXTS}, got {self.context!r}"),
            (
                self.recalibration in RECALIBRATIONS,
                f"recalibration must be one of {RECALIBRATIONS}, got {self.recalibration!r}",
            ),
            (
                0 <= self.context_levels <= levels,
                f"context_levels must be in 0..{levels}, got {self.context_levels}",
            ),
            (
                0 <= self.deep_supervision <= levels - 2,
                f"deep_supervision must be in 0..{levels - 2}, got {self.deep_supervision}",
            ),
            (self.kernel_size % 2 == 1, f"kernel_size must be odd, got {self.kernel_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for s in self.strides:
            if isinstance(s, tuple) and len(s) != self.spatial_dims:
                raise ValueError(f"stride {s} needs one entry per spatial axis ({self.spatial_dims})")

    def axis_strides(self) -> list[tuple[int, ...]]:
        """Each downsampling's stride as one int per axis."""
        return [s if isinstance(s, tuple) else (s,) * self.spatial_dims for s in self.strides]

    def total_stride(self) -> tuple[int, ...]:
        """The factor every input axis is padded to a multiple of."""
        return tuple(math.prod(axis) for axis in zip(*self.axis_strides()))

    @classmethod
    def from_kwargs(cls, **kwargs) -> UNetConfig:
        """Like the constructor, but an unknown key is a ValueError naming it and the valid keys."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ValueError(f"unknown U-Net option(s) {unknown}; valid options: {', '.join(sorted(valid))}")
        return cls(**kwargs)


class _ConvBlock(nn.Sequential):
    """Two conv-norm-act (the first may stride), then optional channel recalibration."""

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int, stride: int | tuple[int, ...]):
        layers: list[nn.Module] = [
            UnetBasicBlock(
                cfg.spatial_dims,
                in_channels,
                out_channels,
                kernel_size=cfg.kernel_size,
                stride=stride,
                norm_name=cfg.norm,
                act_name=cfg.act,
                dropout=cfg.dropout or None,
            )
        ]
        if cfg.recalibration == "se":
            layers.append(SqueezeExcitation(cfg.spatial_dims, out_channels))
        elif cfg.recalibration == "scse":
            layers.append(SpatialChannelSqueezeExcitation(cfg.spatial_dims, out_channels))
        super().__init__(*layers)


class _Context(nn.Module):
    """Adapts one context module to a common return: (features, {aux name: aux output})."""

    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        self.kind = cfg.context
        d, kw = cfg.spatial_dims, dict(cfg.context_kwargs)
        if self.kind == "dual":
            self.module = DualAttentionHead(d, channels, channels, norm=cfg.norm, **kw)
            # DANet's auxiliary losses need class logits from each branch.
            self.aux_heads = nn.ModuleDict(
                {"pam": conv(d, channels, cfg.out_channels), "cam": conv(d, channels, cfg.out_channels)}
            )
        elif self.kind == "em":
            self.module = EMAttention(d, channels, norm=cfg.norm, **kw)
        elif self.kind == "nonlocal":
            self.module = NonLocalBlock(d, channels, norm=cfg.norm, **kw)
        elif self.kind == "psa":
            self.module = PointwiseSpatialAttention(d, channels, norm=cfg.norm, **kw)
        elif self.kind == "fpa":
            self.module = FeaturePyramidAttention(d, channels, channels, norm=cfg.norm, **kw)
        elif self.kind == "encoding":
            self.module = ContextEncoding(d, channels, num_classes=cfg.out_channels, **kw)
        else:
            raise ValueError(f"unknown context {self.kind!r}")

    def aux_names(self) -> list[str]:
        return {"dual": ["pam", "cam"], "encoding": ["se"]}.get(self.kind, [])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "dual":
            fused, pam, cam = self.module(x)
            return fused, {"pam": self.aux_heads["pam"](pam), "cam": self.aux_heads["cam"](cam)}
        if self.kind == "encoding":
            y, se_logits = self.module(x)
            return y, {"se": se_logits}
        return self.module(x), {}


class UNet(nn.Module):
    """A U-Net with pluggable attention; see the module docstring for the plug points and output contract."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, strides, levels = cfg.channels, cfg.axis_strides(), len(cfg.channels)

        self.encoders = nn.ModuleList(
            [_ConvBlock(cfg, cfg.in_channels, ch[0], 1)]
            + [_ConvBlock(cfg, ch[i - 1], ch[i], strides[i - 1]) for i in range(1, levels)]
        )
        context_levels = range(levels - cfg.context_levels, levels) if cfg.context else range(0)
        self.contexts = nn.ModuleDict({str(i): _Context(cfg, ch[i]) for i in context_levels})

        # Decoder level i (0 = finest) merges the level-(i+1) output with the level-i skip.
        self.ups = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(levels - 1):
            if cfg.skip == "gau":
                # GAU carries its own learned upsampling and returns ch[i] channels in place of the concat.
                self.ups.append(nn.Identity())
                self.skips.append(GlobalAttentionUpsample(cfg.spatial_dims, ch[i + 1], ch[i], norm=cfg.norm))
                self.decoders.append(_ConvBlock(cfg, ch[i], ch[i], 1))
                continue
            self.ups.append(
                get_conv_layer(
                    cfg.spatial_dims,
                    ch[i + 1],
                    ch[i],
                    kernel_size=strides[i],
                    stride=strides[i],
                    conv_only=True,
                    is_transposed=True,
                )
            )
            if cfg.skip == "gate":
                stride = strides[i]
                subsample = stride[0] if len(set(stride)) == 1 else stride
                self.skips.append(AttentionGate(cfg.spatial_dims, ch[i], ch[i + 1], subsample=subsample, norm=cfg.norm))
            else:
                self.skips.append(nn.Identity())
            self.decoders.append(_ConvBlock(cfg, 2 * ch[i], ch[i], 1))

        self.head = conv(cfg.spatial_dims, ch[0], cfg.out_channels)
        self.ds_heads = nn.ModuleDict(
            {str(i): conv(cfg.spatial_dims, ch[i], cfg.out_channels) for i in range(1, 1 + cfg.deep_supervision)}
        )
        aux = [f"ds{i}" for i in range(1, 1 + cfg.deep_supervision)]
        aux += [f"{name}{level}" for level, ctx in self.contexts.items() for name in ctx.aux_names()]
        self.output_names = ["logits", *aux]

    @property
    def has_aux(self) -> bool:
        return len(self.output_names) > 1

    def forward(self, x: torch.Tensor, return_gates: bool = False):
        cfg = self.config
        if x.ndim != cfg.spatial_dims + 2 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"expected input (B, {cfg.in_channels}, {cfg.spatial_dims} spatial axes), got {tuple(x.shape)}"
            )
        size = tuple(x.shape[2:])
        x = self._pad(x)
        padded = tuple(x.shape[2:])

        skips: list[torch.Tensor] = []
        aux: dict[str, torch.Tensor] = {}
        h = x
        for level, encoder in enumerate(self.encoders):
            h = encoder(h)
            if str(level) in self.contexts:
                h, extra = self.contexts[str(level)](h)
                aux.update({f"{name}{level}": out for name, out in extra.items()})
            skips.append(h)

        gates: list[torch.Tensor] = []
        h = skips.pop()
        for i in reversed(range(len(self.decoders))):
            skip = skips[i]
            if cfg.skip == "gau":
                merged = self.skips[i](h, skip)
            else:
                if cfg.skip == "gate":
                    skip, alpha = self.skips[i](skip, h)  # gated by the coarser decoder output
                    gates.append(alpha)
                merged = torch.cat([self.ups[i](h), skip], dim=1)
            h = self.decoders[i](merged)
            if self.training and str(i) in self.ds_heads:
                aux[f"ds{i}"] = self.ds_heads[str(i)](h)

        logits = self._crop(self.head(h), size)
        if self.training and self.has_aux:
            outputs = [logits]
            for name in self.output_names[1:]:
                out = aux[name]
                outputs.append(self._crop(resize(out, padded), size) if out.ndim > 2 else out)
        else:
            outputs = logits
        if return_gates:
            gates = [self._crop(resize(alpha, padded), size) for alpha in reversed(gates)]
            return outputs, gates
        return outputs

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        total = self.config.total_stride()
        extra = [(-s) % t for s, t in zip(x.shape[2:], total)]
        if not any(extra):
            return x
        # F.pad lists (before, after) pairs from the last axis backwards.
        pad = [p for e in reversed(extra) for p in (0, e)]
        return F.pad(x, pad)

    @staticmethod
    def _crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return x[(..., *(slice(0, s) for s in size))]


def _build(fixed: dict, overrides: dict) -> UNet:
    return UNet(UNetConfig.from_kwargs(**{**fixed, **overrides}))


@register_model
def unet(**overrides) -> UNet:
    """Plain U-Net, the baseline every attention variant is compared with."""
    return _build({}, overrides)


@register_model
def attention_unet(**overrides) -> UNet:
    """Attention U-Net (Oktay et al. 2018, arXiv:1804.03999): grid attention gates on every skip connection."""
    return _build({"skip": "gate"}, overrides)


@register_model
def danet(**overrides) -> UNet:
    """DANet (Fu et al. 2019, arXiv:1809.02983): position and channel attention at the bottleneck, with the
    PAM and CAM branch logits as auxiliary outputs."""
    return _build({"context": "dual"}, overrides)


@register_model
def emanet(**overrides) -> UNet:
    """EMANet (Li et al. 2019, arXiv:1907.13426): expectation-maximisation attention at the bottleneck."""
    return _build({"context": "em"}, overrides)


@register_model
def se_unet(**overrides) -> UNet:
    """Squeeze-excitation (Hu et al. 2018, arXiv:1709.01507) after every conv block."""
    return _build({"recalibration": "se"}, overrides)


@register_model
def nonlocal_unet(**overrides) -> UNet:
    """Non-local block (Wang et al. 2018, arXiv:1711.07971), embedded Gaussian, at the bottleneck."""
    return _build({"context": "nonlocal"}, overrides)


@register_model
def psanet(**overrides) -> UNet:
    """PSANet (Zhao et al. 2018): point-wise spatial attention, collect and distribute, at the bottleneck."""
    return _build({"context": "psa"}, overrides)


@register_model
def pan(**overrides) -> UNet:
    """PAN (Li et al. 2018, arXiv:1805.10180): feature pyramid attention at the bottleneck and global
    attention upsampling on every skip connection."""
    return _build({"context": "fpa", "skip": "gau"}, overrides)


@register_model
def encnet(**overrides) -> UNet:
    """EncNet (Zhang et al. 2018, arXiv:1803.08904): context encoding at the bottleneck, with class-presence
    logits for the SE-loss as an auxiliary output."""
    return _build({"context": "encoding"}, overrides)
