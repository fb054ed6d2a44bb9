"""seg3d pipeline: everything that touches files, devices and experiments."""

from pipeline.errors import Seg3dError

__all__ = ["Seg3dError"]
