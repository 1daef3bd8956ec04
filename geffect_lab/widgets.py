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
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Mapping
from pathlib import Path

import ipywidgets as W
import xarray as xr

from . import plots
from .objectives import get_objective, list_objectives
from .results import combine, load

__all__ = ["Dashboard", "VIEWS"]

VIEWS = ("curves", "heatmap", "distributions", "PG-effect scatter", "tokens", "metrics", "trajectory")


def _message_figure(text: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 1.2))
    fig.text(0.02, 0.5, text, va="center", fontsize=10, wrap=True)
    return fig


def _param_widget(name: str, param) -> W.Widget:
    """A widget for one objective parameter, from its default and annotation."""
    default = None if param.default is param.empty else param.default
    ann = str(param.annotation)
    style = {"description_width": "initial"}
    if isinstance(default, bool) or "bool" in ann:
        return W.Checkbox(value=bool(default), description=name, style=style, indent=False)
    if isinstance(default, int) or ("int" in ann and "float" not in ann):
        return W.IntText(value=0 if default is None else int(default), description=name, style=style,
                         layout=W.Layout(width="180px"))
    if isinstance(default, float) or "float" in ann:
        return W.FloatText(value=0.0 if default is None else float(default), description=name, style=style,
                           layout=W.Layout(width="180px"))
    return W.Text(value="" if default is None else str(default), description=name, style=style,
                  layout=W.Layout(width="220px"))


