"""The ``geffect-lab`` command line.

    geffect-lab run --objective npo --param beta=0.1 --forget forget05 --steps 30 -o results/npo.nc
    geffect-lab replay RUN_DIR --objective npo   G-effects at every checkpoint-* of a saved run
    geffect-lab sweep spec.yaml -o sweeps/beta   many runs as tasks on a Dask cluster (resumable)
    geffect-lab info results/npo.nc              schema, configuration and a summary table
    geffect-lab compare results/ga.nc results/npo.nc
    geffect-lab objectives                       the registered objectives and their parameters
    geffect-lab demo                             GA, NPO and WGA on the bundled world, into results/
    geffect-lab world [PATH]                     the splits of the bundled world (or of real TOFU files)
    geffect-lab zoo list|build                   the tiny offline models

``--import mymodule`` (before or after the command) imports a module first, so the objectives it registers
with ``@geffect_lab.objective`` are offered like the built-ins. Run ``geffect-lab COMMAND --help`` for each
command's options. A mistake in the input gets one line naming it and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path


def _whole(low: int):
    """An argparse type: a whole number >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not valid; use a whole number >= {low}")
        return value
    return parse


def _number(low: float, strict: bool = False):
    """An argparse type: a finite number >= ``low`` (> ``low`` when ``strict``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not valid; use a finite number {'>' if strict else '>='} "
                                             f"{low:g}")
        return value
    return parse


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=Path(args.out), steps=args.steps)
    return 0


def _parse_params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--param takes NAME=VALUE (e.g. beta=0.1), got {pair!r}")
        key, value = pair.split("=", 1)
        params[key.strip()] = value.strip()
    return params


def _cmd_run(args: argparse.Namespace) -> int:
    import pandas as pd

    from . import zoo
    from .data import load_world
    from .objectives import resolve_objective
    from .results import check_output_path, summarize
    from .runs import RECORD_ALL, RunConfig

    params = _parse_params(args.param)
    resolve_objective(args.objective, params)  # fail on a bad objective or parameter before loading anything
    record = [r.strip() for r in args.record.split(",") if r.strip()] if args.record is not None else RECORD_ALL
    config = RunConfig(objective=args.objective, params=params, forget=args.forget, lr=args.lr,
                       optimizer=args.optimizer, batch_size=args.batch_size, seed=args.seed,
                       record_every=args.record_every, steps=args.steps, epochs=args.epochs,
                       weight_decay=args.weight_decay, warmup=args.warmup, record=tuple(record))
    if args.output is not None:
        check_output_path(args.output)
    world = load_world(args.world) if args.world else None
    model, tok = zoo.load(args.model)
    ds = config.unlearn(model, tok, world=world, out=args.output)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(summarize({ds.attrs["objective"]: ds}).to_string(float_format=lambda x: f"{x:.4g}"))
    print(f"\nwritten to {args.output}" if args.output else "")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    import pandas as pd

    from .data import load_world
    from .objectives import resolve_objective
    from .replay import replay
    from .results import check_output_path, save, summarize
    from .runs import RunData

    params = _parse_params(args.param)
    if args.objective is not None:
        resolve_objective(args.objective, params)  # a bad objective or parameter fails before anything is loaded
    if args.output is not None:
        check_output_path(args.output)
    world = load_world(args.world) if args.world else None
    samples = {}
    if args.forget is not None:  # else an open-unlearning folder's own forget split
        data = RunData.build(args.forget, None, None, world, None)
        samples = dict(forget=data.forget, retain=data.train_retain, targets=data.eval_sets, refusals=data.refusals)
    ds = replay(args.run_dir, args.tokenizer, args.objective, params or None, world=world, base_model=args.base_model,
                reference=args.reference, pg=not args.no_pg, per_token=not args.no_per_token, **samples)
    if args.output is not None:
        save(ds, args.output)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(summarize({ds.attrs["objective"]: ds}).to_string(float_format=lambda x: f"{x:.4g}"))
    print(f"\n{ds.sizes['step']} checkpoints replayed" + (f"; written to {args.output}" if args.output else ""))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import yaml

    from .sweep import SweepRunError, sweep

    path = Path(args.spec)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such sweep spec")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(spec, dict) or "grid" not in spec or set(spec) - {"grid", "base"}:
        raise ValueError(f"{path}: a sweep spec holds 'grid:' (settings -> values, or a list of configurations) "
                         "and optionally 'base:' (the settings every run shares), with gl.unlearn's keys")
    try:
        ds = sweep(spec["grid"], base=spec.get("base"), out=args.output, client=args.scheduler, retries=args.retries)
    except SweepRunError as err:  # runs failed in the workers (the input was checked before): not exit code 2
        print(f"geffect-lab: {err}", file=sys.stderr)
        return 1
    print(f"{ds.sizes['run']} run(s) done; in {args.output}; gl.load_sweep({str(args.output)!r}) gives them "
          "along 'run'")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    import pandas as pd

    from .results import load, summarize

    ds = load(args.path)
    print(f"{args.path}: geffect-lab results, schema version {ds.attrs.get('schema_version')}, "
          f"{'complete' if int(ds.attrs.get('complete', 1)) else 'INCOMPLETE: ' + str(ds.attrs.get('stop_reason'))}")
    print("dims: " + ", ".join(f"{k}={v}" for k, v in ds.sizes.items()))
    print("variables: " + ", ".join(ds.data_vars))
    config = ds.attrs.get("config")
    if config:
        print("configuration:")
        for key, value in sorted(json.loads(config).items()):
            print(f"  {key}: {value}")
    print(f"model: {ds.attrs.get('model_name')} ({ds.attrs.get('model_parameters')} parameters, "
          f"{ds.attrs.get('model_dtype')})")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(summarize({ds.attrs.get("objective", "run"): ds}).to_string(float_format=lambda x: f"{x:.4g}"))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from .results import load, summarize

    runs = {}
    for path in args.paths:
        ds = load(path)
        name = str(ds.attrs.get("objective", Path(path).stem))
        runs[name if name not in runs else f"{name} ({Path(path).name})"] = ds
    table = summarize(runs)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(float_format=lambda x: f"{x:.4g}"))
    if args.csv:
        table.to_csv(args.csv)
        print(f"\nwritten to {args.csv}")
    return 0


def _cmd_objectives(args: argparse.Namespace) -> int:
    from .objectives import get_objective, list_objectives

    for name in list_objectives():
        spec = get_objective(name)
        params = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items()) or "-"
        print(f"{name:10s} {spec.role:7s} {params:45s} {spec.description}")
    return 0


def _cmd_world(args: argparse.Namespace) -> int:
    from .data import load_world

    world = load_world(args.path)
    print(world)
    print(world.summary().to_string())
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from . import zoo

    if args.action is None:
        raise ValueError("the zoo command needs an action: 'geffect-lab zoo list' shows the models and whether they "
                         "are built, 'geffect-lab zoo build [NAMES]' trains them")
    if args.action == "list":
        if args.names:
            raise ValueError(f"zoo list takes no names (got {' '.join(args.names)}); "
                             "'geffect-lab zoo build NAMES' builds some")
        for name, entry in zoo.ZOO.items():
            built = (zoo.entry_dir(name) / "config.json").exists()
            print(f"{name:18s} {'built' if built else 'not built':10s} {entry.description}")
        return 0
    overrides = {"epochs": args.epochs} if args.epochs else None
    reports = zoo.build(args.names or None, force=args.force, recipe_overrides=overrides,
                        out_dir=args.out)
    for name, rep in reports.items():
        em = ", ".join(f"{k} {v:.0%}" for k, v in rep["exact_match"].items())
        print(f"{name}: {rep['train_seconds']} s; exact match {em}")
    if not reports:
        print("every requested zoo model is already built (use --force to rebuild)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .objectives import get_objective, list_objectives
    from .runs import DEFAULTS, RECORD_ALL

    forget_objs = list_objectives("forget")
    regs = list_objectives("retain")
    parser = argparse.ArgumentParser(
        prog="geffect-lab",
        description="Exact G-effects of LLM unlearning objectives (Wang et al., ICLR 2025), per instance, "
                    "layer, token and step, on the bundled offline world or on real TOFU data.",
        epilog="--import MODULE (repeatable) imports your module first, so that the objectives it registers "
               "with @geffect_lab.objective can be named like the built-ins.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module that registers objectives (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lines = "\n".join(f"  {n:9s} {', '.join(f'{k}={v!r}' for k, v in get_objective(n).defaults.items()) or '-':40s}"
                      f" {get_objective(n).description}" for n in forget_objs + regs)
    p = sub.add_parser(
        "run", help="run an unlearning objective and record its G-effects step by step",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Unlearn a forget split with an objective, recording at every step (before the update) "
                    "the G-effects on 32 targeted (forget) and 32 held-out non-targeted (retain) instances: "
                    "per instance x layer x term, per answer token, per forget sample (PG-effect, sample "
                    "effect), and the optimiser's actual step (update effect). Sign: dR ~ -lr * g_effect, so a "
                    "negative unlearning G-effect means the forget risk rises.",
        epilog=f"objectives (forget terms, then regularisers for '+'):\n{lines}\n\n"
               "examples:\n  geffect-lab run --objective npo --param beta=0.1 --steps 30 -o results/npo.nc\n"
               "  geffect-lab run --objective 'npo+0.5*gd' -o results/npo_gd.nc\n"
               "  geffect-lab --import my_objectives run --objective mine -o results/mine.nc")
    p.add_argument("--objective", "-O", required=True, metavar="NAME",
                   help=f"a registered objective ({', '.join(forget_objs)}), optionally plus regularisers "
                        f"({', '.join(regs)}), e.g. npo+gd or npo+0.5*kl")
    p.add_argument("--param", "-p", action="append", metavar="NAME=VALUE",
                   help="an objective parameter (repeatable): beta=0.1, or gd.weight=0.5 in a composite")
    p.add_argument("--forget", default=DEFAULTS["forget"], choices=["forget01", "forget05", "forget10"],
                   help="forget split (default %(default)s; its matching retain split feeds regularisers)")
    p.add_argument("--model", default="target", help="zoo name or checkpoint folder (default %(default)s)")
    p.add_argument("--world", default=None, help="folder of TOFU files (default: the bundled world)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_whole(1), default=None, help="number of updates")
    length.add_argument("--epochs", type=_number(0, strict=True), default=None,
                        help=f"passes over the forget split (default {DEFAULTS['epochs']})")
    p.add_argument("--lr", type=_number(0, strict=True), default=DEFAULTS["lr"],
                   help="learning rate (default %(default)s)")
    p.add_argument("--optimizer", default=DEFAULTS["optimizer"], choices=["sgd", "adam", "adamw"],
                   help="default %(default)s; under sgd the update effect equals the G-effect")
    p.add_argument("--batch-size", type=_whole(1), default=DEFAULTS["batch_size"], help="default %(default)s")
    p.add_argument("--weight-decay", type=_number(0), default=DEFAULTS["weight_decay"], help="default %(default)s")
    p.add_argument("--warmup", type=_whole(0), default=DEFAULTS["warmup"], help="warm-up steps (default %(default)s)")
    p.add_argument("--seed", type=_whole(0), default=0)
    p.add_argument("--record-every", type=_whole(1), default=DEFAULTS["record_every"],
                   help="measure every k-th step (default %(default)s)")
    p.add_argument("--record", default=None,
                   help=f"comma-separated subset of {','.join(RECORD_ALL)} (default: all); '' records risks only")
    p.add_argument("-o", "--output", default=None, help="netCDF file to write (e.g. results/npo.nc)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("replay", help="G-effects of a saved run, checkpoint by checkpoint",
                       description="Measure the G-effects of an objective at every checkpoint-* of a run folder "
                                   "(an HF Trainer's output_dir; full weights or PEFT adapters), and the interval "
                                   "update effect between consecutive checkpoints.")
    p.add_argument("run_dir", help="the run folder holding checkpoint-* folders")
    p.add_argument("--objective", "-O", default=None, metavar="NAME",
                   help="the objective to measure (default: an open-unlearning folder's own method)")
    p.add_argument("--param", "-p", action="append", metavar="NAME=VALUE", help="an objective parameter")
    p.add_argument("--forget", default=None, choices=["forget01", "forget05", "forget10"],
                   help="forget split: the objective's samples and the targeted instances (default: an "
                        "open-unlearning folder's own)")
    p.add_argument("--world", default=None, help="folder of TOFU files (default: the bundled world; real TOFU "
                                                 "for an open-unlearning folder)")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER_OR_ZOO_NAME",
                   help="tokenizer folder or zoo name (default: saved with the checkpoints)")
    p.add_argument("--reference", default=None, metavar="FOLDER_OR_ZOO_NAME",
                   help="the run's starting model, the frozen reference of NPO-like objectives (default: "
                        "checkpoint-0, or the adapters' base model; refused when the run has neither)")
    p.add_argument("--base-model", default=None, help="base model folder, for PEFT adapter checkpoints")
    p.add_argument("--no-pg", action="store_true", help="skip the per-sample PG-effect and sample effect")
    p.add_argument("--no-per-token", action="store_true", help="skip the per-token G-effects")
    p.add_argument("-o", "--output", default=None, help="netCDF file to write (e.g. replay.nc)")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("sweep", help="many runs (objectives x parameters x seeds) on a Dask cluster",
                       description="Run every configuration of a YAML spec (grid: settings -> values, or a list of "
                                   "configurations; base: shared settings; gl.unlearn's keys) as tasks on a Dask "
                                   "cluster (default: local worker processes). Finished runs are kept and skipped "
                                   "when the same sweep runs again.")
    p.add_argument("spec", help="the sweep's YAML file")
    p.add_argument("-o", "--output", required=True, help="folder for the runs and the sweep's index")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="a Dask scheduler (default: local workers)")
    p.add_argument("--retries", type=_whole(0), default=1, help="retries of a failing run (default %(default)s)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("info", help="schema, configuration and a summary of a results file",
                       description="Print a results file's schema version, dims, configuration and a summary "
                                   "table (mean unlearning / retaining G-effect, start and end risks).")
    p.add_argument("path")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("compare", help="a summary table per objective for several results files",
                       description="One row per results file: mean e_u and e_r over the recorded steps, "
                                   "|e_r|/|e_u| (collateral damage per unit of forgetting: lower is better), "
                                   "and the forget / retain risk at the start and the end.")
    p.add_argument("paths", nargs="+")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("objectives", help="list the registered objectives and their parameters")
    p.set_defaults(func=_cmd_objectives)

    p = sub.add_parser("demo", help="GA, NPO and WGA on the bundled world, written to results/",
                       description="Run GA, NPO and WGA on forget05 with the 'target' zoo model for a short "
                                   "run, write results/<objective>.nc and print a summary table.")
    p.add_argument("--out", default="results", help="folder for the result files (default: results)")
    p.add_argument("--steps", type=_whole(1), default=15, help="updates per objective (default %(default)s)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("world", help="list the splits of a world",
                       description="Print the splits of the bundled world, or of a folder of TOFU JSON files.")
    p.add_argument("path", nargs="?", default=None, help="a folder of TOFU files (default: the bundled world)")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("zoo", help="list or build the tiny offline models",
                       description="'list' shows the zoo; 'build' trains the models from their recipes "
                                   "(deterministic; about a minute and a half each on two CPU cores).")
    p.add_argument("action", nargs="?", choices=["list", "build"], help="list the models, or build them")
    p.add_argument("names", nargs="*", help="zoo names to build (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild models that already exist")
    p.add_argument("--epochs", type=_whole(1), default=None, help="override the recipe's epochs (quick checks)")
    p.add_argument("--out", default=None, help="folder to build into (default: data/zoo)")
    p.set_defaults(func=_cmd_zoo)
    for command in sub.choices.values():  # the global options are also taken after the command
        command.add_argument("--import", dest="imports", action="append", default=argparse.SUPPRESS,
                             metavar="MODULE", help="import a module that registers objectives (repeatable; also "
                                                    "before the command)")
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error instead of one line")
    return parser


def _preimport(argv: list[str]) -> None:
    """Import ``--import`` modules before the parser is built, so their objectives are choices."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    if known.imports:
        import os

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        importlib.invalidate_caches()
    for module in known.imports:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - the user's module failed: name it, with its error
            raise ValueError(f"--import {module}: {type(err).__name__}: {err}") from err


# what a user's input can cause: one line and exit code 2, never a traceback (--debug shows it)
USER_ERRORS = (ValueError, KeyError, LookupError, OSError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        _preimport(argv)
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("geffect-lab: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into messages
        if debug:
            raise
        return _report(err)


def _report(err: Exception) -> int:
    """One line for an error a user can fix (exit 2); a bug of ours says so and where to report it (exit 1)."""
    from .runs import RunError

    if isinstance(err, USER_ERRORS) and not isinstance(err, (NotImplementedError, RecursionError)):
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"geffect-lab: error: {msg}", file=sys.stderr)
        if isinstance(err, RunError) and err.__cause__ is not None:
            print("  (run again with --debug for the traceback of the failure)", file=sys.stderr)
        return 2
    print(f"geffect-lab: internal error: {type(err).__name__}: {err}\n  This is a bug in geffect-lab, not in "
          "your input: please report it on the project's issue tracker with the command you ran and the output "
          "of the same command with --debug.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
