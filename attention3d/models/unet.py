"""One configurable U-Net with three plug points for attention, and its registered variants.

The backbone is the nnU-Net-style U-Net of MONAI's DynUNet blocks (Isensee et al. 2021, arXiv:1809.10486):
two conv-norm-act per level, strided convolution down, transposed convolution up, instance norm.
Attention plugs in at (the kinds and their layers are the tables of attention3d.models.plugs)

- the skip connections (`skip`): Oktay's attention gates ("gate") or PAN's global attention upsample ("gau");
- the deepest level(s) (`context`): DANet ("dual"), EMANet ("em"), non-local ("nonlocal"), PSANet ("psa"),
  PAN's feature pyramid attention ("fpa") or EncNet's context encoding ("encoding");
- every conv block (`recalibration`): squeeze-excitation ("se") or its spatial-and-channel form ("scse").

Output contract:

- eval mode: `forward(x)` returns the logits (B, out_channels, *S) at the input's resolution;
- train mode: a model with auxiliary outputs returns a list whose first element is the main logits, followed
  by one tensor per entry of `model.aux_outputs` (attention3d.models.outputs), each declaring its kind:
  deep-supervision logits ("ds<level>") and DANet branch logits ("pam<level>" / "cam<level>"), all resized to
  the input's resolution, then EncNet class-presence logits ("se<level>", (B, out_channels)) for the SE-loss.
  `model.output_names` lists the same names after "logits". A model without auxiliaries returns the logits;
- `forward(x, return_gates=True)` returns `(output, gates)` with one attention-gate map per gated skip,
  (B, 1, *S) resized to the input's resolution, finest level first (empty for models without gates).

Inputs whose size is not a multiple of the total stride are zero-padded at the far end and the outputs are
cropped back, so any patch size works.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, get_conv_layer
from torch import nn

from attention3d.layers._factory import conv, resize
from attention3d.models._registry import list_models, register_model
from attention3d.models.outputs import AuxOutput
from attention3d.models.plugs import CONTEXTS, RECALIBRATIONS, SKIPS


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
    # MONAI names, alone or with arguments: "batch", ("group", {"num_groups": 4}), ("prelu", {"init": 0.1}).
    norm: str | tuple = "instance"
    act: str | tuple = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
    dropout: float = 0.0
    skip: str | None = None
    context: str | None = None
    context_levels: int = 1  # how many of the deepest levels get the context module
    context_kwargs: dict = field(default_factory=dict)  # the context layer's own options (plugs.ContextKind)
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
        skips, contexts, recalibrations = (None, *SKIPS), (None, *CONTEXTS), (None, *RECALIBRATIONS)
        checks = [
            (self.spatial_dims in (2, 3), f"spatial_dims must be 2 or 3, got {self.spatial_dims}"),
            (levels >= 2, f"channels needs at least 2 levels, got {self.channels}"),
            (
                len(self.strides) == levels - 1,
                f"strides needs one entry per downsampling ({levels - 1}), got {len(self.strides)}",
            ),
            (self.skip in skips, f"skip must be one of {skips}, got {self.skip!r}"),
            (self.context in contexts, f"context must be one of {contexts}, got {self.context!r}"),
            (
                self.recalibration in recalibrations,
                f"recalibration must be one of {recalibrations}, got {self.recalibration!r}",
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
            (
                self.context is not None or not self.context_kwargs,
                f"context_kwargs {self.context_kwargs} set without a context; set context or drop them",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for s in self.strides:
            if isinstance(s, tuple) and len(s) != self.spatial_dims:
                raise ValueError(f"stride {s} needs one entry per spatial axis ({self.spatial_dims})")
        if self.context is not None:
            options = CONTEXTS[self.context].options(self)
            unknown = sorted(set(self.context_kwargs) - set(options))
            if unknown:
                layer = CONTEXTS[self.context].layer.__name__
                raise ValueError(
                    f"context_kwargs {unknown} are not options of context {self.context!r} ({layer}); "
                    f"valid options: {', '.join(options)}"
                )

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
        if cfg.recalibration is not None:
            layers.append(RECALIBRATIONS[cfg.recalibration].build(cfg, out_channels))
        super().__init__(*layers)


class _Context(nn.Module):
    """One context module at one level, returning (features, {its output name: auxiliary output})."""

    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        spec = CONTEXTS[cfg.context]
        self.outputs = spec.outputs
        self.module = spec.build(cfg, channels, **cfg.context_kwargs)
        self.aux_heads = nn.ModuleDict(
            {out.name: conv(cfg.spatial_dims, channels, cfg.out_channels) for out in spec.outputs if out.head}
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.outputs:
            return self.module(x), {}
        features, *extra = self.module(x)
        aux = {}
        for out, tensor in zip(self.outputs, extra, strict=True):
            aux[out.name] = self.aux_heads[out.name](tensor) if out.head else tensor
        return features, aux


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
        skip = SKIPS[cfg.skip] if cfg.skip is not None else None
        self.skip_mode = skip.mode if skip is not None else None
        self.ups = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(levels - 1):
            if self.skip_mode == "merge":
                # The module upsamples by itself and returns ch[i] channels in place of the concatenation.
                self.ups.append(nn.Identity())
            else:
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
            self.skips.append(skip.build(cfg, i) if skip is not None else nn.Identity())
            merged = ch[i] if self.skip_mode == "merge" else 2 * ch[i]
            self.decoders.append(_ConvBlock(cfg, merged, ch[i], 1))

        self.head = conv(cfg.spatial_dims, ch[0], cfg.out_channels)
        self.ds_heads = nn.ModuleDict(
            {str(i): conv(cfg.spatial_dims, ch[i], cfg.out_channels) for i in range(1, 1 + cfg.deep_supervision)}
        )
        aux = [AuxOutput(f"ds{i}", "deep_supervision", level=i) for i in range(1, 1 + cfg.deep_supervision)]
        for level, ctx in self.contexts.items():
            aux += [AuxOutput(f"{out.name}{level}", out.kind, level=int(level), source=out.name) for out in ctx.outputs]
        self.aux_outputs: list[AuxOutput] = aux
        self.output_names = ["logits", *(a.name for a in aux)]

    @property
    def has_aux(self) -> bool:
        return bool(self.aux_outputs)

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
            if self.skip_mode == "merge":
                merged = self.skips[i](h, skip)
            else:
                if self.skip_mode == "gate":
                    skip, alpha = self.skips[i](skip, h)  # gated by the coarser decoder output
                    gates.append(alpha)
                merged = torch.cat([self.ups[i](h), skip], dim=1)
            h = self.decoders[i](merged)
            if self.training and str(i) in self.ds_heads:
                aux[f"ds{i}"] = self.ds_heads[str(i)](h)

        logits = self._crop(self.head(h), size)
        if self.training and self.has_aux:
            outputs = [logits]
            for spec in self.aux_outputs:
                out = aux[spec.name]
                outputs.append(self._crop(resize(out, padded), size) if spec.spatial else out)
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


# Variant name -> the U-Net options it fixes.
_VARIANTS: dict[str, dict[str, Any]] = {}


def unet_config(name: str, **overrides: Any) -> UNetConfig:
    """The UNetConfig that `create_model(name, **overrides)` builds, without building the network: a config file
    is checked with it before anything runs. Raises ValueError for an unknown name or a bad option."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return UNetConfig.from_kwargs(**{**_VARIANTS[name], **overrides})


