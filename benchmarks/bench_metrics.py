"""Time of TOFU's metrics on 40 forget + 40 retain instances with the zoo model (target: ≤ 10 s on 2 CPU cores).

    python benchmarks/bench_metrics.py

``gl.evaluate`` on forget10 (40 of its instances, evenly spread) and retain_perturbed (40): probability, truth
ratio (paraphrase + 5 perturbed answers each), ROUGE-L of batched greedy answers, exact memorisation, exact
extraction strength, forget quality against the zoo's retain_forget10 (its truth ratios computed on the first
call and cached), model utility. The "similar" extraction strength (greedy generation from every prefix) is
timed separately.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import wall_time  # noqa: E402

import geffect_lab as gl  # noqa: E402


def main(repeats: int = 3):
    world = gl.load_world()
    model, tok = gl.zoo.load("target")
    retain, _ = gl.zoo.load("retain_forget10")
    reference = gl.metrics.RetainReference(retain)
    kwargs = dict(world=world, forget="forget10", general=(), n=40)
    first = wall_time(lambda: gl.evaluate(model, tok, retain_model=gl.metrics.RetainReference(retain), **kwargs),
                      repeats)
    gl.evaluate(model, tok, retain_model=reference, **kwargs)
    cached = wall_time(lambda: gl.evaluate(model, tok, retain_model=reference, **kwargs), repeats)
    similar = wall_time(lambda: gl.evaluate(model, tok, retain_model=reference, similar_es=True, **kwargs), 1)
    print(f"evaluate, 40 forget + 40 retain instances, zoo target (median of {repeats}):")
    print(f"  with the retain model's truth ratios computed   {first:6.2f}s")
    print(f"  with them cached (as along a run)               {cached:6.2f}s")
    print(f"  plus the 'similar' extraction strength          {similar:6.2f}s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    main(parser.parse_args().repeats)
