"""What every tab of the dashboard shares: the store of runs, the log, and small helpers for figures."""

from __future__ import annotations

import traceback
from collections.abc import Callable

import ipywidgets as W
import xarray as xr

STYLE = {"description_width": "initial"}


class RunStore:
    """The runs the dashboard knows, by unique name, and who to tell when one is added.

    A listener is called with the new run's name after it is stored; the tabs listen to refresh their pickers.
    """

    def __init__(self) -> None:
        self.runs: dict[str, xr.Dataset] = {}
        self._listeners: list[Callable[[str], None]] = []

    def names(self) -> list[str]:
        return list(self.runs)

    def get(self, name: str | None) -> xr.Dataset | None:
        return self.runs.get(name) if name else None

    def listen(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def add(self, ds: xr.Dataset, name: str | None = None) -> str:
        """Store a run under ``name`` (default: its objective), made unique with ``#2``, ``#3``…; returns it."""
        base = name or str(ds.attrs.get("objective", "run"))
        name, k = base, 2
        while name in self.runs:
            name, k = f"{base}#{k}", k + 1
        self.runs[name] = ds
        for listener in self._listeners:
            listener(name)
        return name


class Log:
    """The dashboard's log: an Output widget where the errors of every callback are printed, never lost."""

    def __init__(self) -> None:
        self.output = W.Output(layout=W.Layout(max_height="160px", overflow="auto", border="1px solid #ddd"))

    def write(self, where: str, text: str) -> None:
        self.output.append_stderr(f"[{where}] {text}")

    def report(self, where: str) -> None:
        """Print the exception being handled now."""
        self.write(where, traceback.format_exc())

    def guard(self, where: str, fn: Callable) -> Callable:
        """``fn`` as a widget callback: an exception it raises goes to the log instead of vanishing."""
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception:  # noqa: BLE001  (shown to the user in the log)
                self.report(where)
        return handler


def message_figure(text: str):
    """A figure that only says ``text`` (for a view a run cannot show)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 1.2))
    fig.text(0.02, 0.5, text, va="center", fontsize=10, wrap=True)
    return fig


def figure_or_message(draw: Callable, *args, **kwargs):
    """``draw(*args, **kwargs)``, or a message figure with the reason when the run lacks what it needs (a
    KeyError from :mod:`geffect_lab.plots`)."""
    try:
        return draw(*args, **kwargs)
    except KeyError as err:
        return message_figure(err.args[0] if err.args else str(err))
