"""The U-Net's three attention plug points as tables: for each kind name, the layer it builds, the arguments the
U-Net gives that layer, and (for context modules) the extra outputs it returns.

A new context module is one entry in CONTEXTS plus its layer file in attention3d/layers/; a new skip or
recalibration kind that follows one of the protocols below is one entry in SKIPS or RECALIBRATIONS. UNetConfig
takes its valid names from these tables, and the U-Net builds and calls whatever an entry describes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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
from attention3d.models.outputs import AuxKind

if TYPE_CHECKING:
    from attention3d.models.unet import UNetConfig


@dataclass(frozen=True)
class Plug:
    """A layer class and its wiring: `wiring(cfg, at)` gives the arguments the U-Net sets, by keyword (`at` is the
    channel count for context and recalibration, the decoder level for skips)."""

    layer: type[nn.Module]
    wiring: Callable[[UNetConfig, int], dict[str, Any]]

    def build(self, cfg: UNetConfig, at: int, **options: Any) -> nn.Module:
        return self.layer(**self.wiring(cfg, at), **options)


@dataclass(frozen=True)
class SkipKind(Plug):
    """A skip-connection module at decoder level i, which merges the skip features (ch[i]) with the coarser
    decoder output (ch[i + 1]) in one of two ways:

    - "gate": `forward(skip, coarser) -> (gated skip, alpha)`; the U-Net then upsamples the coarser output with
      its transposed convolution and concatenates (2 * ch[i] channels into the decoder); alpha (B, 1, *S) is
      what `forward(x, return_gates=True)` returns;
    - "merge": `forward(coarser, skip) -> (B, ch[i], *S)`, the decoder's input in place of upsampling and
      concatenation (the module upsamples by itself).
    """

    mode: Literal["gate", "merge"] = "gate"


@dataclass(frozen=True)
class ContextOutput:
    """An extra output of a context module, in the order its forward returns them after the features.

    With `head`, the output is features (B, channels, *S) that a 1x1(x1) convolution of the U-Net turns into class
    logits; without it, the module returns the auxiliary output itself."""

    name: str
    kind: AuxKind
    head: bool = False


@dataclass(frozen=True)
class ContextKind(Plug):
    """A context module for the deepest level(s): `forward(x)` returns features of x's shape, or a tuple of those
    features followed by one tensor per entry of `outputs`. `cfg.context_kwargs` sets the layer's other options."""

    outputs: tuple[ContextOutput, ...] = ()

    def options(self, cfg: UNetConfig) -> list[str]:
        """The layer's arguments that context_kwargs may set: those the wiring leaves to their defaults."""
        wired = self.wiring(cfg, cfg.channels[-1])
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = inspect.signature(self.layer).parameters.values()
        return [p.name for p in params if p.kind in keyword and p.name not in wired]


def _gate(cfg: UNetConfig, level: int) -> dict[str, Any]:
    stride = cfg.axis_strides()[level]
    ch = cfg.channels
    # The gate's grid is the coarser level's: subsample the skip by the stride between the two levels.
    subsample = stride[0] if len(set(stride)) == 1 else stride
    return {
        "spatial_dims": cfg.spatial_dims,
        "in_channels": ch[level],
        "gating_channels": ch[level + 1],
        "subsample": subsample,
        "norm": cfg.norm,
    }


def _gau(cfg: UNetConfig, level: int) -> dict[str, Any]:
    ch = cfg.channels
    return {
        "spatial_dims": cfg.spatial_dims,
        "high_channels": ch[level + 1],
        "low_channels": ch[level],
        "norm": cfg.norm,
    }


SKIPS: dict[str, SkipKind] = {
    # Oktay et al. 2018 (arXiv:1804.03999): grid attention gates.
    "gate": SkipKind(AttentionGate, _gate, mode="gate"),
    # PAN (Li et al. 2018, arXiv:1805.10180): global attention upsample.
    "gau": SkipKind(GlobalAttentionUpsample, _gau, mode="merge"),
}


def _same_channels(cfg: UNetConfig, channels: int) -> dict[str, Any]:
    """in_channels in, as many out."""
    return {"spatial_dims": cfg.spatial_dims, "in_channels": channels, "out_channels": channels, "norm": cfg.norm}


def _in_channels(cfg: UNetConfig, channels: int) -> dict[str, Any]:
    return {"spatial_dims": cfg.spatial_dims, "in_channels": channels, "norm": cfg.norm}


CONTEXTS: dict[str, ContextKind] = {
    # DANet: its loss also reads class logits of the PAM and CAM branches.
    "dual": ContextKind(
        DualAttentionHead,
        _same_channels,
        outputs=(ContextOutput("pam", "branch_logits", head=True), ContextOutput("cam", "branch_logits", head=True)),
    ),
    "em": ContextKind(
        EMAttention, lambda cfg, channels: {"spatial_dims": cfg.spatial_dims, "channels": channels, "norm": cfg.norm}
    ),
    "nonlocal": ContextKind(NonLocalBlock, _in_channels),
    "psa": ContextKind(PointwiseSpatialAttention, _in_channels),
    "fpa": ContextKind(FeaturePyramidAttention, _same_channels),
    # EncNet: class-presence logits for the SE-loss; its norm stays the layer's own (context_kwargs can set it).
    "encoding": ContextKind(
        ContextEncoding,
        lambda cfg, channels: {"spatial_dims": cfg.spatial_dims, "channels": channels, "num_classes": cfg.out_channels},
        outputs=(ContextOutput("se", "class_presence"),),
    ),
}


def _recalibration(cfg: UNetConfig, channels: int) -> dict[str, Any]:
    return {"spatial_dims": cfg.spatial_dims, "channels": channels}


RECALIBRATIONS: dict[str, Plug] = {
    # Hu et al. 2018 (arXiv:1709.01507), after every conv block.
    "se": Plug(SqueezeExcitation, _recalibration),
    # Roy et al. 2018 (arXiv:1803.02579): concurrent spatial and channel squeeze-excitation.
    "scse": Plug(SpatialChannelSqueezeExcitation, _recalibration),
}
