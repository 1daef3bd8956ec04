"""Which forget samples are worth unlearning (docs/selection.md): the page quotes docs/selection.csv and
docs/selection_ranking.csv and nothing else; each verdict follows from its 8 seeds (bootstrap 95 % interval of the
mean, declared in docs/selection_study.py before any number); each claim is the selection's measured values
against the random subset's, seed by seed; and the CSVs are what the command computes (the ranking, and runs
of the study re-done here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("selection_study", ROOT / "docs" / "selection_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["selection_study"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(study):
    return {(r["objective"], r["fraction"], r["selection"], r["row"]): r
            for r in study.read_csv(ROOT / "docs" / "selection.csv")}


@pytest.fixture(scope="module")
def ranking(study):
    return study.read_csv(ROOT / "docs" / "selection_ranking.csv")


@pytest.fixture
def one_thread():
    """The study runs single-threaded, and so do its re-runs here: on a busy two-core machine two threads made them
    25 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_page_quotes_the_csvs(study, rows, ranking):
    text = (ROOT / "docs" / "selection.md").read_text()
    for name, table in study.tables(list(rows.values()), ranking).items():
        begin, end = study.MARKERS[name]
        assert text[text.index(begin) + len(begin):text.index(end)] == "\n" + table + "\n", name


def test_every_declared_claim_is_measured(study, rows):
    claims = {k for k in rows if k[3].startswith("claim:")}
    assert claims == {(o, str(f), s, f"claim:{name}") for o in study.OBJECTIVES for f in study.FRACTIONS
                      for s in study.RANKED for name in study.STATISTICS}


def test_each_verdict_follows_from_its_seeds(study, rows):
    for key, row in rows.items():
        if key[3].startswith("fact:"):
            continue
        per_seed = np.array(json.loads(row["per_seed"]), float)
        assert len(per_seed) == int(row["n_seeds"]) == len(study.SEEDS) == 8, key
        if np.isnan(per_seed).all():
            assert row["mean"] == "nan", key  # the unselected samples of the whole forget set: none
            continue
        assert float(row["mean"]) == pytest.approx(per_seed.mean(), rel=1e-4, abs=1e-6), key
        low, high = study.interval(per_seed)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), rel=1e-4, abs=1e-6,
                                                                             nan_ok=True), key
        if key[3].startswith("claim:"):
            assert row["verdict"] == study.verdict(row["test"].split()[1], low, high), key


def test_each_claim_is_the_selection_against_the_random_subset(study, rows):
    """Seed by seed, log10(the selection's value / that seed's random subset's value), from the value rows."""
    for (objective, fraction, selection, name), row in rows.items():
        if not name.startswith("claim:"):
            continue
        statistic = name.removeprefix("claim:")
        chosen = json.loads(rows[objective, fraction, selection, f"value:{statistic}"]["per_seed"])
        random = json.loads(rows[objective, fraction, "random", f"value:{statistic}"]["per_seed"])
        assert json.loads(row["per_seed"]) == pytest.approx(np.log10(np.divide(chosen, random)), abs=2e-5)


def test_the_ranking_is_what_the_command_computes(study, ranking, target, world, one_thread):
    model, tok = target
    again = {r["id"]: r for r in study.rank(model, tok, world)}
    assert [r["id"] for r in ranking] == list(again)  # the same order (neighbours differ by ≥ 1 %)
    for r in ranking:
        for key in ("initial_risk", "pg_targeted", "pg_non_targeted", "pg_others", "self_share"):
            assert float(r[key]) == pytest.approx(again[r["id"]][key], rel=1e-3, abs=1e-9), (r["id"], key)
        assert int(r["answer_tokens"]) == again[r["id"]]["answer_tokens"]


@pytest.mark.slow
def test_the_runs_are_what_the_command_computes(study, rows, ranking, target, world, one_thread):
    """The GA top 20 % re-run with another seed (a one-batch selection: the seed changes nothing) and seed 3's
    random 20 %, for the first BUDGET steps: their statistics at the budget are the CSV's."""
    model, tok = target
    for selection, seed, recorded_seed in (("top", 5, 0), ("random", 3, 3)):
        ids = study.select(ranking, selection, 0.2, seed)
        measured = study.measure(study.unlearn(model, tok, world, "ga", ids, seed, steps=study.BUDGET), ids)
        for name in ("forget_at_budget", "damage_at_budget"):
            recorded = json.loads(rows["ga", "0.2", selection, f"value:{name}"]["per_seed"])[recorded_seed]
            assert measured[name] == pytest.approx(recorded, rel=1e-3), (selection, name)


# The directions over 8 seeds (docs/selection.csv) that the page's answer states in words, held here.
EXPECTED: dict[tuple[str, str, str, str], str] = {
    **{(o, "0.2", "top", f"claim:{n}"): "inconclusive" for o in ("ga", "npo")
       for n in ("forget_at_damage", "unselected_at_damage")},
    ("ga", "0.5", "top", "claim:unselected_at_damage"): "reversed",
    ("npo", "0.5", "top", "claim:forget_at_damage"): "reversed",
    ("npo", "0.5", "top", "claim:unselected_at_damage"): "reversed",
    ("ga", "0.5", "bottom", "claim:unselected_at_damage"): "reversed",
    ("npo", "0.5", "bottom", "claim:forget_at_damage"): "reversed",
    ("npo", "0.5", "bottom", "claim:unselected_at_damage"): "reversed",
    ("npo", "0.2", "bottom", "claim:forget_at_damage"): "holds",
    ("npo", "0.2", "bottom", "claim:unselected_at_damage"): "holds",
    ("npo", "0.2", "top", "claim:damage_at_budget"): "holds",
    ("npo", "0.2", "top", "claim:forget_per_damage"): "reversed",
    # the follow-up: ranked by the PG-effect on the other samples
    ("ga", "0.2", "top-others", "claim:forget_at_damage"): "holds",
    ("ga", "0.5", "top-others", "claim:forget_at_damage"): "holds",
    ("npo", "0.5", "top-others", "claim:forget_at_damage"): "holds",
    ("npo", "0.2", "top-others", "claim:forget_at_damage"): "inconclusive",
    ("npo", "0.5", "top-others", "claim:unselected_at_damage"): "holds",
    ("ga", "0.5", "top-others", "claim:damage_at_budget"): "holds",
    ("ga", "0.5", "top-others", "claim:forget_per_damage"): "reversed",
    **{(o, f, "bottom-others", "claim:forget_at_damage"): "inconclusive" for o in ("ga", "npo")
       for f in ("0.2", "0.5")},
    **{(o, "0.5", "bottom-others", "claim:unselected_at_damage"): "reversed" for o in ("ga", "npo")},
}


def test_the_claims_hold_in_the_direction_the_page_says(rows):
    for key, verdict in EXPECTED.items():
        assert rows[key]["verdict"] == verdict, (key, rows[key]["mean"], rows[key]["ci_low"], rows[key]["ci_high"])
    # "the top x % never forgets the forget set more than a random x % does" at equal damage
    assert not [k for k, r in rows.items() if k[2] == "top" and k[3].endswith("_at_damage") and r["verdict"] == "holds"]
