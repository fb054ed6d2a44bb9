"""Attention layers, one idea per file; every class works in 2D and 3D (`spatial_dims` 2 or 3)."""

from attention3d.layers.dual import ChannelAttention, DualAttentionHead, PositionAttention
from attention3d.layers.em import EMAttention
from attention3d.layers.encoding import ContextEncoding, se_loss
from attention3d.layers.gate import AttentionGate
from attention3d.layers.non_local import NonLocalBlock
from attention3d.layers.psa import PointwiseSpatialAttention
from attention3d.layers.pyramid import FeaturePyramidAttention, GlobalAttentionUpsample
from attention3d.layers.squeeze import SpatialChannelSqueezeExcitation, SqueezeExcitation

__all__ = [
    "AttentionGate",
    "ChannelAttention",
    "ContextEncoding",
    "DualAttentionHead",
    "EMAttention",
    "FeaturePyramidAttention",
    "GlobalAttentionUpsample",
    "NonLocalBlock",
    "PointwiseSpatialAttention",
    "PositionAttention",
    "SpatialChannelSqueezeExcitation",
    "SqueezeExcitation",
    "se_loss",
]
