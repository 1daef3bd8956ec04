"""``gl.sweep``: many unlearning runs (objectives × hyper-parameters × seeds) as pure tasks on a Dask cluster.

Each configuration is one task — :func:`run_task`: load the model and world, ``gl.unlearn`` with the
configuration, save the Dataset atomically under a name derived from the configuration — submitted to a
``dask.distributed`` Client: by default a ``LocalCluster`` of worker *processes*, one torch thread each; any
other Client (``dask-jobqueue``'s SLURM/PBS clusters, a Kubernetes cluster, a scheduler address) runs the same
code. Finished runs are never redone (re-running a sweep resumes it); a task that raises is retried, then
recorded in the sweep's index with its traceback while the others finish; a worker killed mid-task has its task
re-run by the scheduler. ``gl.load_sweep(out)`` returns the finished runs as one Dataset along ``run``, each
varied setting a coordinate.

GPU workers: when ``base`` puts the runs on CUDA (``device="cuda"``) each task asks for one ``GPU`` resource;
start the workers with it, e.g. ``SLURMCluster(..., worker_extra_args=["--resources", "GPU=1"])``.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import os
import sys
import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import xarray as xr

__all__ = ["sweep", "load_sweep", "expand_grid", "run_task", "SweepError", "SweepRunError", "SWEEP_KEYS"]

INDEX = "sweep.json"


class SweepError(ValueError):
    """A grid, folder or client that cannot make a sweep (named in the message)."""


def _run_keys() -> set[str]:
    from .runs import RunConfig

    return {f.name for f in fields(RunConfig)}


# settings a task understands besides RunConfig's fields
SWEEP_KEYS = {"model": "a zoo name or a checkpoint folder (default: the zoo's 'target')",
              "world": "a folder of TOFU files (default: the bundled world)",
              "device": "where each run trains ('cpu', 'cuda'; default: the model's)",
              "dtype": "the model's dtype ('float32', 'float64', 'bfloat16'; default: as saved)"}


def expand_grid(grid, base: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The configurations of a sweep, each checked as a whole before anything runs.

    ``grid`` is a mapping of setting → values (their product), a list of configurations, or
    ``{"product": {...}, "configs": [...]}`` (both); ``base`` holds the settings every run shares. A setting is a
    :class:`~geffect_lab.RunConfig` field, one of :data:`SWEEP_KEYS`, or an objective parameter:

    - ``params.NAME`` applies to every run, so every objective of the sweep must take ``NAME`` (an error names
      the objective and the parameter otherwise);
    - ``params.TERM.NAME`` is the parameter of the term ``TERM`` (``params.npo.beta``: NPO's β, in ``npo`` and in
      ``npo+gd``): it applies to the runs whose objective has that term and is left out of the others, whose
      configurations that then coincide are run once.

    Every configuration is resolved here: its objective and parameters (names, values, ranges), its RunConfig,
    its model name, world, forget split, device and dtype, and its length against ``attribute_at``.
    """
    from .objectives import resolve_objective
    from .runs import RunConfig

    if isinstance(grid, Mapping) and set(grid) <= {"product", "configs"} and grid:
        configs = _product(grid.get("product") or {}) + [dict(c) for c in grid.get("configs") or []]
    elif isinstance(grid, Mapping):
        configs = _product(grid)
    elif isinstance(grid, Sequence) and not isinstance(grid, str):
        configs = [dict(c) for c in grid]
    else:
        raise SweepError(f"grid must be a mapping of setting -> values or a list of configurations, got {grid!r}")
    if not configs:
        raise SweepError("the grid is empty: give at least one value for each setting, or one configuration")
    allowed = _run_keys() | set(SWEEP_KEYS)
    objectives = {str({**dict(base or {}), **c}.get("objective", RunConfig.objective)) for c in configs}
    worlds: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    for config in configs:
        settings = {**dict(base or {}), **config}
        unknown = sorted(k for k in settings if k not in allowed and not k.startswith("params."))
        if unknown:
            raise SweepError(f"unknown setting(s) {unknown}; a sweep varies RunConfig's fields "
                             f"({', '.join(sorted(_run_keys()))}), params.NAME, params.TERM.NAME, or "
                             f"{', '.join(SWEEP_KEYS)}")
        where = _describe(config)
        try:
            settings = _applicable(settings, objectives)
            run = RunConfig(**_run_options(settings))  # every value checked now, not in a worker
            resolve_objective(run.objective, run.params)  # names, values, ranges
            _check_task(settings, run, worlds)
        except SweepError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise SweepError(f"the sweep's run with {where}: {msg}" if where else msg) from None
        out.setdefault(json.dumps(settings, sort_keys=True, default=str), settings)
    return list(out.values())