class Dashboard:
    """The ipywidgets dashboard (see the module docstring). ``runs``: a Dataset, a list or a mapping
    name → Dataset or path of saved runs; ``model``/``tokenizer``/``world`` feed the Run tab (default: the
    zoo's ``target`` and the bundled world, loaded on the first run)."""

    def __init__(self, runs=None, *, model=None, tokenizer=None, world=None, dpi: int = 80):
        self.runs: dict[str, xr.Dataset] = {}
        self.model, self.tokenizer, self.world = model, tokenizer, world
        self.dpi = dpi
        self.figure = None                  # the figure the Explore tab shows now
        self.selection: dict = {}           # what it shows (for tests and for users)
        self.live_figure = None             # the Run tab's latest figure
        self.compare_figure = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._quiet = False
        self.log = W.Output(layout=W.Layout(max_height="160px", overflow="auto", border="1px solid #ddd"))
        self._add_runs(runs)
        self.run_tab = self._build_run_tab()
        self.explore_tab = self._build_explore_tab()
        self.compare_tab = self._build_compare_tab()
        self.attribution_tab = self._build_attribution_tab()
        self.tabs = W.Tab(children=[self.run_tab, self.explore_tab, self.compare_tab, self.attribution_tab])
        for i, title in enumerate(("Run", "Explore", "Compare", "Attribution")):
            self.tabs.set_title(i, title)
        header = W.HTML("<b>geffect-lab</b> · G-effects of unlearning objectives "
                        "<span style='color:#666'>(dR ≈ −lr·e: a negative G-effect raises the risk)</span>")
        self.widget = W.VBox([header, self.tabs, W.HTML("<small>log</small>"), self.log])
        self._refresh_runs()
        if self.runs:
            self.tabs.selected_index = 1
            self._on_run()

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

    def _report(self, where: str) -> None:
        """Print the current exception into the dashboard's log (callbacks must never fail silently)."""
        self.log.append_stderr(f"[{where}] {traceback.format_exc()}")

    def _guard(self, where: str, fn):
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception:  # noqa: BLE001  (shown to the user in the log)
                self._report(where)
        return handler

    # ------------------------------------------------------------------ runs
    def _add_runs(self, runs) -> None:
        if runs is None:
            return
        if isinstance(runs, xr.Dataset):
            runs = [runs]
        items = runs.items() if isinstance(runs, Mapping) else [(None, r) for r in runs]
        for name, run in items:
            if isinstance(run, (str, Path)):
                name = name or Path(run).stem
                run = load(run)
            self.add_run(run, name)

    def add_run(self, ds: xr.Dataset, name: str | None = None) -> str:
        """Add a run (a results Dataset) under a unique name; returns the name."""
        base = name or str(ds.attrs.get("objective", "run"))
        name, k = base, 2
        while name in self.runs:
            name, k = f"{base}#{k}", k + 1
        self.runs[name] = ds
        if hasattr(self, "explore_run"):
            self._refresh_runs(select=name)
        return name

    def _refresh_runs(self, select: str | None = None) -> None:
        names = list(self.runs)
        if not hasattr(self, "explore_run"):
            return
        current = self.explore_run.value
        self.explore_run.options = names
        if select or (current not in names and names):
            self.explore_run.value = select or names[0]
        self.compare_runs.options = names
        if not self.compare_runs.value and names:
            self.compare_runs.value = tuple(names[: min(3, len(names))])

    # ------------------------------------------------------------------ Run tab
    def _build_run_tab(self) -> W.Widget:
        style = {"description_width": "initial"}
        self.objective = W.Dropdown(options=list_objectives("forget"), value="npo", description="objective",
                                    style=style)
        self.refresh_objectives = W.Button(description="↻", tooltip="re-read the objective registry",
                                           layout=W.Layout(width="40px"))
        self.params_box = W.HBox()
        self.regulariser = W.Dropdown(options=["none"] + list_objectives("retain"), value="none",
                                      description="regulariser", style=style)
        self.reg_weight = W.FloatText(value=1.0, description="weight", style=style, layout=W.Layout(width="140px"))
        self.forget = W.Dropdown(options=["forget01", "forget05", "forget10"], value="forget05",
                                 description="forget split", style=style)
        self.steps = W.IntSlider(value=15, min=1, max=100, description="steps", style=style)
        self.lr = W.FloatLogSlider(value=3e-4, base=10, min=-6, max=-1, step=0.25, description="lr",
                                   readout_format=".1e", style=style)
        self.optimizer = W.Dropdown(options=["adamw", "adam", "sgd"], value="adamw", description="optimiser",
                                    style=style)
        self.run_button = W.Button(description="Run", button_style="success", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=15, description="0 / 15")
        self.status = W.HTML("")
        self.live = W.Image(format="png")
        self.objective.observe(self._guard("objective", lambda _: self._make_param_widgets()), names="value")
        self.refresh_objectives.on_click(self._guard("refresh", lambda _: self.refresh_registry()))
        self.run_button.on_click(self._guard("run", lambda _: self.start_run()))
        self.stop_button.on_click(self._guard("stop", lambda _: self.stop()))
        self._make_param_widgets()
        return W.VBox([
            W.HBox([self.objective, self.refresh_objectives, self.params_box]),
            W.HBox([self.regulariser, self.reg_weight]),
            W.HBox([self.forget, self.optimizer]),
            W.HBox([self.steps, self.lr]),
            W.HBox([self.run_button, self.stop_button, self.progress, self.status]),
            self.live,
        ])

    def refresh_registry(self) -> None:
        """Offer objectives registered since the dashboard was built."""
        current = self.objective.value
        self.objective.options = list_objectives("forget")
        self.objective.value = current if current in self.objective.options else self.objective.options[0]
        self.regulariser.options = ["none"] + list_objectives("retain")

    def _make_param_widgets(self) -> None:
        spec = get_objective(self.objective.value)
        self.param_widgets = {n: _param_widget(n, p) for n, p in spec.parameters.items()}
        self.params_box.children = list(self.param_widgets.values())

    def run_config(self) -> dict:
        """What the Run button would run: objective string, parameters and options."""
        objective = self.objective.value
        params = {}
        for name, widget in self.param_widgets.items():
            value = widget.value
            if isinstance(widget, W.Text) and value == "":
                continue
            params[name] = value
        if self.regulariser.value != "none":
            objective = f"{objective}+{self.reg_weight.value:g}*{self.regulariser.value}"
            params = {f"{self.objective.value}.{k}": v for k, v in params.items()}
        return {"objective": objective, "params": params, "forget": self.forget.value, "steps": self.steps.value,
                "lr": self.lr.value, "optimizer": self.optimizer.value}

    def start_run(self) -> None:
        """Start ``gl.unlearn`` in a background thread (the kernel stays free for Stop and redraws)."""
        if self._thread is not None and self._thread.is_alive():
            self.status.value = "a run is already going"
            return
        config = self.run_config()
        self._stop.clear()
        self.progress.max = config["steps"]
        self.progress.value = 0
        self.progress.description = f"0 / {config['steps']}"
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.status.value = f"running {config['objective']} …"
        self._thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the running unlearning to stop after its current step."""
        self._stop.set()
        self.status.value = "stopping after this step …"

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current run has finished (for scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, config: dict) -> None:
        from . import zoo
        from .data import load_world
        from .runs import unlearn

        try:
            if self.model is None:
                self.model, self.tokenizer = zoo.load("target")
            if self.world is None:
                self.world = load_world()

            def callback(step, partial):
                self.progress.value = step + 1
                self.progress.description = f"{step + 1} / {config['steps']}"
                try:
                    self.live_figure = plots.g_effect_curves(partial, title=f"{config['objective']} (live)")
                    self._show(self.live, self.live_figure)
                except Exception:  # noqa: BLE001
                    self._report("live plot")
                return "stop" if self._stop.is_set() else None

            ds = unlearn(self.model, self.tokenizer, config["objective"], config["params"], forget=config["forget"],
                         world=self.world, steps=config["steps"], lr=config["lr"], optimizer=config["optimizer"],
                         callback=callback, progress=False)
            name = self.add_run(ds)
            done = "complete" if ds.attrs.get("complete") else f"stopped: {ds.attrs.get('stop_reason')}"
            self.status.value = f"<b>{name}</b>: {done}; explore it in the next tab"
        except Exception:  # noqa: BLE001
            self._report("run")
            self.status.value = "the run failed: see the log"
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True

    # ------------------------------------------------------------------ Explore tab
    def _build_explore_tab(self) -> W.Widget:
        style = {"description_width": "initial"}
        self.explore_run = W.Dropdown(options=list(self.runs), description="run", style=style)
        self.load_path = W.Text(placeholder="results/npo.nc", description="load", style=style)
        self.load_button = W.Button(description="Load", icon="folder-open")
        self.view = W.Dropdown(options=VIEWS, value="curves", description="view", style=style)
        self.split = W.Dropdown(options=["targeted", "non_targeted"], value="targeted", description="split",
                                style=style)
        self.instance = W.Dropdown(options=[], description="instance", style=style,
                                   layout=W.Layout(width="320px"))
        self.instance_text = W.HTML("")
        self.step = W.SelectionSlider(options=[0], value=0, description="step", style=style,
                                      continuous_update=False)
        self.layers = W.SelectMultiple(options=[], description="layers (fine)", rows=4, style=style,
                                       layout=W.Layout(width="230px"))
        self.granularity = W.ToggleButtons(options=["coarse", "fine"], value="coarse",
                                           style={"button_width": "64px"}, layout=W.Layout(width="180px"))
        self.cumulative = W.Checkbox(value=False, description="cumulative (Σ lr·e)", indent=False)
        self.explore_image = W.Image(format="png")
        self.load_button.on_click(self._guard("load", lambda _: self.load_file(self.load_path.value)))
        self.explore_run.observe(self._guard("run choice", lambda _: self._on_run()), names="value")
        self.split.observe(self._guard("split", lambda _: self._on_split()), names="value")
        self.instance.observe(self._guard("instance", lambda _: (self._show_instance(), self.redraw())),
                              names="value")
        for control in (self.view, self.step, self.layers, self.granularity, self.cumulative):
            control.observe(self._guard("redraw", lambda _: self.redraw()), names="value")
        return W.VBox([
            W.HBox([self.explore_run, self.load_path, self.load_button]),
            W.HBox([self.view, self.split, self.granularity, self.cumulative]),
            W.HBox([W.VBox([self.instance, self.step]), self.layers]),
            self.instance_text,
            self.explore_image,
        ])

    def load_file(self, path: str) -> str:
        """Load a saved run into the dashboard and show it."""
        return self.add_run(load(path), Path(path).stem)

    def _on_run(self) -> None:
        ds = self.current
        if ds is None:
            return
        steps = [int(s) for s in ds["step"].values]
        self._quiet = True
        try:
            self.step.options = steps
            self.step.value = steps[0]
            self.layers.options = [str(x) for x in ds["layer"].values]
            self.layers.value = ()
            self._on_split()
        finally:
            self._quiet = False
        self.redraw()

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
        self.instance_text.value = (f"<b>Q:</b> {row['question'].values}<br><b>A:</b> {row['answer'].values}")

    @property
    def current(self) -> xr.Dataset | None:
        return self.runs.get(self.explore_run.value) if self.explore_run.value else None

    def redraw(self) -> None:
        """Draw the Explore tab's view for the current selection."""
        if getattr(self, "_quiet", False):
            return
        ds = self.current
        if ds is None:
            return
        view, step = self.view.value, self.step.value
        coarse = self.granularity.value == "coarse"
        layers = list(self.layers.value) or None
        try:
            fig = self._draw(ds, view, step, coarse, layers)
        except KeyError as err:  # a view this run cannot show (it did not record what it needs): say so
            fig = _message_figure(err.args[0] if err.args else str(err))
        self.figure = fig
        self.selection = {"run": self.explore_run.value, "view": view, "split": self.split.value,
                          "instance": self.instance.value, "step": step, "coarse": coarse, "layers": layers,
                          "cumulative": self.cumulative.value}
        self._show(self.explore_image, fig)
        if hasattr(self, "attribution_image"):
            self.draw_attribution()

    def _draw(self, ds, view, step, coarse, layers):
        if view == "curves":
            fig = plots.g_effect_curves(ds, cumulative=self.cumulative.value, coarse=coarse,
                                        layers=None if coarse else layers)
        elif view == "heatmap":
            fig = plots.layer_heatmap(ds, split=self.split.value, coarse=coarse)
        elif view == "distributions":
            fig = plots.instance_distributions(ds, step=step if self._recorded(ds, step) else None)
        elif view == "PG-effect scatter":
            fig = plots.pg_scatter(ds, step=step if self._recorded(ds, step) else None)
        elif view == "tokens":
            fig = plots.token_strip(ds, self.instance.value, step=step if self._recorded(ds, step) else 0)
        elif view == "metrics":
            fig = plots.metric_curves(ds)
        else:
            fig = plots.trajectory(ds)
        return fig

    @staticmethod
    def _recorded(ds: xr.Dataset, step) -> bool:
        return "g_effect" in ds and bool(ds["g_effect"].sel(step=step).notnull().any())

    # ------------------------------------------------------------------ Attribution tab
    def _build_attribution_tab(self) -> W.Widget:
        style = {"description_width": "initial"}
        self.attribution_view = W.ToggleButtons(options=["tokens", "layers vs G-effect", "before / after"],
                                                value="tokens", style={"button_width": "150px"})
        self.attribution_method = W.Dropdown(options=["integrated_gradients", "feature_ablation"],
                                             value="integrated_gradients", description="method", style=style)
        self.attribution_note = W.HTML("<small>For the run and instance chosen in Explore (the step too, for the "
                                       "layer view). Runs store attributions with "
                                       "<code>gl.unlearn(..., attribute_at=[0, 10, 20])</code>.</small>")
        self.attribution_image = W.Image(format="png")
        self.attribution_figure = None
        for control in (self.attribution_view, self.attribution_method):
            control.observe(self._guard("attribution", lambda _: self.draw_attribution()), names="value")
        return W.VBox([W.HBox([self.attribution_view, self.attribution_method]), self.attribution_note,
                       self.attribution_image])

    def draw_attribution(self) -> None:
        """Draw the Attribution tab for the Explore tab's run, instance and step."""
        ds = self.current
        if ds is None or not self.instance.value:
            return
        view, method = self.attribution_view.value, self.attribution_method.value
        try:
            if view == "tokens":
                fig = plots.token_attribution(ds, instance=self.instance.value, method=method)
            elif view == "layers vs G-effect":
                attributed = ("layer_attribution" in ds
                              and bool(ds["layer_attribution"].sel(step=self.step.value).notnull().any()))
                fig = plots.layer_attribution(ds, self.instance.value, step=self.step.value if attributed else None)
            else:
                fig = plots.attribution_change(ds, self.instance.value, method=method)
        except KeyError as err:
            fig = _message_figure(err.args[0] if err.args else str(err))
        self.attribution_figure = fig
        self._show(self.attribution_image, fig)

    # ------------------------------------------------------------------ Compare tab
    def _build_compare_tab(self) -> W.Widget:
        style = {"description_width": "initial"}
        self.compare_runs = W.SelectMultiple(options=list(self.runs), description="runs", rows=6, style=style)
        self.compare_kind = W.ToggleButtons(options=["overlay", "facet"], value="overlay")
        self.compare_cumulative = W.Checkbox(value=False, description="cumulative (Σ lr·e)", indent=False)
        self.compare_button = W.Button(description="Compare", icon="columns")
        self.compare_image = W.Image(format="png")
        self.compare_button.on_click(self._guard("compare", lambda _: self.draw_compare()))
        return W.VBox([W.HBox([self.compare_runs, W.VBox([self.compare_kind, self.compare_cumulative,
                                                           self.compare_button])]), self.compare_image])

    def draw_compare(self) -> None:
        """Draw the selected runs on shared axes (they must share steps, instances and layers)."""
        names = list(self.compare_runs.value)
        if len(names) < 1:
            raise ValueError("select at least one run to compare")
        combined = combine({n: self.runs[n] for n in names}, dim="objective")
        self.compare_figure = plots.compare(combined, dim="objective", cumulative=self.compare_cumulative.value,
                                            kind=self.compare_kind.value)
        self._show(self.compare_image, self.compare_figure)
