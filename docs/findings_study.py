"""The findings of docs/findings.md, each declared (window, statistic, test) before any number is computed, measured
over 8 seeds on the sweep machinery (``gl.sweep``), with bootstrap 95 % intervals.

    make findings            # = .venv/bin/python docs/findings_study.py

writes docs/findings.csv (one row per claim and setting, with every seed's value) and the table between the
markers in docs/findings.md. Runs are kept in results/findings/ (a re-run resumes; delete it to start over).

What a seed is: ``gl.unlearn``'s seed, i.e. the order of the forget batches (forget05 has 50 samples, batches of
10). The model, the data and the 32 + 32 measured instances are the same for every seed.

The test of every claim: the bootstrap 95 % interval (percentile, 10 000 resamples of the seeds, fixed seed) of
the mean over seeds lies on the claimed side of the threshold ("holds"), on the other side ("reversed"), or
straddles it ("inconclusive").
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from scipy import stats

import geffect_lab as gl

ROOT = Path(__file__).resolve().parents[1]
SEEDS = list(range(8))
BASE = {"record": ["g_effect"], "forget": "forget05"}  # gl.unlearn's defaults otherwise
# the runs: label -> (objective, params), in the order they are run (a sweep cut short keeps the first ones)
RUNS = {"ga": ("ga", {}), "npo": ("npo", {}), "wga α=5": ("wga", {"alpha": 5.0}), "tnpo β=4": ("tnpo", {"beta": 4.0}),
        "wga α=1": ("wga", {"alpha": 1.0}), "po": ("po", {}), "npo+gd": ("npo+gd", {}), "npo+kl": ("npo+kl", {}),
        "rmu@0": ("rmu", {"layer": 0}), "rmu@3": ("rmu", {"layer": 3}), "dpo": ("dpo", {}),
        "wtnpo α=1.5 β=4": ("wtnpo", {"alpha": 1.5, "beta": 4.0}), "wga α=0.5": ("wga", {"alpha": 0.5}),
        "tnpo β=1": ("tnpo", {"beta": 1.0})}
# the WGA/TNPO question: the paper code's defaults (WGA α=5, TNPO β=4, WTNPO α=1.5 β=4), the figures' values
# (α=0.5, β=1) and this page's earlier setting (α=1), asked of each model
WEIGHTED = ["wga α=5", "tnpo β=4", "wga α=1", "wtnpo α=1.5 β=4", "wga α=0.5", "tnpo β=1"]
# every setting but α=1 (this page's earlier one) on every study model
SETTINGS = [w for w in WEIGHTED if w != "wga α=1"]
MODELS = {"target": list(RUNS), "target-15ep": ["ga", *SETTINGS], "target-2stage": ["ga", *SETTINGS],
          "target-x4": ["ga", *SETTINGS], "target-x16": ["ga", *SETTINGS], "tofu-target": ["ga", "npo", *SETTINGS]}
# the real TOFU's forget05 has 200 samples: 25 steps of 10 (the same number of updates as on the bundled world,
# 1.25 passes instead of 5)
MODEL_BASE = {"tofu-target": {"world": str(gl.data.tofu_dir()), "steps": 25}}
# the order the sweeps run in: the WGA/TNPO question at the paper code's defaults on every model first, then the
# other claims, then the figures' settings on the models measured at the defaults first
CODE_DEFAULTS = ["ga", "wga α=5", "tnpo β=4"]
PLAN = ([("target", label) for label in ("ga", "npo", *CODE_DEFAULTS[1:])]
        + [(m, label) for m in ("target-15ep", "target-2stage") for label in CODE_DEFAULTS]
        + [("target", label) for label in RUNS if label not in ("ga", "npo", "wga α=5", "tnpo β=4")]
        + [("tofu-target", label) for label in ("ga", "npo", *CODE_DEFAULTS[1:])]
        + [(m, label) for m in ("target-x4", "target-x16") for label in CODE_DEFAULTS]
        + [(m, label) for m in ("target-15ep", "target-x4", "target-2stage", "tofu-target", "target-x16")
           for label in SETTINGS if label not in CODE_DEFAULTS])


# ------------------------------------------------------------------------------------------ the statistics
def e_u(ds):
    return ds.geffect.unlearning().values[:-1]  # steps 0..24: the G-effects of the 25 updates


def e_r(ds):
    return ds.geffect.retaining().values[:-1]


def mean_risk(ds, split):
    return ds.risk.where(ds.split == split).mean("instance").values


def npo_weight(ds):
    return ds.sample_weight.mean("sample").values[:-1]


def until_one_nat(ds) -> int:
    """The window of the WGA/TNPO claim: the steps before the mean targeted risk first rises 1 nat above its value
    before unlearning (the whole run when it never does). On the bundled world's models, which start near 0 nat,
    this is "until the risk reaches 1 nat"; the rise is what compares across models (tofu-target starts higher)."""
    risk = mean_risk(ds, "targeted")[:-1]
    risen = risk - risk[0] >= 1.0
    return int(np.argmax(risen)) if risen.any() else len(risk)


def damage_per_forgetting(ds) -> float:
    t = max(until_one_nat(ds), 1)
    return abs(e_r(ds)[:t].sum()) / abs(e_u(ds)[:t].sum())


def regulariser_e_r(ds, reg):
    term = ds.g_effect.sel(term=reg).sum("layer").where(ds.split == "non_targeted").mean("instance").values
    return term[1:-1]  # at step 0 KL's gradient is 0 (the model is its own reference)


def _damage_against_ga(label: str, runs) -> float:
    return _log_ratio(damage_per_forgetting(runs[label]), damage_per_forgetting(runs["ga"]))


def _log_ratio(a: float, b: float) -> float:
    return float(np.log10(abs(a) / abs(b)))


@dataclass(frozen=True)
class Claim:
    name: str
    paper: str         # what the paper reports (Llama-2-7B) or what the definitions predict
    window: str
    statistic: str
    side: str          # "<" or ">": the claimed side of the threshold
    threshold: float
    value: Callable    # (runs of one seed: label -> Dataset) -> float
    needs: tuple[str, ...]


CLAIMS = [
    Claim("npo_weight_decays", "NPO's weight 2p^β/(p^β+p_o^β) decays towards 0", "steps 0–24",
          "Spearman correlation of NPO's mean sample weight with the step", "<", -0.9,
          lambda r: stats.spearmanr(np.arange(25), npo_weight(r["npo"])).statistic, ("npo",)),
    Claim("npo_weight_small_at_end", "NPO's weight decays towards 0", "step 24", "NPO's mean sample weight",
          "<", 0.1, lambda r: npo_weight(r["npo"])[-1], ("npo",)),
    Claim("ga_e_u_beyond_npo_once_decayed", "GA's e_u larger in magnitude than NPO's",
          "the steps where NPO's mean weight < 0.1", "log10(|mean e_u GA| / |mean e_u NPO|)", ">", 0.0,
          lambda r: _log_ratio(e_u(r["ga"])[npo_weight(r["npo"]) < 0.1].mean(),
                               e_u(r["npo"])[npo_weight(r["npo"]) < 0.1].mean()), ("ga", "npo")),
    Claim("ga_e_r_beyond_npo_once_decayed", "GA's e_r larger in magnitude than NPO's (more damage)",
          "the steps where NPO's mean weight < 0.1", "log10(|mean e_r GA| / |mean e_r NPO|)", ">", 0.0,
          lambda r: _log_ratio(e_r(r["ga"])[npo_weight(r["npo"]) < 0.1].mean(),
                               e_r(r["npo"])[npo_weight(r["npo"]) < 0.1].mean()), ("ga", "npo")),
    Claim("npo_e_u_beyond_ga_whole_run", "prediction from DESIGN's definitions: NPO's loss sums the answer's "
          "token log-probabilities, GA's averages them, so until NPO's weight falls below 1/|a| NPO pushes harder",
          "steps 0–24", "log10(|mean e_u NPO| / |mean e_u GA|)", ">", 0.0,
          lambda r: _log_ratio(e_u(r["npo"]).mean(), e_u(r["ga"]).mean()), ("ga", "npo")),
    Claim("ga_shallow_layers", "GA's effect sits in the shallow layers", "step 0",
          "share of GA's e_u carried by the embedding and block 0", ">", 0.5,
          lambda r: float(r["ga"].geffect.unlearning(keep=("layer",)).isel(step=0).sel(layer=["embed", "layers.0"])
                          .sum() / r["ga"].geffect.unlearning(keep=("layer",)).isel(step=0).sum()), ("ga",)),
    Claim("po_weak", "PO is weak next to GA", "steps 0–24", "|mean e_u PO| / |mean e_u GA|", "<", 0.1,
          lambda r: abs(e_u(r["po"]).mean()) / abs(e_u(r["ga"]).mean()), ("ga", "po")),
    Claim("po_changes_sign", "PO oscillates", "steps 0–24", "fraction of steps with PO's e_u > 0", ">", 0.1,
          lambda r: float((e_u(r["po"]) > 0).mean()), ("po",)),
    Claim("gd_retains", "the GD regulariser retains (positive e_r)", "steps 1–24",
          "mean e_r of NPO+GD's gd term", ">", 0.0, lambda r: regulariser_e_r(r["npo+gd"], "gd").mean(),
          ("npo+gd",)),
    Claim("kl_retains", "the KL regulariser retains (positive e_r)", "steps 1–24",
          "mean e_r of NPO+KL's kl term", ">", 0.0, lambda r: regulariser_e_r(r["npo+kl"], "kl").mean(),
          ("npo+kl",)),
    Claim("rmu_layer_matters", "RMU depends on its layer", "steps 0–4",
          "log10(|mean e_u RMU block 3| / |mean e_u RMU block 0|)", ">", 0.0,
          lambda r: _log_ratio(e_u(r["rmu@3"])[:5].mean(), e_u(r["rmu@0"])[:5].mean()), ("rmu@0", "rmu@3")),
    Claim("dpo_weight_collapses", "ours: DPO's weight 2σ(−β·margin) collapses before the answers move",
          "step 5", "DPO's mean sample weight", "<", 0.1, lambda r: float(r["dpo"].sample_weight.mean("sample")
                                                                            .values[5]), ("dpo",)),
    Claim("dpo_barely_forgets", "ours: DPO barely moves the forget risk at lr 3e-4", "steps 0–25",
          "forget-risk rise of DPO / that of GA", "<", 0.1,
          lambda r: float((mean_risk(r["dpo"], "targeted")[-1] - mean_risk(r["dpo"], "targeted")[0])
                          / (mean_risk(r["ga"], "targeted")[-1] - mean_risk(r["ga"], "targeted")[0])), ("dpo", "ga")),
] + [
    Claim(f"less_damage_than_ga[{w}]", f"{w.split()[0].upper()}: smaller |e_r|/|e_u| than GA",
          "the steps before the mean forget risk rises 1 nat above its start (the whole run if it never does)",
          f"log10((|Σe_r|/|Σe_u|) of {w} / that of GA)", "<", 0.0,
          partial(_damage_against_ga, w),
          ("ga", w))
    for w in WEIGHTED
]


# ------------------------------------------------------------------------------------------ the runs
def folder(out: Path, model: str, label: str) -> Path:
    return out / model / re.sub(r"[^A-Za-z0-9.+@=-]+", "_", label)


def run_sweeps(out: Path, plan: list[tuple[str, str]], seeds: list[int]) -> None:
    """Every (model, run label) of ``plan`` over the seeds, one sweep folder each (finished runs are kept and
    skipped: a re-run resumes)."""
    for model, label in plan:
        gl.zoo.load(model)  # a study model is built here, once, not by every worker
        objective, params = RUNS[label]
        gl.sweep({"seed": seeds}, base={**BASE, **MODEL_BASE.get(model, {}), "model": model, "objective": objective,
                                        "params": params},
                 out=folder(out, model, label), progress=False)


def read_runs(out: Path, models: dict[str, list[str]], seeds: list[int]) -> dict:
    """{(model, label): {seed: Dataset}} for every (model, label) whose runs for all ``seeds`` are finished."""
    runs = {}
    for model, labels in models.items():
        for label in labels:
            index = folder(out, model, label) / "sweep.json"
            if not index.exists():
                continue
            done = {int(r["settings"]["seed"]): folder(out, model, label) / f"{name}.nc"
                    for name, r in json.loads(index.read_text())["runs"].items() if r["status"] == "done"}
            if set(seeds) <= set(done):
                runs[model, label] = {s: gl.load(done[s]) for s in seeds}
    return runs


def bootstrap(values: np.ndarray) -> tuple[float, float]:
    if len(values) < 2:
        return float("nan"), float("nan")
    ci = stats.bootstrap((values,), np.mean, n_resamples=10_000, confidence_level=0.95, method="percentile",
                         random_state=np.random.default_rng(0)).confidence_interval
    return float(ci.low), float(ci.high)


def verdict(claim: Claim, low: float, high: float) -> str:
    on_side = (high < claim.threshold) if claim.side == "<" else (low > claim.threshold)
    against = (low > claim.threshold) if claim.side == "<" else (high < claim.threshold)
    return "holds" if on_side else "reversed" if against else "inconclusive"


def evaluate_claims(runs: dict, seeds: list[int]) -> list[dict]:
    rows = []
    for model in MODELS:
        for claim in CLAIMS:
            if not all((model, n) in runs for n in claim.needs):
                continue
            per_seed = np.array([claim.value({n: runs[model, n][s] for n in claim.needs}) for s in seeds], float)
            low, high = bootstrap(per_seed)
            rows.append({"model": model, "claim": claim.name, "paper": claim.paper, "window": claim.window,
                         "statistic": claim.statistic, "test": f"mean {claim.side} {claim.threshold:g}",
                         "n_seeds": len(seeds), "mean": per_seed.mean(), "ci_low": low, "ci_high": high,
                         "verdict": verdict(claim, low, high),
                         "per_seed": json.dumps([round(float(v), 6) for v in per_seed])})
    return rows


def facts(runs: dict) -> list[dict]:
    """Numbers the page quotes that are not claims: answer lengths, the models' saturation."""
    rows = []
    for name in ["target"] + [m for m in MODEL_BASE if (m, "ga") in runs]:
        _, tok = gl.zoo.load(name)
        world = gl.load_world(MODEL_BASE[name]["world"]) if name in MODEL_BASE else gl.load_world()
        lengths = (gl.encode(tok, world["forget05"])["labels"][:, 1:] != -100).sum(1).numpy()
        rows.append({"model": name, "claim": "fact:forget05_answer_tokens", "statistic": "answer tokens per "
                     "forget05 sample (min, mean, max)", "mean": lengths.mean(), "ci_low": lengths.min(),
                     "ci_high": lengths.max()})
    rows += tofu_facts()
    for name in [m for m in MODELS if (m, "ga") in runs]:
        ds = runs[name, "ga"][0]
        risk = mean_risk(ds, "targeted")[0]
        rows.append({"model": name, "claim": "fact:initial_forget_nll", "statistic": "mean targeted answer NLL "
                     "per token before unlearning (nat)", "mean": float(risk)})
    return rows


