"""The cost of recording: an unlearning run that measures G-effects every step against the same run without.

    python benchmarks/bench_run.py
    python benchmarks/bench_run.py --profile     # where the default run's time goes (cProfile, top by own time)

Zoo `target`, NPO on forget05, batch 16, 10 steps, 32 targeted + 32 non-targeted evaluation instances. Rows:

- ``no recording``: the same optimisation, recording nothing per step (risks at the start and the end only);
- ``g_effect``: per instance × layer × term G-effects every step (``every 2``: every other step);
- ``+ update_effect``: and the optimiser's actual step, in the same pass;
- ``+ g_effect_token``, ``+ pg/sample_effect``: G-effects with the per-token G-effects, or with the per-sample
  effects (each half of the default's extra cost);
- ``everything``: also per-token G-effects and the per-sample PG-effect and sample effect (the default);
- ``everything, costly every 5``: the same with per-token G-effects and the per-sample effects every 5th step
  (``record_every={"g_effect_token": 5, "pg_effect": 5, "sample_effect": 5}``), the rest every step.

Prints wall time per run and its ratio to ``no recording``, measured side by side in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import wall_time  # noqa: E402

import geffect_lab as gl  # noqa: E402

VARIANTS = {  # name: (record, record_every)
    "no recording": ((), 1),
    "g_effect": (("g_effect",), 1),
    "g_effect, every 2": (("g_effect",), 2),
    "+ update_effect": (("g_effect", "update_effect"), 1),
    "+ g_effect_token": (("g_effect", "g_effect_token"), 1),
    "+ pg/sample_effect": (("g_effect", "pg_effect", "sample_effect"), 1),
    "everything": (gl.runs.RECORD_ALL, 1),
    "everything, costly every 5": (gl.runs.RECORD_ALL, {"g_effect_token": 5, "pg_effect": 5, "sample_effect": 5}),
}


def main(repeats: int = 3, steps: int = 10):
    model, tok = gl.zoo.load("target")
    world = gl.load_world()
    times = {}
    for name, (record, every) in VARIANTS.items():
        times[name] = wall_time(lambda record=record, every=every: gl.unlearn(
            model, tok, "npo", world=world, steps=steps, batch_size=16, record=record, record_every=every,
            progress=False), repeats)
    # the same with as many evaluation instances as the batch has samples (8 + 8)
    small = gl.runs.select_eval(world["forget05"], world["retain95"], 8)
    for name, record in (("no recording, 8+8", ()), ("g_effect, 8+8", ("g_effect",))):
        times[name] = wall_time(lambda record=record: gl.unlearn(
            model, tok, "npo", world=world, steps=steps, batch_size=16, record=record, eval=small,
            progress=False), repeats)
    print(f"zoo target, npo, batch 16, {steps} steps, 32 + 32 evaluation instances, median of {repeats}")
    for name, t in times.items():
        base = times["no recording, 8+8" if name.endswith("8+8") else "no recording"]
        print(f"{name:28s} {t:7.2f}s  {t / base:5.2f}x")


def profile(steps: int = 10, top: int = 12) -> None:
    """Where the default run's time goes: cProfile of one run recording everything, its top functions by own time."""
    import cProfile
    import pstats

    model, tok = gl.zoo.load("target")
    world = gl.load_world()
    args = dict(world=world, batch_size=16, progress=False)
    gl.unlearn(model, tok, "npo", steps=2, **args)  # warm-up
    prof = cProfile.Profile()
    prof.runcall(gl.unlearn, model, tok, "npo", steps=steps, **args)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="profile the default run instead")
    args = parser.parse_args()
    profile(args.steps) if args.profile else main(args.repeats, args.steps)
