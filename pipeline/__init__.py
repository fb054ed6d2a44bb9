"""seg3d pipeline: everything that touches files, devices and experiments."""

from importlib.metadata import PackageNotFoundError, version

from pipeline.errors import Seg3dError

try:
    __version__ = version("seg3d")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["Seg3dError", "__version__"]