def _terms(objective, strict: bool = True) -> dict[str, set[str]]:
    """Each term of an objective (a name like ``"npo+gd"``) with the parameters it takes (``strict=False``: none
    for an objective that does not resolve)."""
    from .objectives import ObjectiveError, resolve_objective

    try:
        params = resolve_objective(objective).params()
    except ObjectiveError:
        if strict:
            raise
        params = {}
    taken: dict[str, set[str]] = {}
    for key in params:
        term, name = key.split(".", 1)
        taken.setdefault(term, set()).update({name} - {"weight"})
    return taken


def _applicable(settings: dict[str, Any], objectives: set[str]) -> dict[str, Any]:
    """``settings`` without the ``params.TERM.NAME`` keys of terms its objective does not have, after checking
    that every ``params.NAME`` key names a parameter of its objective (``objectives``: all the sweep's, for the
    hint)."""
    from .runs import RunConfig

    objective = settings.get("objective", RunConfig.objective)
    taken = _terms(objective)
    kept = {}
    for key, value in settings.items():
        parts = key.split(".")
        if parts[0] != "params" or len(parts) == 2 and (parts[1] == "weight" or any(
                parts[1] in names for names in taken.values())):
            kept[key] = value
        elif len(parts) > 2:  # params.TERM.NAME: this run's when its objective has TERM
            if parts[1] in taken:
                kept[key] = value
        else:
            owners = sorted({t for o in objectives for t, names in _terms(o, False).items()
                             if parts[1] in names})
            valid = ", ".join(f"{t}.{n}" for t, names in taken.items() for n in sorted(names)) or "none"
            hint = (f"a parameter that only some objectives of the sweep take is written params.TERM.NAME, "
                    f"here params.{owners[0]}.{parts[1]}, and applies to the runs whose objective has that term"
                    if owners else f"no objective of the sweep takes {parts[1]!r}")
            raise ValueError(f"{key}={value!r} does not apply to the objective {objective!r} (its parameters: "
                             f"{valid}); {hint}")
    return kept


def _check_task(settings: Mapping[str, Any], run, worlds: dict[str, Any]) -> None:
    """What :func:`run_task` will read, checked in the parent: model name, dtype, device name, world, forget
    split, and the run's length against ``attribute_at``."""
    import torch

    from . import zoo
    from ._batching import check_dtype
    from .data import load_world

    model = str(settings.get("model", "target"))
    if model not in zoo.ZOO and not Path(model).exists() and ("/" not in model or model.startswith((".", "/"))):
        raise ValueError(f"model={model!r} is neither a zoo model ({', '.join(zoo.ZOO)}) nor an existing "
                         "checkpoint folder nor a hub name like 'org/model'")
    check_dtype(settings.get("dtype"))
    if settings.get("device") is not None:
        try:  # its name only: the workers, not this process, must have it
            torch.device(settings["device"])
        except (RuntimeError, TypeError):
            raise ValueError(f"device={settings['device']!r} is not a device name; use 'cpu', 'cuda', 'cuda:1', "
                             "'mps'") from None
    key = str(settings.get("world") or "")
    if key not in worlds:
        worlds[key] = load_world(settings["world"]) if key else load_world()
    run.checked_length(len(worlds[key].forget(run.forget)))


def _product(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    keys = list(grid)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
    if any(len(v) == 0 for v in values):
        empty = [k for k, v in zip(keys, values) if len(v) == 0]
        raise SweepError(f"the grid gives no value for {', '.join(empty)}")
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)] if keys else []


def _run_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    run_keys = _run_keys()
    options = {k: v for k, v in settings.items() if k in run_keys}
    params = dict(options.pop("params", None) or {})
    params.update({k[len("params."):]: v for k, v in settings.items() if k.startswith("params.")})
    return {**options, "params": params}


def run_name(settings: Mapping[str, Any]) -> str:
    """A stable file name from a configuration (the same settings always map to the same run)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return "run-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def run_task(settings: dict[str, Any], path: str, threads: int = 1) -> str:
    """One run of a sweep, as a pure function of its settings: train, measure, save ``path`` atomically."""
    import torch

    from . import zoo
    from .data import load_world
    from .results import save
    from .runs import RunConfig

    torch.set_num_threads(threads)
    dtype = getattr(torch, settings["dtype"]) if settings.get("dtype") else None
    model, tok = zoo.load(settings.get("model", "target"), dtype=dtype, device=settings.get("device"))
    world = load_world(settings["world"]) if settings.get("world") else None
    ds = RunConfig(**_run_options(settings)).unlearn(model, tok, world=world, progress=False)
    ds.attrs["sweep_settings"] = json.dumps(settings, sort_keys=True, default=str)
    save(ds, path)
    return path


# ---------------------------------------------------------------------------------------------- the sweep
def _index(out: Path, grid, base) -> dict[str, Any]:
    """The sweep's index (``out/sweep.json``), made or checked: a folder holds one sweep."""
    spec = json.loads(json.dumps({"grid": grid, "base": dict(base or {})}, sort_keys=True, default=str))
    path = out / INDEX
    if path.exists():
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SweepError(f"{path}: not valid JSON ({err})") from None
        if index.get("spec") != spec:
            raise SweepError(f"{out} holds a different sweep (its {INDEX} has another grid or base): give another "
                             "folder, or the same grid and base to resume it")
        return index
    return {"spec": spec, "runs": {}}


