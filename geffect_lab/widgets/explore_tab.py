"""The Explore tab: one run, sliced by view, split, instance, step and layers; one plot from the view table."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as W
import xarray as xr

from ..results import load
from .common import STYLE, Log, RunStore, figure_or_message
from .views import VIEW_PLOTS, VIEWS, Selection


class ExploreTab(W.VBox):
    """Shows a run of the shared ``store`` in the view chosen; after each redraw it tells its followers
    (``follow``) the run and the :class:`Selection`, so other tabs can show the same instance and step."""

    def __init__(self, store: RunStore, log: Log, show: Callable):
        self.store, self.error_log, self.show = store, log, show
        self.figure = None                       # the figure shown now
        self.selection: Selection | None = None  # what it shows
        self._followers: list[Callable[[xr.Dataset, Selection], None]] = []
        self._holding_redraws = False
        self._make_controls()
        self._observe_controls()
        super().__init__([
            W.HBox([self.run_choice, self.load_path, self.load_button]),
            W.HBox([self.view, self.split, self.granularity, self.cumulative]),
            W.HBox([W.VBox([self.instance, self.step]), self.layers]),
            self.instance_text,
            self.image,
        ])

    def _make_controls(self) -> None:
        self.run_choice = W.Dropdown(options=self.store.names(), description="run", style=STYLE)
        self.load_path = W.Text(placeholder="results/npo.nc", description="load", style=STYLE)
        self.load_button = W.Button(description="Load", icon="folder-open")
        self.view = W.Dropdown(options=VIEWS, value="curves", description="view", style=STYLE)
        self.split = W.Dropdown(options=["targeted", "non_targeted"], value="targeted", description="split",
                                style=STYLE)
        self.instance = W.Dropdown(options=[], description="instance", style=STYLE, layout=W.Layout(width="320px"))
        self.instance_text = W.HTML("")
        self.step = W.SelectionSlider(options=[0], value=0, description="step", style=STYLE,
                                      continuous_update=False)
        self.layers = W.SelectMultiple(options=[], description="layers (fine)", rows=4, style=STYLE,
                                       layout=W.Layout(width="230px"))
        self.granularity = W.ToggleButtons(options=["coarse", "fine"], value="coarse",
                                           style={"button_width": "64px"}, layout=W.Layout(width="180px"))
        self.cumulative = W.Checkbox(value=False, description="cumulative (Σ lr·e)", indent=False)
        self.image = W.Image(format="png")

    def _observe_controls(self) -> None:
        guard = self.error_log.guard
        self.load_button.on_click(guard("load", lambda _: self.load_file(self.load_path.value)))
        self.run_choice.observe(guard("run choice", lambda _: self.show_run()), names="value")
        self.split.observe(guard("split", lambda _: self._on_split()), names="value")
        self.instance.observe(guard("instance", lambda _: (self._show_instance(), self.redraw())), names="value")
        for control in (self.view, self.step, self.layers, self.granularity, self.cumulative):
            control.observe(guard("redraw", lambda _: self.redraw()), names="value")

    def follow(self, follower: Callable[[xr.Dataset, Selection], None]) -> None:
        """Call ``follower(run, selection)`` after each redraw."""
        self._followers.append(follower)

    @property
    def current(self) -> xr.Dataset | None:
        """The run chosen now (None while the store is empty)."""
        return self.store.get(self.run_choice.value)

    def load_file(self, path: str) -> str:
        """Load a saved run into the store (which shows it here); returns its name."""
        return self.store.add(load(path), Path(path).stem)

    def on_run_added(self, name: str) -> None:
        """The store has a new run: offer it and show it."""
        self.run_choice.options = self.store.names()
        self.run_choice.value = name

    @contextmanager
    def _redraws_held(self):
        """Set several controls at once and draw once, afterwards."""
        self._holding_redraws = True
        try:
            yield
        finally:
            self._holding_redraws = False
        self.redraw()

    def show_run(self) -> None:
        """Fit the step, layer and instance pickers to the chosen run, and draw it."""
        ds = self.current
        if ds is None:
            return
        steps = [int(s) for s in ds["step"].values]
        with self._redraws_held():
            self.step.options = steps
            self.step.value = steps[0]
            self.layers.options = [str(x) for x in ds["layer"].values]
            self.layers.value = ()
            self._on_split()

    def _on_split(self) -> None:
        ds = self.current
        if ds is None:
            return
        ids = [str(i) for i, s in zip(ds["instance"].values, ds["split"].values) if s == self.split.value]
        self.instance.options = ids
        if ids:
            self.instance.value = ids[0]
        self._show_instance()
        self.redraw()

    def _show_instance(self) -> None:
        ds = self.current
        if ds is None or not self.instance.value:
            self.instance_text.value = ""
            return
        row = ds.sel(instance=self.instance.value)
        self.instance_text.value = f"<b>Q:</b> {row['question'].values}<br><b>A:</b> {row['answer'].values}"

    def _read_selection(self) -> Selection:
        coarse = self.granularity.value == "coarse"
        return Selection(run=self.run_choice.value, view=self.view.value, split=self.split.value,
                         instance=self.instance.value, step=self.step.value, coarse=coarse,
                         layers=list(self.layers.value) or None, cumulative=self.cumulative.value)

    def redraw(self) -> None:
        """Draw the chosen view for the current selection, then tell the followers."""
        ds = self.current
        if self._holding_redraws or ds is None:
            return
        selection = self._read_selection()
        self.figure = figure_or_message(VIEW_PLOTS[selection.view], ds, selection)
        self.selection = selection
        self.show(self.image, self.figure)
        for follower in self._followers:
            follower(ds, selection)
