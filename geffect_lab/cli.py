"""The ``geffect-lab`` command line.

    geffect-lab demo                 a first result on the bundled world
    geffect-lab world [PATH]         the splits of the bundled world (or of real TOFU files at PATH)
    geffect-lab zoo list|build       the tiny offline models

Run ``geffect-lab COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=Path(args.out))
    return 0


def _cmd_world(args: argparse.Namespace) -> int:
    from .data import load_world

    world = load_world(args.path)
    print(world)
    print(world.summary().to_string())
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from . import zoo

    if args.action == "list":
        for name, entry in zoo.ZOO.items():
            built = (zoo.zoo_dir() / name / "config.json").exists()
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
    parser = argparse.ArgumentParser(
        prog="geffect-lab",
        description="Exact G-effects of LLM unlearning objectives (Wang et al., ICLR 2025), per instance, "
                    "layer, token and step, on the bundled offline world or on real TOFU data.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="a first result on the bundled world, written to results/",
                       description="Load the bundled world and the 'target' zoo model, print a table of the "
                                   "splits with the model's greedy exact-match on each, and write it to "
                                   "OUT/demo_exact_match.csv.")
    p.add_argument("--out", default="results", help="folder for the result files (default: results)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("world", help="list the splits of a world",
                       description="Print the splits of the bundled world, or of a folder of TOFU JSON files.")
    p.add_argument("path", nargs="?", default=None, help="a folder of TOFU files (default: the bundled world)")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("zoo", help="list or build the tiny offline models",
                       description="'list' shows the zoo; 'build' trains the models from their recipes "
                                   "(deterministic; about a minute and a half each on two CPU cores).")
    p.add_argument("action", choices=["list", "build"])
    p.add_argument("names", nargs="*", help="zoo names to build (default: all)")
    p.add_argument("--force", action="store_true", help="rebuild models that already exist")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (quick checks)")
    p.add_argument("--out", default=None, help="folder to build into (default: data/zoo)")
    p.set_defaults(func=_cmd_zoo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"geffect-lab: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
