"""Which forget samples are worth unlearning? The forget samples ranked by their PG-effect, the top or bottom x %
unlearned alone, against a random x %, over 8 seeds — every statistic, window and test declared below before any
number is computed.

    make selection            # = .venv/bin/python docs/selection_study.py

writes docs/selection_ranking.csv (the ranking), docs/selection.csv (every claim and measured value, with every
seed's value) and the tables between the markers in docs/selection.md. Runs are kept in results/selection/ (a
re-run resumes; delete it to start over).

The ranking. On the zoo's ``target`` model, before any update, the paper's PG-effect of each of forget05's 50
samples, ``pg_j = <grad R(D), grad log p(s_j)>`` with D = all 50 forget05 samples (``pg_effect`` against
"targeted"). Gradient ascent on sample j moves θ along ``-grad log p(s_j)``, so to first order the forget risk
changes by ``-lr · pg_j``: a negative PG-effect pushes forgetting, and the most negative pushes it hardest.
"top x %": the x % most negative; "bottom x %": the x % least negative; "random x %": drawn per seed
(``numpy.random.default_rng(seed).choice(50, k, replace=False)``).

The runs. Each selection is unlearned alone with ``gl.unlearn`` at the package's defaults (AdamW, lr 3e-4,
batch 10 or the whole selection when it is smaller), GA and NPO, for 40 steps, the risks recorded at every
step on all 50 forget05 samples (the selected and the unselected ones) and on 32 held-out retain instances
(the default non-targeted evaluation set). A seed is the random subset and the batch order. A top or bottom
20 % (10 samples) is one batch: every step sees the same batch whatever the seed, so it is run once (seed 0)
and paired with every seed's random subset (tests/test_selection.py re-runs it with another seed). The whole
forget set (GA, 8 seeds) is run as a reference.

The statistics of one run (risks: mean answer NLL per token; rises: from step 0):
- ``forget_at_damage``: the rise of the mean forget05 risk (all 50 samples) when the rise of the mean held-out
  retain risk first reaches TAU = 0.1 nat (linear interpolation between steps; undefined if it never does) —
  forgetting at equal damage;
- ``unselected_at_damage``: the same on the forget05 samples the selection left out;
- ``forget_at_budget``, ``damage_at_budget``, ``forget_per_damage``: the forget rise, the retain rise and their
  ratio after BUDGET = 25 updates (the package's default run length on forget05).

The claims, one per objective, fraction (20 %, 50 %), selection (top, bottom) and statistic: per seed
``log10(statistic of the selection / statistic of that seed's random subset)``; the top x % is claimed to be
above the random x % (> 0), the bottom x % below it (< 0): for forgetting at equal damage the question itself,
for the damage at the budget the prediction that a harder push costs more damage. The test: the bootstrap 95 %
interval (percentile, 10 000 resamples of the seeds, fixed seed) of the mean over seeds lies on the claimed side
of 0 ("holds"), on the other side ("reversed"), or straddles it ("inconclusive"); a claim with a seed where the
statistic is undefined is "inconclusive".

A follow-up, declared after the first answer (the ranked selections above were measured first) and before its
own runs: the forget set D holds the sample itself, so its PG-effect carries the sample's own term
``<grad R_j, grad log p(s_j)> / 50``. ``pg_others`` leaves it out: the PG-effect of sample j on the mean risk of
the 49 other forget05 samples (from the 50 × 50 matrix ``<grad R_i, grad log p(s_j)>``, ``gl.g_effect`` with one
target set per sample). "top-others x %" / "bottom-others x %": the x % most / least negative ``pg_others``, run
and tested exactly as top and bottom (same seeds, same random subsets, same claimed sides).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import geffect_lab as gl
from geffect_lab.runs import select_eval

ROOT = Path(__file__).resolve().parents[1]
SEEDS = list(range(8))
OBJECTIVES = ("ga", "npo")
FRACTIONS = (0.2, 0.5)
SELECTIONS = ("top", "bottom", "random", "top-others", "bottom-others")
RANKED = {"top": ">", "bottom": "<", "top-others": ">", "bottom-others": "<"}  # the claimed side against random
STEPS, BUDGET, TAU, BATCH = 40, 25, 0.1, 10
STATISTICS = {  # name -> what the page calls it
    "forget_at_damage": f"forget rise at retain damage {TAU:g} nat",
    "unselected_at_damage": f"forget rise of the unselected samples at retain damage {TAU:g} nat",
    "forget_at_budget": f"forget rise after {BUDGET} steps",
    "damage_at_budget": f"retain rise after {BUDGET} steps",
    "forget_per_damage": f"forget rise / retain rise after {BUDGET} steps",
}
REFERENCE = ("ga", 1.0, "all")  # the whole forget set, for scale


def _findings_study():
    if "findings_study" not in sys.modules:  # its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("findings_study", Path(__file__).with_name("findings_study.py"))
        sys.modules["findings_study"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["findings_study"])
    return sys.modules["findings_study"]


bootstrap = _findings_study().bootstrap  # the same interval as docs/findings.md's


# ------------------------------------------------------------------------------------------ the ranking
def evaluation_sets(world) -> dict[str, list]:
    forget = list(world["forget05"])
    return {"targeted": forget, "non_targeted": select_eval(forget, list(world.retain("forget05")))["non_targeted"]}


def rank(model, tok, world) -> list[dict]:
    """forget05's samples, most negative PG-effect on the forget risk first (step 0, the target model)."""
    sets = evaluation_sets(world)
    ds = gl.g_effect(model, tok, "ga", forget=sets["targeted"], targets=sets, per_token=False)
    pg = ds.pg_effect.isel(step=0)
    risk = ds.risk.isel(step=0).to_series()
    rows = [{"id": e.id, "author": e.author, "answer_tokens": int(ds.sample_token_count.values[j]),
             "initial_risk": float(risk[e.id]), "pg_targeted": float(pg.sel(against="targeted").values[j]),
             "pg_non_targeted": float(pg.sel(against="non_targeted").values[j])}
            for j, e in enumerate(sets["targeted"])]
    for r, other, share in zip(rows, *others(model, tok, sets["targeted"])):
        r.update(pg_others=other, self_share=share)
    rows.sort(key=lambda r: r["pg_targeted"])
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def others(model, tok, forget: list) -> tuple[list[float], list[float]]:
    """Per forget sample j: its PG-effect on the mean risk of the *other* samples, and the share of its PG-effect
    on all of them that its own term carries (``<grad R_j, grad log p(s_j)> / n`` over ``pg_j``)."""
    ds = gl.g_effect(model, tok, "ga", forget=forget, targets={e.id: [e] for e in forget}, per_token=False)
    ids = [e.id for e in forget]
    matrix = ds.pg_effect.isel(step=0).sel(sample=ids, against=ids).values  # [j, i] = <grad R_i, grad log p(s_j)>
    own, n = np.diag(matrix), len(ids)
    return [float(v) for v in (matrix.sum(1) - own) / (n - 1)], [float(v) for v in own / matrix.sum(1)]


