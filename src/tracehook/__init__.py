"""tracehook: signed, chained build traces for Nix, enforced inline."""

from __future__ import annotations

__all__ = ["__version__"]


def _version() -> str:
    """The installed distribution's version, read from its metadata file directly:
    ``importlib.metadata`` costs tens of milliseconds, and every ``tracehook`` command and
    the post-build hook would pay it."""
    import os
    import sys

    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith("tracehook-") and name.endswith(".dist-info"):
                try:
                    with open(os.path.join(entry or ".", name, "METADATA"), "rb") as f:
                        for line in f:
                            if line.startswith(b"Version:"):
                                return line.split(b":", 1)[1].strip().decode()
                except OSError:
                    continue
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tracehook")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    # Looked up lazily: the post-build hook imports this package on every build without
    # ever needing the version.
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'tracehook' has no attribute {name!r}")
