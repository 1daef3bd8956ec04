"""gl.Dashboard, driven programmatically: set values, click, and check the figure shows the selection."""

from __future__ import annotations

import asyncio
import threading

import geffect_lab as gl
from geffect_lab import plots


def test_explore_tab_follows_the_controls(short_runs):
    runs, folder = short_runs
    dash = gl.Dashboard(runs={"ga": runs["ga"], "npo+gd": runs["npo+gd"]})
    assert dash.tabs.selected_index == 1 and dash.selection["view"] == "curves"
    assert dash.explore_image.value[:4] == b"\x89PNG"
    first = dash.explore_image.value
    dash.explore_run.value = "npo+gd"
    assert dash.selection["run"] == "npo+gd" and dash.figure._suptitle.get_text().startswith("npo+gd")
    dash.view.value = "heatmap"
    dash.split.value = "non_targeted"
    assert "retaining" in dash.figure.axes[0].get_title()
    assert dash.explore_image.value != first
    dash.view.value = "tokens"
    inst = dash.instance.options[2]
    dash.instance.value = inst
    dash.step.value = 2
    assert dash.selection["instance"] == inst and dash.selection["step"] == 2
    assert dash.figure.axes[0].get_title(loc="left").startswith(f"{inst} · step 2")
    assert str(runs["npo+gd"].question.sel(instance=inst).values) in dash.instance_text.value
    dash.view.value = "curves"
    dash.granularity.value = "fine"
    dash.layers.value = ("embed", "layers.1")
    labels = {line.get_label() for line in dash.figure.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert labels == {"total", "embed", "layers.1"}
    dash.cumulative.value = True
    assert dash.selection["cumulative"] and "cumulative" in dash.figure._suptitle.get_text()
    dash.view.value = "metrics"
    assert any("model utility" in ax.get_title() for ax in dash.figure.axes)
    assert not dash.log.outputs


def test_load_compare_and_errors_in_the_log(short_runs):
    runs, folder = short_runs
    dash = gl.Dashboard()
    name = dash.load_file(str(folder / "wga.nc"))
    dash.load_path.value = str(folder / "ga.nc")
    dash.load_button.click()
    assert set(dash.runs) == {name, "ga"} and dash.explore_run.value == "ga"
    dash.compare_runs.value = (name, "ga")
    dash.compare_kind.value = "facet"
    dash.compare_button.click()
    assert dash.compare_figure is not None and len(dash.compare_figure.axes) == 4
    assert dash.compare_image.value[:4] == b"\x89PNG"
    dash.load_path.value = str(folder / "missing.nc")
    dash.load_button.click()  # the error goes to the dashboard's log, not into the void
    assert "no such results file" in "".join(o.get("text", "") for o in dash.log.outputs)


def test_run_tab_runs_live_and_stops(target, world):
    model, tok = target
    dash = gl.Dashboard(model=model, tokenizer=tok, world=world)
    assert set(dash.objective.options) == set(gl.list_objectives("forget"))
    dash.objective.value = "npo"
    assert list(dash.param_widgets) == ["beta"] and dash.param_widgets["beta"].value == 0.1
    dash.param_widgets["beta"].value = 0.2
    dash.regulariser.value = "gd"
    dash.reg_weight.value = 0.5
    dash.steps.value = 3
    assert dash.run_config()["objective"] == "npo+0.5*gd"
    frames, threads = [], set()
    dash.live.observe(lambda change: frames.append(len(change["new"])), names="value")
    dash.progress.observe(lambda change: threads.add(threading.current_thread()), names="value")
    dash.run_button.click()
    dash.wait(120)
    assert not dash.log.outputs, dash.log.outputs
    assert threads == {threading.main_thread()}  # the training thread never touches a widget
    assert dash.progress.value == 3 and len(frames) == 3  # the plot was redrawn at each recorded step
    run = dash.runs["npo+0.5*gd"]
    assert run.attrs["complete"] == 1 and '"npo.beta": 0.2' in run.attrs["objective_params"]
    assert dash.explore_run.options[-1] == "npo+0.5*gd"
    # Stop: the run ends after the current step, keeping what it recorded
    dash.steps.value = 50
    dash.live.observe(lambda change: dash.stop() if len(frames) >= 4 else None, names="value")
    dash.run_button.click()
    dash.wait(120)
    stopped = dash.runs["npo+0.5*gd#2"]
    assert stopped.attrs["complete"] == 0 and stopped.sizes["step"] < 50


def test_user_objectives_appear_after_refresh(target, world, scratch_objectives):
    dash = gl.Dashboard(model=target[0], tokenizer=target[1], world=world)

    @gl.objective("dash_half_ga")
    def half(x, scale: float = 0.5, clip: bool = True):
        return -scale * x.mean(x.nll)

    assert "dash_half_ga" not in dash.objective.options
    dash.refresh_objectives.click()
    dash.objective.value = "dash_half_ga"
    widgets = dash.param_widgets
    assert widgets["scale"].value == 0.5 and widgets["clip"].value is True
    assert type(widgets["clip"]).__name__ == "Checkbox"


def test_plots_module_is_what_the_dashboard_draws_with():
    assert gl.Dashboard.__module__ == "geffect_lab.widgets" and callable(plots.g_effect_curves)


def test_attribution_tab_shows_the_selected_instance(target, world):
    model, tok = target
    ev = {"targeted": world["forget05"][:2], "non_targeted": world["retain_perturbed"][:2]}
    run = gl.unlearn(model, tok, "ga", world=world, eval=ev, steps=2, record=("g_effect",), attribute_at=[0, 2],
                     attribute_n_steps=8, progress=False)
    dash = gl.Dashboard(runs={"ga": run})
    assert dash.tabs.get_title(3) == "Attribution"
    dash.instance.value = dash.instance.options[1]
    assert dash.attribution_figure is not None
    labels = [t.get_text() for t in dash.attribution_figure.axes[0].get_yticklabels()]
    assert labels == ["step 0", "step 2"]
    dash.attribution_view.value = "layers vs G-effect"
    assert dash.attribution_figure._suptitle.get_text() == f"{dash.instance.options[1]} · step 0"
    dash.attribution_view.value = "before / after"
    assert "before and after" in dash.attribution_figure.axes[0].get_title()
    assert not dash.log.outputs


def test_background_messages_are_handled_on_the_loop_thread():
    """In a kernel (a running asyncio loop) the worker's messages reach the handler on the loop's thread, in order,
    without anyone calling wait()."""
    from geffect_lab.widgets.background import BackgroundJob

    async def main():
        seen = []
        job = BackgroundJob(lambda kind, payload: seen.append((kind, payload, threading.current_thread())))
        job.start(lambda post, stop_requested: [post("step", i) for i in range(5)])
        while len(seen) < 5:
            await asyncio.sleep(0.01)
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), 30))
    assert [(kind, step) for kind, step, _ in seen] == [("step", i) for i in range(5)]
    assert {thread for _, _, thread in seen} == {threading.main_thread()}


