"""tracehook: signed, chained build traces for Nix, enforced inline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tracehook")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
