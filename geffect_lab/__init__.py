"""geffect-lab: exact G-effects of LLM unlearning objectives, per instance, layer, token and step."""

from __future__ import annotations

__version__ = "0.1.0"

from . import metrics, objectives, runs, testing, zoo  # noqa: E402
from .data import Example, World, encode, load_world  # noqa: E402
from .engine import g_effect, layer_groups  # noqa: E402
from .memory import auto_chunk_size, estimate_memory  # noqa: E402
from .metrics import evaluate, read_open_unlearning  # noqa: E402
from .objectives import get_objective, list_objectives, objective  # noqa: E402
from .recorder import GEffectRecorder  # noqa: E402
from .results import combine, load, save  # noqa: E402
from .runs import unlearn  # noqa: E402

__all__ = ["__version__", "zoo", "objectives", "runs", "metrics", "testing", "evaluate", "read_open_unlearning",
           "load_world", "encode", "Example", "World", "g_effect", "layer_groups", "get_objective",
           "list_objectives", "objective", "GEffectRecorder", "unlearn", "save", "load", "combine",
           "estimate_memory", "auto_chunk_size"]


def __getattr__(name: str):
    """Front-end pieces load on first use, so the kernel side never imports ipywidgets or seaborn."""
    import importlib

    if name in ("plots", "widgets", "attribution"):
        return importlib.import_module(f".{name}", __name__)
    if name == "Dashboard":
        return importlib.import_module(".widgets", __name__).Dashboard
    raise AttributeError(f"module 'geffect_lab' has no attribute {name!r}")