def tofu_facts() -> list[dict]:
    """What tofu-target knows of forget05 before unlearning, next to the retain model that never saw it (when both
    are built): teacher-forced token accuracy on the answers, and TOFU's forget quality of the target against the
    retain model (a KS test of the truth ratios; near 0 = the target's knowledge of forget05 is visible)."""
    from geffect_lab import metrics

    pair = ("tofu-target", "tofu-retain_forget05")
    if not all((gl.zoo.entry_dir(m) / "config.json").exists() for m in pair):
        return []
    forget05 = gl.load_world(MODEL_BASE["tofu-target"]["world"])["forget05"]
    rows, ratios = [], {}
    for name in pair:
        model, tok = gl.zoo.load(name)
        rows.append({"model": name, "claim": "fact:forget05_exact_memorization", "statistic": "share of forget05's "
                     "answer tokens the argmax predicts (teacher forcing)",
                     "mean": float(metrics.exact_memorization(model, tok, forget05).mean())})
        ratios[name] = metrics.truth_ratio(model, tok, forget05)
    rows.append({"model": pair[0], "claim": "fact:forget_quality_before_unlearning", "statistic": "TOFU's forget "
                 "quality on forget05 against tofu-retain_forget05 (KS p-value of the truth ratios)",
                 "mean": metrics.forget_quality(ratios[pair[0]], ratios[pair[1]])})
    return rows


