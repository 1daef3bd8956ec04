"""Reproduce the paper's qualitative findings on the bundled world, over several seeds.

    .venv/bin/python docs/findings_study.py --seeds 0 1 2 3

Runs each objective with gl.unlearn's defaults (zoo 'target', forget05, AdamW lr 3e-4, batch 10, 25 steps,
32 targeted + 32 held-out non-targeted instances) and prints, per seed, the quantities quoted in
docs/findings.md. The tests in tests/test_findings.py check the findings that reproduce, on seed 0.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

import geffect_lab as gl

RUNS = [("ga", "ga", {}), ("npo", "npo", {}), ("wga", "wga", {}), ("tnpo", "tnpo", {}), ("po", "po", {}),
        ("npo+gd", "npo+gd", {}), ("npo+kl", "npo+kl", {}), ("rmu@0", "rmu", {"layer": 0}),
        ("rmu@3", "rmu", {"layer": 3})]


def e_u(ds):
    return ds.geffect.unlearning().values[:-1]


def e_r(ds):
    return ds.geffect.retaining().values[:-1]


def mean_risk(ds, split):
    return ds.risk.where(ds.split == split).mean("instance").values


def study(seed: int, model, tok, world) -> dict:
    runs = {label: gl.unlearn(model, tok, obj, params=params, world=world, record=("g_effect",), seed=seed,
                              progress=False) for label, obj, params in RUNS}
    out: dict = {"seed": seed}
    weight = runs["npo"].sample_weight.mean("sample").values[:-1]
    decayed = weight < 0.1
    out["npo_weight"] = (weight[0], weight[-1], stats.spearmanr(np.arange(len(weight)), weight).statistic)
    out["decayed_steps"] = np.flatnonzero(decayed).tolist()
    for name in ("ga", "npo"):
        out[f"{name}_decayed"] = (e_u(runs[name])[decayed].mean(), e_r(runs[name])[decayed].mean())
        out[f"{name}_whole"] = (e_u(runs[name]).mean(), e_r(runs[name]).mean())
    for name in ("ga", "wga", "tnpo", "npo"):
        risk_f = mean_risk(runs[name], "targeted")
        t = int(np.argmax(risk_f >= 1.0)) if (risk_f >= 1.0).any() else len(risk_f) - 1
        ratio = abs(e_r(runs[name])[:t].sum()) / abs(e_u(runs[name])[:t].sum())
        out[f"{name}_matched"] = (t, ratio, mean_risk(runs[name], "non_targeted")[t])
    po = e_u(runs["po"])
    out["po"] = (abs(po.mean()) / abs(e_u(runs["ga"]).mean()), int((po > 0).sum()), int((po < 0).sum()))
    for name in ("npo+gd", "npo+kl"):
        reg = name.split("+")[1]
        ds = runs[name]
        term = ds.g_effect.sel(term=reg).sum("layer").where(ds.split == "non_targeted").mean("instance").values[1:-1]
        out[name] = (term.mean(), float((term > 0).mean()))
    for name in ("rmu@0", "rmu@3"):
        out[name] = (abs(e_u(runs[name])[:5].mean()), mean_risk(runs[name], "non_targeted")[-1])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    model, tok = gl.zoo.load("target")
    world = gl.load_world()
    for seed in args.seeds:
        r = study(seed, model, tok, world)
        print(f"\n== seed {seed}")
        print(f"NPO weight: step 0 {r['npo_weight'][0]:.3f}, last {r['npo_weight'][1]:.3f}, "
              f"Spearman with step {r['npo_weight'][2]:.3f}; steps with weight < 0.1: {r['decayed_steps']}")
        for name in ("ga", "npo"):
            decayed, whole = r[name + "_decayed"], r[name + "_whole"]
            print(f"{name:4s} mean e_u / e_r once NPO's weight < 0.1: {decayed[0]:9.3g} {decayed[1]:9.3g}; "
                  f"whole run: {whole[0]:9.3g} {whole[1]:9.3g}")
        for name in ("ga", "wga", "tnpo", "npo"):
            t, ratio, rr = r[name + "_matched"]
            print(f"{name:4s} until forget risk >= 1 nat (step {t:2d}): |sum e_r|/|sum e_u| {ratio:.4f}, "
                  f"retain risk {rr:.4f}")
        print(f"po   |mean e_u| / GA's {r['po'][0]:.3f}; steps with e_u > 0: {r['po'][1]}, < 0: {r['po'][2]}")
        for name in ("npo+gd", "npo+kl"):
            print(f"{name}: regulariser's retaining G-effect, mean over steps 1.. {r[name][0]:.3g}, "
                  f"positive at {r[name][1]:.0%} of steps")
        print(f"rmu  mean |e_u| over the first 5 steps: layer 0 {r['rmu@0'][0]:.3g}, layer 3 {r['rmu@3'][0]:.3g} "
              f"({r['rmu@3'][0] / r['rmu@0'][0]:.1f}x); final retain risk {r['rmu@0'][1]:.2f} vs {r['rmu@3'][1]:.2f}")


if __name__ == "__main__":
    main()
