"""geffect-lab: exact G-effects of LLM unlearning objectives, per instance, layer, token and step."""

from __future__ import annotations

from . import zoo
from .data import Example, World, encode, load_world

__version__ = "0.1.0"

__all__ = ["__version__", "zoo", "load_world", "encode", "Example", "World"]
