"""One configurable U-Net, the tables of its attention plug points, and the registry of its variants."""

from attention3d.models._registry import create_model, list_models, register_model
from attention3d.models.outputs import AUX_KINDS, AuxOutput
from attention3d.models.plugs import CONTEXTS, RECALIBRATIONS, SKIPS
from attention3d.models.unet import UNet, UNetConfig, unet_config, unet_variant

__all__ = [
    "AUX_KINDS",
    "CONTEXTS",
    "RECALIBRATIONS",
    "SKIPS",
    "AuxOutput",
    "UNet",
    "UNetConfig",
    "create_model",
    "list_models",
    "register_model",
    "unet_config",
    "unet_variant",
]