def unet_variant(**fixed: Any) -> Callable[[Callable[..., UNet]], Callable[..., UNet]]:
    """Register a U-Net variant that fixes the options `fixed`. The decorated function gives the variant its name
    and its docstring (the paper) and has no body; what is registered is `name(**overrides) -> UNet`, whose
    overrides replace `fixed` and the UNetConfig defaults alike."""

    def register(doc: Callable[..., UNet]) -> Callable[..., UNet]:
        @functools.wraps(doc)
        def build(**overrides: Any) -> UNet:
            return UNet(unet_config(doc.__name__, **overrides))

        register_model(build)
        _VARIANTS[doc.__name__] = dict(fixed)
        return build

    return register


@unet_variant()
def unet(**overrides) -> UNet:
    """Plain U-Net, the baseline every attention variant is compared with."""


@unet_variant(skip="gate")
def attention_unet(**overrides) -> UNet:
    """Attention U-Net (Oktay et al. 2018, arXiv:1804.03999): grid attention gates on every skip connection."""


@unet_variant(context="dual")
def danet(**overrides) -> UNet:
    """DANet (Fu et al. 2019, arXiv:1809.02983): position and channel attention at the bottleneck, with the
    PAM and CAM branch logits as auxiliary outputs."""


@unet_variant(context="em")
def emanet(**overrides) -> UNet:
    """EMANet (Li et al. 2019, arXiv:1907.13426): expectation-maximisation attention at the bottleneck."""


@unet_variant(recalibration="se")
def se_unet(**overrides) -> UNet:
    """Squeeze-excitation (Hu et al. 2018, arXiv:1709.01507) after every conv block."""


@unet_variant(context="nonlocal")
def nonlocal_unet(**overrides) -> UNet:
    """Non-local block (Wang et al. 2018, arXiv:1711.07971), embedded Gaussian, at the bottleneck."""


@unet_variant(context="psa")
def psanet(**overrides) -> UNet:
    """PSANet (Zhao et al. 2018): point-wise spatial attention, collect and distribute, at the bottleneck."""


@unet_variant(context="fpa", skip="gau")
def pan(**overrides) -> UNet:
    """PAN (Li et al. 2018, arXiv:1805.10180): feature pyramid attention at the bottleneck and global
    attention upsampling on every skip connection."""


@unet_variant(context="encoding")
def encnet(**overrides) -> UNet:
    """EncNet (Zhang et al. 2018, arXiv:1803.08904): context encoding at the bottleneck, with class-presence
    logits for the SE-loss as an auxiliary output."""