FIELDS = ["model", "claim", "paper", "window", "statistic", "test", "n_seeds", "mean", "ci_low", "ci_high",
          "verdict", "per_seed"]


def write_csv(rows: list[dict], path: Path, fields: list[str] = FIELDS) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, (float, np.floating)) else v)
                             for k, v in row.items()})


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def table(rows: list[dict]) -> str:
    """The page's table, from the CSV's rows (the page quotes nothing else)."""
    lines = ["| model | claim | window | statistic | test | mean over seeds [95 % CI] | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["claim"].startswith("fact:"):
            continue
        lines.append(f"| {r['model']} | {r['paper']} | {r['window']} | {r['statistic']} | {r['test']} | "
                     f"{float(r['mean']):.3g} [{float(r['ci_low']):.3g}, {float(r['ci_high']):.3g}] "
                     f"(n = {r['n_seeds']}) | **{r['verdict']}** |")
    return "\n".join(lines)


BEGIN, END = "<!-- findings table: written by docs/findings_study.py -->", "<!-- end of findings table -->"


def write_page(rows: list[dict], page: Path) -> None:
    text = page.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    page.write_text(text[:start] + "\n" + table(rows) + "\n" + text[stop:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "findings")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-run", action="store_true", help="only evaluate the runs already finished")
    args = parser.parse_args(argv)
    if not args.no_run:
        run_sweeps(args.out, [(m, label) for m, label in PLAN if m in args.models], SEEDS)
    runs = read_runs(args.out, MODELS, SEEDS)
    rows = evaluate_claims(runs, SEEDS) + facts(runs)
    write_csv(rows, ROOT / "docs" / "findings.csv")
    write_page(read_csv(ROOT / "docs" / "findings.csv"), ROOT / "docs" / "findings.md")
    for r in rows:
        if not r["claim"].startswith("fact:"):
            print(f"{r['model']:14s} {r['claim']:40s} {r['mean']:10.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}] "
                  f"{r['verdict']}")


if __name__ == "__main__":
    main()