def _write_index(out: Path, index: dict[str, Any]) -> None:
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True, default=str))
    os.replace(tmp, out / INDEX)


def _default_client():
    from distributed import Client, LocalCluster

    workers = max(1, min(2, os.cpu_count() or 1))
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def sweep(grid, *, base: Mapping[str, Any] | None = None, out, client=None, retries: int = 1,
          progress: bool = True) -> xr.Dataset:
    """Run every configuration of ``grid`` (see :func:`expand_grid`: every one is checked before the cluster
    starts; ``base`` holds the settings shared by all) as a task on a Dask ``client`` (default: a LocalCluster of
    up to 2 worker processes, one thread each), each run saved to ``out`` as it finishes. Runs already in
    ``out`` are skipped; a task that raises is retried ``retries`` times, then recorded as failed (with its
    traceback) in ``out/sweep.json`` while the others finish, and :class:`SweepRunError` is raised at the end.

    The default LocalCluster starts worker processes that re-import the calling script: in a script, call
    ``gl.sweep`` under ``if __name__ == "__main__":`` (a script that does not is refused before the cluster
    starts, with that fix).

    Returns
    -------
    xarray.Dataset
        :func:`load_sweep` of ``out``: ``g_effect`` [run, step, instance, layer, term], ``risk`` [run, step,
        instance], …
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise SweepError(f"retries={retries!r} is not valid; use a whole number >= 0")
    configs = expand_grid(grid, base)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"{out} is a file; give a folder for the sweep's runs")
    index = _index(out, grid, base)
    todo = {run_name(s): s for s in configs if not (out / f"{run_name(s)}.nc").exists()}
    owned: list = []  # what this call opened, closed when it ends
    if client is None:
        _check_main_guard()
        client, cluster = _default_client()
        owned = [client, cluster]
    elif isinstance(client, str):
        client = _connect(client)
        owned = [client]
    out.mkdir(parents=True, exist_ok=True)
    for name, settings in ((run_name(s), s) for s in configs):
        index["runs"].setdefault(name, {"settings": settings, "status": "pending"})
        if name not in todo:
            index["runs"][name]["status"] = "done"
    _write_index(out, index)
    if getattr(client, "dashboard_link", None) and progress:
        print(f"Dask dashboard: {client.dashboard_link}")
    try:
        resources = {"GPU": 1} if str((base or {}).get("device", "")).startswith("cuda") else None
        call = uuid.uuid4().hex[:8]  # a key of this call's: a finished task the client still holds is not reused
        futures = {client.submit(run_task, s, str(out / f"{name}.nc"), key=f"geffect-{name}-{call}", retries=retries,
                                 resources=resources, pure=False): name for name, s in todo.items()}
        bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="sweep", disable=not progress,
                   unit="run")
        for future in as_completed(futures):
            name = futures[future]
            if future.status == "finished":
                index["runs"][name].update(status="done", error="")
            else:
                err = future.exception()
                index["runs"][name].update(status="failed", error="".join(
                    traceback.format_exception(type(err), err, future.traceback())))
            _write_index(out, index)
            bar.update()
        bar.close()
    finally:
        for opened in owned:
            opened.close()
    runs = {run_name(s): index["runs"][run_name(s)] for s in configs}
    failed = {name: r for name, r in runs.items() if r["status"] == "failed"}
    if failed:
        done = len(runs) - len(failed)
        raise SweepRunError(out, failed, len(runs), retries, load_sweep(out) if done else None)
    return load_sweep(out)


class SweepRunError(RuntimeError):
    """Runs of a sweep that failed, after their retries, while the others finished. ``failed`` maps each failed
    run's name to its settings and traceback (also in ``out/sweep.json``); ``partial`` is :func:`load_sweep` of
    the finished runs (None when none finished). Running the same sweep again runs only the runs not done."""

    def __init__(self, out: Path, failed: dict[str, dict], total: int, retries: int, partial: xr.Dataset | None):
        self.out, self.failed, self.partial = out, failed, partial
        name, first = next(iter(failed.items()))
        lines = [line for line in first.get("error", "").strip().splitlines() if line.strip()]
        cause = lines[-1].strip() if lines else "no error recorded"
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        finished = (f"the {total - len(failed)} finished run(s) are kept (gl.load_sweep({str(out)!r}))"
                    if partial is not None else "no run finished")
        super().__init__(f"{len(failed)} of {total} runs of the sweep failed after {retries} retr"
                         f"{'y' if retries == 1 else 'ies'}: {name} ({_describe(first['settings'])}): {cause}{more}; "
                         f"tracebacks in {out / INDEX}; {finished}; run the same sweep again to redo the failed ones")


def _describe(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items()))


def _check_main_guard() -> None:
    """Refuse, before a LocalCluster starts, a script that calls ``gl.sweep`` at its top level outside
    ``if __name__ == "__main__":``: the cluster's worker processes (spawned) re-import the script, each would
    start the sweep again, and Dask would only report that its Nanny failed to start."""
    import dask

    method = dask.config.get("distributed.worker.multiprocessing-method", "spawn")
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if method == "fork" or not path or spec.endswith("__main__"):  # nothing re-imported (as multiprocessing)
        return
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)
                                     and frame.f_code.co_filename == path):
        frame = frame.f_back
    if frame is None:  # not called from the script's own top-level code
        return
    try:
        tree = ast.parse(Path(path).read_text(), path)
    except (OSError, SyntaxError, ValueError):
        return
    line = frame.f_lineno
    statement = next((node for node in tree.body if node.lineno <= line <= (node.end_lineno or node.lineno)), None)
    if statement is not None and not _is_main_guard(statement):
        raise SweepError(f"{path} calls gl.sweep at its top level (line {line}): the local Dask cluster's worker "
                         "processes re-import the script and would each start the sweep again. Put the sweep under "
                         "`if __name__ == \"__main__\":` (docs/howto.md, Sweeps)")


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either way round)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare) or len(node.test.ops) != 1:
        return False
    sides = [node.test.left, *node.test.comparators]
    names = [isinstance(x, ast.Name) and x.id == "__name__" for x in sides]
    mains = [isinstance(x, ast.Constant) and x.value == "__main__" for x in sides]
    return isinstance(node.test.ops[0], ast.Eq) and any(names) and any(mains)


def _connect(address: str):
    from distributed import Client

    try:
        return Client(address, timeout="10s")
    except (OSError, TimeoutError) as err:
        raise SweepError(f"cannot reach the Dask scheduler at {address!r}: {err}") from None


LAZY_ABOVE = 64  # runs: a larger sweep opens lazily


def _open_lazy(path: Path) -> xr.Dataset:
    """A run file opened with dask-backed arrays (read when computed), checked against the schema."""
    from .schema import annotate, upgrade, validate

    opened = xr.open_dataset(path, engine="h5netcdf", chunks={})
    return validate(annotate(upgrade(opened, where=str(path))), where=str(path))


def load_sweep(out, *, lazy: bool | None = None) -> xr.Dataset:
    """The finished runs of a sweep folder as one Dataset along ``run``, indexed by the settings that vary (a
    multi-index: ``.sel(objective="npo", beta=0.1)`` gives those runs over seeds, ``groupby("seed")`` works);
    ``run_name`` holds each run's file name. ``lazy`` (default: above 64 runs) opens the files with dask-backed
    arrays, read when computed (``.compute()``, a plot).

    Returns
    -------
    xarray.Dataset
        The runs' variables with ``run`` in front of their own dims: ``g_effect`` [run, step, instance, layer,
        term], ``risk`` [run, step, instance], ``objective_loss`` [run, step], …
    """
    from .results import combine, load

    out = Path(out)
    path = out / INDEX
    if not path.exists():
        raise SweepError(f"{out} is not a sweep folder (no {INDEX})")
    runs = {name: r for name, r in json.loads(path.read_text())["runs"].items() if r["status"] == "done"}
    if not runs:
        raise SweepError(f"{out}: no finished run yet")
    lazy = len(runs) > LAZY_ABOVE if lazy is None else lazy
    datasets = {name: (_open_lazy if lazy else load)(out / f"{name}.nc") for name in runs}
    stacked = combine(datasets, dim="run")
    keys = sorted({k for r in runs.values() for k in r["settings"]})
    varied = []
    for key in keys:
        values = [json.dumps(r["settings"].get(key), sort_keys=True) for r in runs.values()]
        if len(set(values)) > 1:
            coord = key.replace("params.", "")
            plain = [r["settings"].get(key) for r in runs.values()]
            numbers = [v for v in plain if v is not None]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) and len(numbers) < len(
                    plain):  # a params.TERM.NAME the runs without TERM leave out: NaN there
                plain = [math.nan if v is None else float(v) for v in plain]
            stacked = stacked.assign_coords({coord: ("run", plain if all(
                isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in plain) else values)})
            varied.append(coord)
    stacked = stacked.assign_coords(run_name=("run", list(runs)))
    if varied:  # the varied settings identify each run: they index it
        stacked = stacked.drop_vars("run").set_xindex(varied)
    return stacked
