"""One configurable U-Net and the registry of its attention variants."""

from attention3d.models._registry import create_model, list_models, register_model
from attention3d.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "create_model", "list_models", "register_model"]
