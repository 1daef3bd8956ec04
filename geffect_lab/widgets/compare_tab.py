"""The Compare tab: several runs of the store on shared axes."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as W

from .. import plots
from ..results import combine
from ..sweep import load_sweep
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
        self.sweep_folder = W.Text(placeholder="a gl.sweep folder", description="sweep", style=STYLE)
        self.sweep_button = W.Button(description="Load sweep", icon="folder-open")
        self.sweep_button.on_click(log.guard("load sweep", lambda _: self.load_sweep(self.sweep_folder.value)))
        super().__init__([W.HBox([self.sweep_folder, self.sweep_button]),
                          W.HBox([self.run_choice, W.VBox([self.kind, self.cumulative, self.button])]), self.image])

    def load_sweep(self, folder) -> list[str]:
        """Add every finished run of a sweep folder to the store, named by the settings it varies."""
        sweep = load_sweep(folder)
        per_run = [c for c in sweep.coords if sweep[c].dims == ("run",)]
        varied = [c for c in per_run if c not in ("run", "run_name")]
        names = []
        for i in range(sweep.sizes["run"]):
            one = sweep.isel(run=i)
            label = " ".join(f"{c}={one[c].item()}" for c in varied) or str(one["run_name"].item())
            names.append(self.store.add(one.drop_vars(per_run), label))
        self.run_choice.value = tuple(names[:3])
        return names

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