def select(ranking: list[dict], selection: str, fraction: float, seed: int) -> list[str]:
    """The ids of a selection, in forget05's order (the batch order is the run's seed's)."""
    ids = sorted(r["id"] for r in ranking)  # a fixed order for the random draw
    k = round(fraction * len(ranking))
    if selection in RANKED:
        by = sorted(ranking, key=lambda r: float(r["pg_others"])) if selection.endswith("-others") else ranking
        chosen = {r["id"] for r in (by[:k] if selection.startswith("top") else by[-k:])}
    elif selection == "random":
        chosen = {ids[i] for i in np.random.default_rng(seed).choice(len(ids), k, replace=False)}
    elif selection == "all":
        chosen = set(ids)
    else:
        raise ValueError(selection)
    return [i for i in ids if i in chosen]


def run_seed(selection: str, fraction: float, seed: int, n: int = 50) -> int:
    """A ranked selection of one batch is the same run for every seed: run it once, as seed 0."""
    return 0 if selection in RANKED and round(fraction * n) <= BATCH else seed


# ------------------------------------------------------------------------------------------ the runs
def unlearn(model, tok, world, objective: str, ids: list[str], seed: int, steps: int = STEPS):
    forget = [e for e in world["forget05"] if e.id in set(ids)]
    return gl.unlearn(model, tok, objective, forget=forget, eval=evaluation_sets(world), steps=steps, seed=seed,
                      batch_size=BATCH, record=(), progress=False)


