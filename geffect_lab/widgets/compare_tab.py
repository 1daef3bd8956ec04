"""The Compare tab: several runs of the store on shared axes."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as W

from .. import plots
from ..results import combine
from .common import STYLE, Log, RunStore


class CompareTab(W.VBox):
    """Pick runs of the shared ``store`` (they must share steps, instances and layers), overlay or facet."""

    def __init__(self, store: RunStore, log: Log, show: Callable):
        self.store, self.show = store, show
        self.figure = None
        self.run_choice = W.SelectMultiple(options=store.names(), description="runs", rows=6, style=STYLE)
        self.kind = W.ToggleButtons(options=["overlay", "facet"], value="overlay")
        self.cumulative = W.Checkbox(value=False, description="cumulative (Σ lr·e)", indent=False)
        self.button = W.Button(description="Compare", icon="columns")
        self.image = W.Image(format="png")
        self.button.on_click(log.guard("compare", lambda _: self.draw()))
        super().__init__([W.HBox([self.run_choice, W.VBox([self.kind, self.cumulative, self.button])]), self.image])

    def offer_runs(self, _added: str | None = None) -> None:
        """Offer the store's runs; when none is chosen yet, choose the first three."""
        names = self.store.names()
        self.run_choice.options = names
        if not self.run_choice.value and names:
            self.run_choice.value = tuple(names[:3])

    def draw(self) -> None:
        """Draw the chosen runs on shared axes."""
        names = list(self.run_choice.value)
        if not names:
            raise ValueError("select at least one run to compare")
        combined = combine({n: self.store.runs[n] for n in names}, dim="objective")
        self.figure = plots.compare(combined, dim="objective", cumulative=self.cumulative.value,
                                    kind=self.kind.value)
        self.show(self.image, self.figure)
