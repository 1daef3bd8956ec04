"""The package version, read once from the installed package's metadata (pyproject.toml is its one source)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geffect-lab")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