def test_the_compare_tab_loads_a_sweep_folder(short_runs, tmp_path):
    """A sweep folder (the layout gl.sweep writes: run files and sweep.json) becomes runs named by their settings."""
    import json

    runs, _ = short_runs
    index = {"spec": {}, "runs": {}}
    for i, (name, ds) in enumerate(runs.items()):
        gl.save(ds, tmp_path / f"run-{i}.nc")
        index["runs"][f"run-{i}"] = {"settings": {"objective": name, "steps": 4}, "status": "done"}
    (tmp_path / "sweep.json").write_text(json.dumps(index))
    dash = gl.Dashboard()
    names = dash.load_sweep(tmp_path)
    assert names == ["objective=ga", "objective=npo+gd", "objective=wga"]
    assert dash.compare_runs.value == tuple(names)
    dash.draw_compare()
    assert dash.compare_tab.figure is not None and "run" not in dash.compare_tab.store.runs[names[0]].dims


def test_a_text_parameter_with_choices_gets_a_dropdown():
    from geffect_lab.widgets.run_tab import param_widget

    spec = gl.get_objective("rmu")
    widget = param_widget("positions", spec.parameters["positions"], spec.bounds["positions"])
    assert type(widget).__name__ == "Dropdown" and widget.value == "answer"
    assert list(widget.options) == ["answer", "predicting", "all"]
