"""qkdctl: hardware-in-the-loop controller for photonic BB84 QKD benches."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("qkdctl")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