def path(out: Path, objective: str, fraction: float, selection: str, seed: int) -> Path:
    return out / objective / f"{selection}{round(fraction * 100)}_s{seed}.nc"


def plan() -> list[tuple[str, float, str, int]]:
    runs = [(o, f, s, run_seed(s, f, seed)) for o in OBJECTIVES for f in FRACTIONS for s in SELECTIONS
            for seed in SEEDS]
    runs += [(*REFERENCE, seed) for seed in SEEDS]
    return list(dict.fromkeys(runs))


def run_all(out: Path, ranking: list[dict]) -> None:
    model, tok = gl.zoo.load("target")
    world = gl.load_world()
    todo = [r for r in plan() if not path(out, *r).exists()]
    for i, (objective, fraction, selection, seed) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {objective} {selection} {fraction:.0%} seed {seed}", flush=True)
        ds = unlearn(model, tok, world, objective, select(ranking, selection, fraction, seed), seed)
        target = path(out, objective, fraction, selection, seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        gl.save(ds, target)


# ------------------------------------------------------------------------------------------ the statistics
def at_damage(curve: np.ndarray, damage: np.ndarray, tau: float = TAU) -> float:
    """``curve`` where ``damage`` first reaches ``tau`` (linear between the steps around it); NaN if it never does."""
    reached = np.flatnonzero(damage >= tau)
    if not len(reached):
        return float("nan")
    i = int(reached[0])
    if i == 0:
        return float(curve[0])
    share = (tau - damage[i - 1]) / (damage[i] - damage[i - 1])
    return float(curve[i - 1] + share * (curve[i] - curve[i - 1]))


def measure(ds, selected: list[str]) -> dict[str, float]:
    """The statistics of one run (see the module's docstring)."""
    risk = ds.risk - ds.risk.isel(step=0)
    forget = ds.split == "targeted"
    unselected = forget & ~ds.instance.isin(selected)
    rise = risk.where(forget).mean("instance").values
    damage = risk.where(ds.split == "non_targeted").mean("instance").values
    rest = risk.where(unselected).mean("instance").values if bool(unselected.any()) else np.full_like(rise, np.nan)
    return {"forget_at_damage": at_damage(rise, damage), "unselected_at_damage": at_damage(rest, damage),
            "forget_at_budget": float(rise[BUDGET]), "damage_at_budget": float(damage[BUDGET]),
            "forget_per_damage": float(rise[BUDGET] / damage[BUDGET]),
            "step_at_damage": at_damage(np.arange(len(damage), dtype=float), damage)}


def read_runs(out: Path, ranking: list[dict]) -> dict:
    """{(objective, fraction, selection): [statistics of seed s for s in SEEDS]} for every complete setting."""
    values = {}
    for objective, fraction, selection in {r[:3] for r in plan()}:
        files = [path(out, objective, fraction, selection, run_seed(selection, fraction, s)) for s in SEEDS]
        if all(f.exists() for f in files):
            values[objective, fraction, selection] = [
                measure(gl.load(f), select(ranking, selection, fraction, s)) for f, s in zip(files, SEEDS)]
    return values


def verdict(side: str, low: float, high: float) -> str:
    if np.isnan(low) or np.isnan(high):
        return "inconclusive"
    on_side = high < 0 if side == "<" else low > 0
    against = low > 0 if side == "<" else high < 0
    return "holds" if on_side else "reversed" if against else "inconclusive"


def interval(per_seed: np.ndarray) -> tuple[float, float]:
    return (float("nan"), float("nan")) if np.isnan(per_seed).any() else bootstrap(per_seed)


def claims(values: dict) -> list[dict]:
    rows = []
    for objective in OBJECTIVES:
        for fraction in FRACTIONS:
            if (objective, fraction, "random") not in values:
                continue
            random = values[objective, fraction, "random"]
            for selection, side in RANKED.items():
                if (objective, fraction, selection) not in values:
                    continue
                chosen = values[objective, fraction, selection]
                for name, what in STATISTICS.items():
                    per_seed = np.array([np.log10(c[name] / r[name]) for c, r in zip(chosen, random)])
                    low, high = interval(per_seed)
                    rows.append({"objective": objective, "fraction": fraction, "selection": selection,
                                 "row": f"claim:{name}", "statistic": f"log10({what}: {selection} / random)",
                                 "test": f"mean {side} 0", "n_seeds": len(SEEDS), "mean": per_seed.mean(),
                                 "ci_low": low, "ci_high": high, "verdict": verdict(side, low, high),
                                 "per_seed": json.dumps([round(float(v), 6) for v in per_seed])})
    return rows


def measured(values: dict) -> list[dict]:
    """Every setting's statistics in nat (or steps), mean over the seeds with its interval: the page's scale."""
    rows = []
    for (objective, fraction, selection), runs in sorted(values.items()):
        for name in [*STATISTICS, "step_at_damage"]:
            per_seed = np.array([r[name] for r in runs])
            low, high = interval(per_seed)
            rows.append({"objective": objective, "fraction": fraction, "selection": selection, "row": f"value:{name}",
                         "statistic": STATISTICS.get(name, f"step at which the retain rise reaches {TAU:g} nat"),
                         "n_seeds": len(SEEDS), "mean": per_seed.mean(), "ci_low": low, "ci_high": high,
                         "per_seed": json.dumps([round(float(v), 6) for v in per_seed])})
    return rows


def facts(ranking: list[dict]) -> list[dict]:
    """What the ranking is made of: Spearman correlations of the PG-effect with the sample's own features."""
    pg = np.array([r["pg_targeted"] for r in ranking])
    rows = []
    for key, what in (("initial_risk", "the sample's own risk before unlearning"),
                      ("answer_tokens", "the sample's answer length"),
                      ("pg_non_targeted", "its PG-effect on the held-out retain risk"),
                      ("pg_others", "its PG-effect on the other forget samples' risk")):
        rho = stats.spearmanr(pg, [r[key] for r in ranking]).statistic
        rows.append({"row": f"fact:spearman_pg_{key}", "statistic": f"Spearman correlation of the PG-effect "
                     f"(forget risk) with {what}", "mean": rho})
    for fraction in FRACTIONS:
        k = round(fraction * len(ranking))
        top = {r["id"] for r in ranking[:k]}
        riskiest = {r["id"] for r in sorted(ranking, key=lambda r: -r["initial_risk"])[:k]}
        rows.append({"fraction": fraction, "selection": "top", "row": "fact:overlap_with_riskiest",
                     "statistic": f"share of the top {fraction:.0%} that are among the {k} samples of highest "
                     "initial risk", "mean": len(top & riskiest) / k})
    share = np.array([r["self_share"] for r in ranking])
    rows.append({"row": "fact:self_share", "statistic": "share of a sample's PG-effect on the forget set carried by "
                 "its own term (median; min, max)", "mean": np.median(share), "ci_low": share.min(),
                 "ci_high": share.max()})
    pg_others = np.array([r["pg_others"] for r in ranking])
    rows.append({"row": "fact:spearman_pg_others_initial_risk", "statistic": "Spearman correlation of the PG-effect "
                 "on the other forget samples with the sample's own risk before unlearning",
                 "mean": stats.spearmanr(pg_others, [r["initial_risk"] for r in ranking]).statistic})
    rows.append({"row": "fact:pg_others_negative", "statistic": "share of the samples whose PG-effect on the other "
                 "forget samples is negative (pushes their forgetting)", "mean": float((pg_others < 0).mean())})
    return rows


# ------------------------------------------------------------------------------------------ the files
FIELDS = ["objective", "fraction", "selection", "row", "statistic", "test", "n_seeds", "mean", "ci_low", "ci_high",
          "verdict", "per_seed"]
RANKING_FIELDS = ["rank", "id", "author", "answer_tokens", "initial_risk", "pg_targeted", "pg_non_targeted",
                  "pg_others", "self_share"]


write_csv, read_csv = _findings_study().write_csv, _findings_study().read_csv  # one CSV format for both pages


def _cell(r: dict, digits: str = ".3g", sign: str = "") -> str:
    if r["ci_low"] in ("", "nan"):
        return f"{float(r['mean']):{sign + digits}} (undefined on some seed)"
    mean, low, high = (format(float(r[k]), sign + digits) for k in ("mean", "ci_low", "ci_high"))
    return f"{mean} [{low}, {high}]"


def claims_table(rows: list[dict]) -> str:
    """One line per objective, fraction and selection; per statistic the mean over seeds of log10(selection /
    random) [95 % interval] and the verdict."""
    lines = ["| objective | x | selection | claimed | " + " | ".join(STATISTICS.values()) + " |",
             "|---" * (4 + len(STATISTICS)) + "|"]
    keyed = {(r["objective"], r["fraction"], r["selection"], r["row"]): r for r in rows}
    for objective, fraction, selection in dict.fromkeys((r["objective"], r["fraction"], r["selection"])
                                                        for r in rows if r["row"].startswith("claim:")):
        cells = [keyed[objective, fraction, selection, f"claim:{name}"] for name in STATISTICS]
        lines.append(f"| {objective.upper()} | {_pct(fraction)} | {selection} | {cells[0]['test'][5:]} | "
                     + " | ".join(f"{_cell(c, '.2f', '+')} **{c['verdict']}**" for c in cells) + " |")
    return "\n".join(lines)


def values_table(rows: list[dict]) -> str:
    """The statistics themselves (nat; steps), mean over seeds [95 % interval]."""
    names = [*STATISTICS, "step_at_damage"]
    heads = ["forget rise at damage τ", "unselected: forget rise at damage τ", f"forget rise, {BUDGET} steps",
             f"retain rise, {BUDGET} steps", "ratio", "step where damage reaches τ"]
    lines = ["| objective | x | selection | " + " | ".join(heads) + " |", "|---" * (3 + len(heads)) + "|"]
    keyed = {(r["objective"], r["fraction"], r["selection"], r["row"]): r for r in rows}
    order = {s: i for i, s in enumerate((*SELECTIONS, "all"))}
    settings = sorted({(r["objective"], r["fraction"], r["selection"]) for r in rows if r["row"].startswith("value:")},
                      key=lambda s: (OBJECTIVES.index(s[0]), float(s[1]), order[s[2]]))
    for setting in settings:
        cells = [keyed[(*setting, f"value:{name}")] for name in names]
        lines.append(f"| {setting[0].upper()} | {_pct(setting[1])} | {setting[2]} | "
                     + " | ".join("—" if c["mean"] == "nan" else _cell(c) for c in cells) + " |")
    return "\n".join(lines)


def ranking_table(ranking: list[dict], n: int = 5) -> str:
    lines = ["| rank | sample | answer tokens | own risk before (nat) | PG-effect, forget risk | its own term's "
             "share | PG-effect on the other samples | PG-effect, retain risk |", "|---|---|---|---|---|---|---|---|"]
    for r in ranking[:n] + ranking[-n:]:
        lines.append(f"| {r['rank']} | `{r['id']}` | {r['answer_tokens']} | {float(r['initial_risk']):.2g} | "
                     f"{float(r['pg_targeted']):.3g} | {float(r['self_share']):.0%} | {float(r['pg_others']):.3g} | "
                     f"{float(r['pg_non_targeted']):.3g} |")
    return "\n".join(lines)


def _pct(fraction) -> str:
    return f"{float(fraction) * 100:.0f} %"


def _times(r: dict) -> str:
    """A claim's mean log10 ratio and interval as factors: "1.08× [0.81×, 1.49×] (inconclusive)"."""
    mean, low, high = (10 ** float(r[k]) for k in ("mean", "ci_low", "ci_high"))
    return f"{mean:.2f}× [{low:.2f}×, {high:.2f}×] (*{r['verdict']}*)"


def answer(rows: list[dict]) -> str:
    """The measured answer in words, per objective and fraction, from the CSV's rows."""
    keyed = {(r["objective"], r["fraction"], r["selection"], r["row"]): r for r in rows}
    lines = []
    for objective, fraction in dict.fromkeys((r["objective"], r["fraction"]) for r in rows
                                             if r["row"].startswith("claim:")):
        parts = []
        for selection in [s for s in RANKED if (objective, fraction, s, "claim:forget_at_damage") in keyed]:
            c = {name: keyed[objective, fraction, selection, f"claim:{name}"] for name in STATISTICS}
            parts.append(f"the {selection} {_pct(fraction)} forgets all 50 samples {_times(c['forget_at_damage'])} "
                         f"as much as a random {_pct(fraction)} does, and the samples it leaves out "
                         f"{_times(c['unselected_at_damage'])}; after {BUDGET} steps its forget rise per retain rise "
                         f"is {_times(c['forget_per_damage'])} the random subset's")
        lines.append(f"- **{objective.upper()}, x = {_pct(fraction)}.** At equal damage ({TAU:g} nat), "
                     + ". At equal damage, ".join(parts) + ".")
    reference = [keyed.get((*key, "value:forget_at_damage"))
                 for key in (("ga", "1", "all"), ("ga", "0.2", "random"), ("ga", "0.5", "random"))]
    if all(reference):
        lines.append(f"- **For scale** (GA): the forget rise at {TAU:g} nat of damage is {_cell(reference[0])} nat "
                     f"when the whole forget set is unlearned, {_cell(reference[1])} for a random 20 % and "
                     f"{_cell(reference[2])} for a random 50 %.")
    facts = {r["row"]: float(r["mean"]) for r in rows if r["row"].startswith("fact:spearman")}
    overlap = {r["fraction"]: float(r["mean"]) for r in rows if r["row"] == "fact:overlap_with_riskiest"}
    if facts and overlap:
        lines.append(f"- **What the ranking is made of**: the PG-effect's Spearman correlation with the sample's own "
                     f"risk before unlearning is {facts['fact:spearman_pg_initial_risk']:.2f}, with its answer length "
                     f"{facts['fact:spearman_pg_answer_tokens']:.2f}, with its PG-effect on the retain risk "
                     f"{facts['fact:spearman_pg_pg_non_targeted']:.2f}; "
                     + ", ".join(f"{share:.0%} of the top {_pct(f)}" for f, share in overlap.items())
                     + " are among the samples of highest initial risk.")
    extra = {r["row"]: r for r in rows if r["row"] in ("fact:self_share", "fact:spearman_pg_others_initial_risk",
                                                       "fact:pg_others_negative")}
    if len(extra) == 3:
        own = extra["fact:self_share"]
        lines.append(f"- **The sample's own term** carries a median {float(own['mean']):.0%} of its PG-effect on the "
                     f"forget set (from {float(own['ci_low']):.0%} to {float(own['ci_high']):.0%}). Left out, the "
                     f"PG-effect on the other 49 samples is negative (pushes their forgetting) for "
                     f"{float(extra['fact:pg_others_negative']['mean']):.0%} of the samples only, and its Spearman "
                     f"correlation with the sample's own risk is "
                     f"{float(extra['fact:spearman_pg_others_initial_risk']['mean']):+.2f}.")
    return "\n".join(lines)


MARKERS = {name: (f"<!-- {name}: written by docs/selection_study.py -->", f"<!-- end of {name} -->")
           for name in ("ranking", "claims", "values", "answer")}


def tables(rows: list[dict], ranking: list[dict]) -> dict[str, str]:
    return {"ranking": ranking_table(ranking), "claims": claims_table(rows), "values": values_table(rows),
            "answer": answer(rows)}


def write_page(rows: list[dict], ranking: list[dict], page: Path) -> None:
    text = page.read_text()
    for name, table in tables(rows, ranking).items():
        begin, end = MARKERS[name]
        start, stop = text.index(begin) + len(begin), text.index(end)
        text = text[:start] + "\n" + table + "\n" + text[stop:]
    page.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "selection")
    parser.add_argument("--no-run", action="store_true", help="only evaluate the runs already finished")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = gl.zoo.load("target")
    ranking = rank(model, tok, gl.load_world())
    write_csv(ranking, ROOT / "docs" / "selection_ranking.csv", RANKING_FIELDS)
    if not args.no_run:
        run_all(args.out, ranking)
    values = read_runs(args.out, ranking)
    write_csv(claims(values) + measured(values) + facts(ranking), ROOT / "docs" / "selection.csv", FIELDS)
    rows = read_csv(ROOT / "docs" / "selection.csv")
    write_page(rows, read_csv(ROOT / "docs" / "selection_ranking.csv"), ROOT / "docs" / "selection.md")
    for r in rows:
        if r["row"].startswith("claim:"):
            print(f"{r['objective']:4s} {float(r['fraction']):4.0%} {r['selection']:7s} {r['row']:28s} "
                  f"{float(r['mean']):+8.3f} [{r['ci_low']}, {r['ci_high']}] {r['verdict']}")


if __name__ == "__main__":
    main()
