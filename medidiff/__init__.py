"""medidiff: conditional diffusion for MRI super-resolution and reconstruction."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medidiff")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
