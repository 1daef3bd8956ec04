"""``gl.Dashboard``: run objectives and slice their G-effects in JupyterLab without writing plotting code.

>>> dash = gl.Dashboard()                               # the bundled world and the zoo's target model
>>> dash = gl.Dashboard(runs={"npo": gl.load("npo.nc")})  # or explore saved runs
>>> dash                                                 # shows itself in a notebook cell

Four tabs: **Run** (an objective from the registry, parameter widgets made from its signature, a
regulariser and its weight, the forget split, steps, learning rate, optimiser, Run / Stop, a progress bar and
a plot that updates as steps are recorded), **Explore** (a run, a view, a split, an instance with its question
and answer, a step, layers, coarse / fine, cumulative), **Compare** (several runs on shared axes) and
**Attribution** (Captum attributions of the selected instance's answer: tokens, layers beside the layer
G-effect, before / after). Every view is one call of :mod:`geffect_lab.plots`; the widgets only call plain
functions. Errors raised in any callback are printed in the dashboard's log, never lost.

How it is built: one class per tab (:mod:`.run_tab`, :mod:`.explore_tab`, :mod:`.compare_tab`,
:mod:`.attribution_tab`), each a widget box. The :class:`Dashboard` builds them and wires them explicitly: they
share a :class:`~.common.RunStore` (a run added anywhere is offered everywhere) and a :class:`~.common.Log`, and
the Attribution tab follows the Explore tab's selection. Views come from tables in :mod:`.views`
(a view's name → a function of the run and the selection that returns a Figure).

Threads: the Run tab trains in a background thread, which never touches a widget. It posts its progress, live
figures and result on a thread-safe queue (:mod:`.background`), and the widgets are updated on the kernel
thread: in a Jupyter kernel by the kernel's own asyncio loop (``call_soon_threadsafe``, woken at each message,
so the tab updates live while the kernel is idle; that loop runs cells and widget callbacks, so it is the
thread ipywidgets expect); without a running loop (plain Python, pytest) by :meth:`Dashboard.wait`, which
handles the messages as they arrive, or at the next ``start_run``. One mechanism, two places that drain it:
no polling timer, nothing that needs a loop where there is none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import ipywidgets as W
import xarray as xr

from .. import plots
from ..results import load
from .attribution_tab import AttributionTab
from .common import Log, RunStore
from .compare_tab import CompareTab
from .explore_tab import ExploreTab
from .run_tab import RunTab
from .views import VIEWS

__all__ = ["Dashboard", "VIEWS"]

HEADER = ("<b>geffect-lab</b> · G-effects of unlearning objectives "
          "<span style='color:#666'>(dR ≈ −lr·e: a negative G-effect raises the risk)</span>")


def _named_runs(runs) -> list[tuple[str | None, xr.Dataset]]:
    """``runs`` (a Dataset, a list, or a mapping name → Dataset or path) as (name or None, Dataset) pairs."""
    if runs is None:
        return []
    if isinstance(runs, xr.Dataset):
        runs = [runs]
    items = runs.items() if isinstance(runs, Mapping) else [(None, r) for r in runs]
    pairs = []
    for name, run in items:
        if isinstance(run, (str, Path)):
            name, run = name or Path(run).stem, load(run)
        pairs.append((name, run))
    return pairs


class Dashboard:
    """The ipywidgets dashboard (see the module docstring). ``runs``: a Dataset, a list or a mapping
    name → Dataset or path of saved runs; ``model``/``tokenizer``/``world`` feed the Run tab (default: the
    zoo's ``target`` and the bundled world, loaded on the first run)."""

    def __init__(self, runs=None, *, model=None, tokenizer=None, world=None, dpi: int = 80):
        self.dpi = dpi
        self.store = RunStore()
        for name, run in _named_runs(runs):
            self.store.add(run, name)
        log = Log()
        self.log = log.output
        self.run_tab = RunTab(self.store, log, self._show, model=model, tokenizer=tokenizer, world=world)
        self.explore_tab = ExploreTab(self.store, log, self._show)
        self.compare_tab = CompareTab(self.store, log, self._show)
        self.attribution_tab = AttributionTab(log, self._show)
        self.explore_tab.follow(self.attribution_tab.follow)
        self.store.listen(self.explore_tab.on_run_added)
        self.store.listen(self.compare_tab.offer_runs)
        self.tabs = W.Tab(children=[self.run_tab, self.explore_tab, self.compare_tab, self.attribution_tab])
        for i, title in enumerate(("Run", "Explore", "Compare", "Attribution")):
            self.tabs.set_title(i, title)
        self.widget = W.VBox([W.HTML(HEADER), self.tabs, W.HTML("<small>log</small>"), self.log])
        self.compare_tab.offer_runs()
        if self.store.runs:
            self.tabs.selected_index = 1
            self.explore_tab.show_run()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _show(self, image: W.Image, fig) -> None:
        """Put a figure into an image widget at its natural size (not stretched to the page)."""
        image.width = str(int(fig.get_figwidth() * self.dpi))
        image.value = plots.figure_png(fig, self.dpi)

    # ------------------------------------------------------------------ runs and views
    @property
    def runs(self) -> dict[str, xr.Dataset]:
        return self.store.runs

    def add_run(self, ds: xr.Dataset, name: str | None = None) -> str:
        """Add a run (a results Dataset) under a unique name; returns the name."""
        return self.store.add(ds, name)

    def load_file(self, path: str) -> str:
        """Load a saved run into the dashboard and show it."""
        return self.explore_tab.load_file(path)

    @property
    def current(self) -> xr.Dataset | None:
        return self.explore_tab.current

    @property
    def selection(self) -> dict:
        """What the Explore tab shows (run, view, split, instance, step, coarse, layers, cumulative)."""
        shown = self.explore_tab.selection
        return asdict(shown) if shown is not None else {}

    def redraw(self) -> None:
        """Draw the Explore tab's view for the current selection."""
        self.explore_tab.redraw()

    def draw_attribution(self) -> None:
        """Draw the Attribution tab for the Explore tab's run, instance and step."""
        self.attribution_tab.draw()

    def draw_compare(self) -> None:
        """Draw the selected runs on shared axes (they must share steps, instances and layers)."""
        self.compare_tab.draw()

    def load_sweep(self, folder) -> list[str]:
        """Add the finished runs of a ``gl.sweep`` folder (named by their varied settings); returns the names."""
        return self.compare_tab.load_sweep(folder)

    # ------------------------------------------------------------------ the Run tab
    def refresh_registry(self) -> None:
        """Offer objectives registered since the dashboard was built."""
        self.run_tab.refresh_registry()

    def run_config(self) -> dict:
        """What the Run button would run: objective string, parameters and options."""
        return self.run_tab.run_config()

    def start_run(self) -> None:
        """Start ``gl.unlearn`` in a background thread (the kernel stays free for Stop and redraws)."""
        self.run_tab.start_run()

    def stop(self) -> None:
        """Ask the running unlearning to stop after its current step."""
        self.run_tab.stop()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current run has finished, updating the widgets meanwhile (for scripts and tests)."""
        self.run_tab.wait(timeout)


# The dashboard's attribute → (the tab that holds it, its name there): the controls and figures keep the
# names they had before the tabs were split out (``dash.view``, ``dash.compare_runs``, ``dash.model`` …).
FORWARDED = {
    **{name: ("run_tab", name) for name in (
        "model", "tokenizer", "world", "live_figure", "objective", "refresh_objectives", "params_box",
        "param_widgets", "regulariser", "reg_weight", "forget", "steps", "lr", "optimizer", "run_button",
        "stop_button", "progress", "status", "live")},
    **{name: ("explore_tab", name) for name in (
        "load_path", "load_button", "view", "split", "instance", "instance_text", "step", "layers", "granularity",
        "cumulative", "figure")},
    "explore_run": ("explore_tab", "run_choice"), "explore_image": ("explore_tab", "image"),
    "compare_runs": ("compare_tab", "run_choice"), "compare_kind": ("compare_tab", "kind"),
    "compare_cumulative": ("compare_tab", "cumulative"), "compare_button": ("compare_tab", "button"),
    "compare_image": ("compare_tab", "image"), "compare_figure": ("compare_tab", "figure"),
    "attribution_view": ("attribution_tab", "view"), "attribution_method": ("attribution_tab", "method"),
    "attribution_note": ("attribution_tab", "note"), "attribution_image": ("attribution_tab", "image"),
    "attribution_figure": ("attribution_tab", "figure"),
}


def _forwarded(tab: str, name: str) -> property:
    return property(lambda dash: getattr(getattr(dash, tab), name),
                    lambda dash, value: setattr(getattr(dash, tab), name, value),
                    doc=f"``{tab}.{name}``")


for _attribute, (_tab, _name) in FORWARDED.items():
    setattr(Dashboard, _attribute, _forwarded(_tab, _name))
del _attribute, _tab, _name
