"""geffect-lab: exact G-effects of LLM unlearning objectives, per instance, layer, token and step."""

from __future__ import annotations

from . import metrics, objectives, runs, schema, testing, zoo
from ._version import __version__
from .data import Example, World, encode, load_world
from .engine import Measurement, g_effect, layer_groups
from .memory import auto_chunk_size, estimate_memory
from .metrics import evaluate, read_open_unlearning
from .objectives import get_objective, list_objectives, objective
from .recorder import GEffectRecorder
from .replay import replay
from .results import combine, load, save
from .runs import RunConfig, unlearn
from .sweep import load_sweep, sweep

__all__ = ["__version__", "zoo", "objectives", "runs", "metrics", "schema", "testing", "evaluate",
           "read_open_unlearning", "load_world", "encode", "Example", "World", "g_effect", "Measurement",
           "layer_groups", "get_objective", "list_objectives", "objective", "GEffectRecorder", "replay", "unlearn",
           "RunConfig",
           "sweep", "load_sweep", "save", "load", "combine", "estimate_memory", "auto_chunk_size"]


_LAZY = ("plots", "widgets", "attribution", "Dashboard")


def __getattr__(name: str):
    """Front-end pieces load on first use, so the kernel side never imports ipywidgets or seaborn."""
    import importlib

    if name in ("plots", "widgets", "attribution"):
        return importlib.import_module(f".{name}", __name__)
    if name == "Dashboard":
        return importlib.import_module(".widgets", __name__).Dashboard
    raise AttributeError(f"module 'geffect_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazy ones included (tab completion shows what ``gl.`` offers, not internals)."""
    return sorted(set(__all__) | set(_LAZY))
