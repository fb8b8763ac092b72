"""tracehook: signed, chained build traces for Nix, enforced inline."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Looked up lazily: importlib.metadata costs ~70 ms at import, and the post-build hook
    # imports this package on every build without ever needing the version.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("tracehook")
        except PackageNotFoundError:  # running from a source tree without installation
            return "0.0.0+unknown"
    raise AttributeError(f"module 'tracehook' has no attribute {name!r}")
