"""The Run tab: pick an objective and its options, run ``gl.unlearn`` in the background, watch it live."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable

import ipywidgets as W

from .. import plots
from ..objectives import get_objective, list_objectives
from .background import BackgroundJob, Post
from .common import STYLE, Log, RunStore


def param_widget(name: str, param, bound=None) -> W.Widget:
    """A widget for one objective parameter, from its default and annotation; a numeric parameter with a
    declared :class:`~geffect_lab.objectives.Bound` gets it as the widget's limits (an open end, such as
    ``beta > 0``, is then refused by the objective with its message), a text parameter with declared choices a
    dropdown of them."""
    default = None if param.default is param.empty else param.default
    ann = str(param.annotation)
    if bound is not None and bound.choices:  # a text parameter with its valid values
        return W.Dropdown(options=list(bound.choices), value=default if default in bound.choices else
                          bound.choices[0], description=name, style=STYLE, layout=W.Layout(width="220px"))
    if isinstance(default, bool) or "bool" in ann:
        return W.Checkbox(value=bool(default), description=name, style=STYLE, indent=False)
    limits = {}
    if bound is not None:
        limits = {"min": -1e12 if bound.low is None else bound.low, "max": 1e12 if bound.high is None else bound.high,
                  "tooltip": f"{name} {bound}"}
    if isinstance(default, int) or ("int" in ann and "float" not in ann):
        kind = W.BoundedIntText if limits else W.IntText
        return kind(value=0 if default is None else int(default), description=name, style=STYLE,
                    layout=W.Layout(width="180px"), **limits)
    if isinstance(default, float) or "float" in ann:
        kind = W.BoundedFloatText if limits else W.FloatText
        return kind(value=0.0 if default is None else float(default), description=name, style=STYLE,
                    layout=W.Layout(width="180px"), **limits)
    return W.Text(value="" if default is None else str(default), description=name, style=STYLE,
                  layout=W.Layout(width="220px"))


def train(config: dict, inputs: tuple, post: Post, stop_requested: threading.Event) -> None:
    """The background thread's work: load what is missing, unlearn, and post progress, figures and the result.
    It touches no widget; the Run tab handles what it posts on the kernel thread."""
    from .. import zoo
    from ..data import load_world
    from ..runs import unlearn

    try:
        model, tokenizer, world = inputs
        if model is None:
            model, tokenizer = zoo.load("target")
        if world is None:
            world = load_world()
        post("loaded", (model, tokenizer, world))

        def on_step(step, partial):
            post("step", step)
            try:
                post("live figure", plots.g_effect_curves(partial, title=f"{config['objective']} (live)"))
            except Exception:  # noqa: BLE001  (shown in the log)
                post("live plot failed", traceback.format_exc())
            return "stop" if stop_requested.is_set() else None

        ds = unlearn(model, tokenizer, config["objective"], config["params"], forget=config["forget"], world=world,
                     steps=config["steps"], lr=config["lr"], optimizer=config["optimizer"], callback=on_step,
                     progress=False)
        post("finished", ds)
    except Exception:  # noqa: BLE001  (shown in the log)
        post("failed", traceback.format_exc())


class RunTab(W.VBox):
    """Objective, parameters, regulariser, split, steps, lr, optimiser; Run / Stop, progress and a live plot.
    A finished run goes into the shared ``store``; ``model``/``tokenizer``/``world`` (None: the zoo's target
    and the bundled world, loaded by the first run) are what it trains."""

    def __init__(self, store: RunStore, log: Log, show: Callable, *, model=None, tokenizer=None, world=None):
        self.store, self.error_log, self.show = store, log, show
        self.model, self.tokenizer, self.world = model, tokenizer, world
        self.live_figure = None
        self.job = BackgroundJob(log.guard("run", self._handle))
        self._make_controls()
        self._observe_controls()
        self._make_param_widgets()
        super().__init__([
            W.HBox([self.objective, self.refresh_objectives, self.params_box]),
            W.HBox([self.regulariser, self.reg_weight]),
            W.HBox([self.forget, self.optimizer]),
            W.HBox([self.steps, self.lr]),
            W.HBox([self.run_button, self.stop_button, self.progress, self.status]),
            self.live,
        ])

    def _make_controls(self) -> None:
        self.objective = W.Dropdown(options=list_objectives("forget"), value="npo", description="objective",
                                    style=STYLE)
        self.refresh_objectives = W.Button(description="↻", tooltip="re-read the objective registry",
                                           layout=W.Layout(width="40px"))
        self.params_box = W.HBox()
        self.regulariser = W.Dropdown(options=["none"] + list_objectives("retain"), value="none",
                                      description="regulariser", style=STYLE)
        self.reg_weight = W.FloatText(value=1.0, description="weight", style=STYLE, layout=W.Layout(width="140px"))
        self.forget = W.Dropdown(options=["forget01", "forget05", "forget10"], value="forget05",
                                 description="forget split", style=STYLE)
        self.steps = W.IntSlider(value=15, min=1, max=100, description="steps", style=STYLE)
        self.lr = W.FloatLogSlider(value=3e-4, base=10, min=-6, max=-1, step=0.25, description="lr",
                                   readout_format=".1e", style=STYLE)
        self.optimizer = W.Dropdown(options=["adamw", "adam", "sgd"], value="adamw", description="optimiser",
                                    style=STYLE)
        self.run_button = W.Button(description="Run", button_style="success", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=15, description="0 / 15")
        self.status = W.HTML("")
        self.live = W.Image(format="png")

    def _observe_controls(self) -> None:
        guard = self.error_log.guard
        self.objective.observe(guard("objective", lambda _: self._make_param_widgets()), names="value")
        self.refresh_objectives.on_click(guard("refresh", lambda _: self.refresh_registry()))
        self.run_button.on_click(guard("run", lambda _: self.start_run()))
        self.stop_button.on_click(guard("stop", lambda _: self.stop()))

    def refresh_registry(self) -> None:
        """Offer objectives registered since the dashboard was built."""
        current = self.objective.value
        self.objective.options = list_objectives("forget")
        self.objective.value = current if current in self.objective.options else self.objective.options[0]
        self.regulariser.options = ["none"] + list_objectives("retain")

    def _make_param_widgets(self) -> None:
        spec = get_objective(self.objective.value)
        self.param_widgets = {n: param_widget(n, p, spec.bounds.get(n)) for n, p in spec.parameters.items()}
        self.params_box.children = list(self.param_widgets.values())

    def run_config(self) -> dict:
        """What the Run button would run: objective string, parameters and options."""
        objective = self.objective.value
        params = {name: widget.value for name, widget in self.param_widgets.items()
                  if not (isinstance(widget, W.Text) and widget.value == "")}
        if self.regulariser.value != "none":
            objective = f"{objective}+{self.reg_weight.value:g}*{self.regulariser.value}"
            params = {f"{self.objective.value}.{k}": v for k, v in params.items()}
        return {"objective": objective, "params": params, "forget": self.forget.value, "steps": self.steps.value,
                "lr": self.lr.value, "optimizer": self.optimizer.value}

    # ------------------------------------------------------------------ the background run
    def start_run(self) -> None:
        """Start ``gl.unlearn`` in a background thread (the kernel stays free for Stop and redraws)."""
        self.job.deliver()
        if self.job.running():
            self.status.value = "a run is already going"
            return
        config = self.run_config()
        self.progress.max = config["steps"]
        self._show_progress(0)
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.status.value = f"running {config['objective']} …"
        inputs = (self.model, self.tokenizer, self.world)
        self.job.start(lambda post, stop_requested: train(config, inputs, post, stop_requested))

    def stop(self) -> None:
        """Ask the running unlearning to stop after its current step."""
        self.job.stop_requested.set()
        self.status.value = "stopping after this step …"

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current run has finished, updating the tab meanwhile (for scripts and tests)."""
        self.job.wait(timeout)

    def _handle(self, kind: str, payload) -> None:
        """A message from the background run, on the kernel thread."""
        handlers = {"loaded": self._on_loaded, "step": self._on_step, "live figure": self._on_live_figure,
                    "live plot failed": self._on_live_plot_failed, "finished": self._on_finished,
                    "failed": self._on_failed}
        handlers[kind](payload)

    def _show_progress(self, done: int) -> None:
        self.progress.value = done
        self.progress.description = f"{done} / {self.progress.max}"

    def _on_loaded(self, inputs: tuple) -> None:
        self.model, self.tokenizer, self.world = inputs

    def _on_step(self, step: int) -> None:
        self._show_progress(step + 1)

    def _on_live_plot_failed(self, text: str) -> None:
        self.error_log.write("live plot", text)

    def _on_live_figure(self, fig) -> None:
        self.live_figure = fig
        self.show(self.live, fig)

    def _on_finished(self, ds) -> None:
        name = self.store.add(ds)
        done = "complete" if ds.attrs.get("complete") else f"stopped: {ds.attrs.get('stop_reason')}"
        self._end_run(f"<b>{name}</b>: {done}; explore it in the next tab")

    def _on_failed(self, text: str) -> None:
        self.error_log.write("run", text)
        self._end_run("the run failed: see the log")

    def _end_run(self, status: str) -> None:
        self.status.value = status
        self.run_button.disabled, self.stop_button.disabled = False, True
