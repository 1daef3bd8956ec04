"""What rounding does to a step: the G-effect (the first-order effect of the exact gradient step) against the
update effect (the effect of the step the stored parameters really took), under plain SGD.

    .venv/bin/python docs/rounding_study.py        # prints the table; tests/test_rounding.py writes docs/rounding.md

Under SGD with a constant learning rate, θ_{t+1} = θ_t − lr·∇L exactly in real numbers, so
``update_effect = ⟨∇R_i, (θ_t − θ_{t+1})/lr⟩`` equals the G-effect ``⟨∇R_i, ∇L⟩``. In floating point the stored
θ_{t+1} is θ_t − lr·∇L rounded to the parameters' dtype: a step smaller than half the spacing of the numbers
near a weight is lost, and the others are rounded to that spacing. The table measures the gap per dtype and lr.
"""

from __future__ import annotations

import numpy as np
import torch

import geffect_lab as gl

SETTINGS = [("float64", 1e-4), ("float32", 1e-4), ("float32", 1e-3), ("float32", 1e-2), ("bfloat16", 1e-5),
            ("bfloat16", 1e-3)]


def gap(dtype: str, lr: float, *, steps: int = 3, n: int = 8, moving: list | None = None) -> dict:
    """Run ``steps`` SGD updates of GA in ``dtype`` at ``lr`` and compare the update effects with the G-effects:
    the largest gap in the mean over the targeted instances (e_u) over the steps, the median gap per instance,
    and, of the parameters in ``moving`` (those the float64 run changed), the share the updates left unchanged.
    Returns the row and the mask of the parameters this run changed."""
    model, tok = gl.zoo.load("target", dtype=getattr(torch, dtype))
    world = gl.load_world()
    before = [p.detach().clone() for p in model.parameters()]
    ds = gl.unlearn(model, tok, "ga", world=world, optimizer="sgd", lr=lr, steps=steps, batch_size=10,
                    eval={"targeted": world["forget05"][:n], "non_targeted": world["retain_perturbed"][:n]},
                    record=("g_effect", "update_effect"), inplace=True, progress=False)
    g = ds.g_effect.sum(["layer", "term"]).isel(step=slice(0, steps))
    u = ds.update_effect.sum("layer").isel(step=slice(0, steps))
    targeted = ds.split == "targeted"
    g_u, u_u = g.where(targeted).mean("instance").values, u.where(targeted).mean("instance").values
    changed = [p.detach() != b for p, b in zip(model.parameters(), before)]
    moving = moving if moving is not None else changed
    stuck = sum(int((m & ~c).sum()) for m, c in zip(moving, changed)) / sum(int(m.sum()) for m in moving)
    return {"dtype": dtype, "lr": lr, "e_u_gap": float(np.max(np.abs(u_u - g_u) / np.abs(g_u))),
            "median_gap": float(np.median(np.abs(u - g).values / np.abs(g).values)), "unchanged_share": stuck}, changed


def measure(settings=SETTINGS) -> list[dict]:
    """The table's rows; the float64 run (the first setting) says which parameters a step should move."""
    rows, moving = [], None
    for dtype, lr in settings:
        row, changed = gap(dtype, lr, moving=moving)
        moving = changed if moving is None else moving
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| weights | lr | gap in e_u: max over steps of \\|u − e\\| / \\|e\\| | median gap per instance and "
             "step | of the parameters a float64 step moves, left unchanged |", "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['lr']:g} | {r['e_u_gap']:.2g} | {r['median_gap']:.2g} | "
              f"{r['unchanged_share']:.1%} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(measure()))
