"""The Attribution tab: Captum attributions of the instance the Explore tab shows."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as W
import xarray as xr

from .common import STYLE, Log, figure_or_message
from .views import ATTRIBUTION_PLOTS, Selection

NOTE = ("<small>For the run and instance chosen in Explore (the step too, for the layer view). Runs store "
        "attributions with <code>gl.unlearn(..., attribute_at=[0, 10, 20])</code>.</small>")


class AttributionTab(W.VBox):
    """Follows the Explore tab (:meth:`follow` receives its run and selection) and draws the chosen view of
    the attribution table for that instance."""

    def __init__(self, log: Log, show: Callable):
        self.show = show
        self.figure = None
        self._run: xr.Dataset | None = None
        self._selection: Selection | None = None
        self.view = W.ToggleButtons(options=list(ATTRIBUTION_PLOTS), value="tokens", style={"button_width": "150px"})
        self.method = W.Dropdown(options=["integrated_gradients", "feature_ablation"], value="integrated_gradients",
                                 description="method", style=STYLE)
        self.note = W.HTML(NOTE)
        self.image = W.Image(format="png")
        for control in (self.view, self.method):
            control.observe(log.guard("attribution", lambda _: self.draw()), names="value")
        super().__init__([W.HBox([self.view, self.method]), self.note, self.image])

    def follow(self, run: xr.Dataset, selection: Selection) -> None:
        """Show ``run`` at the Explore tab's ``selection``."""
        self._run, self._selection = run, selection
        self.draw()

    def draw(self) -> None:
        """Draw the chosen view for the followed run and instance (nothing before there is one)."""
        if self._run is None or not self._selection.instance:
            return
        plot = ATTRIBUTION_PLOTS[self.view.value]
        self.figure = figure_or_message(plot, self._run, self._selection, self.method.value)
        self.show(self.image, self.figure)
