"""attention3d: 3D attention layers and one configurable U-Net that hosts them."""

from attention3d.layers import (
    AttentionGate,
    ChannelAttention,
    ContextEncoding,
    DualAttentionHead,
    EMAttention,
    FeaturePyramidAttention,
    GlobalAttentionUpsample,
    NonLocalBlock,
    PointwiseSpatialAttention,
    PositionAttention,
    SpatialChannelSqueezeExcitation,
    SqueezeExcitation,
    se_loss,
)
from attention3d.models import AuxOutput, UNet, UNetConfig, create_model, list_models, register_model, unet_config

__all__ = [
    "AttentionGate",
    "AuxOutput",
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
    "UNet",
    "UNetConfig",
    "create_model",
    "list_models",
    "register_model",
    "se_loss",
    "unet_config",
]
