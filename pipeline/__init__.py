"""seg3d pipeline: everything that touches files, devices and experiments."""

import time
from importlib.metadata import PackageNotFoundError, version

from pipeline.errors import Seg3dError

STARTED = time.perf_counter()  # about when a seg3d process started (Python's own start is ~0.05 s earlier)

try:
    __version__ = version("seg3d")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["Seg3dError", "__version__"]
