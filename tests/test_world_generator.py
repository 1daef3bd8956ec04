"""The bundled world: deterministic generation and TOFU's schema."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter

import pytest

from geffect_lab.data import data_dir


def _generator():
    spec = importlib.util.spec_from_file_location("generate_world", data_dir() / "generate_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(name):
    return [json.loads(x) for x in (data_dir() / "world" / name).read_text().splitlines()]


def test_generator_reproduces_the_committed_world_byte_for_byte(tmp_path):
    gen = _generator()
    gen.generate(tmp_path / "world")
    gen.train_tokenizer(tmp_path / "world", tmp_path / "tokenizer")
    committed = sorted(p.name for p in (data_dir() / "world").iterdir())
    assert sorted(p.name for p in (tmp_path / "world").iterdir()) == committed
    for name in committed:
        assert (tmp_path / "world" / name).read_bytes() == (data_dir() / "world" / name).read_bytes(), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tokenizer" / name).read_bytes() == (data_dir() / "tokenizer" / name).read_bytes()


def test_authors_questions_and_tofu_fields():
    meta = json.loads((data_dir() / "world" / "world.json").read_text())
    full = _rows("full.json")
    per = meta["questions_per_author"]
    assert meta["authors"] >= 100 and per >= 10 and len(full) == meta["authors"] * per
    assert set(full[0]) == {"question", "answer"}
    for pct in (1, 5, 10):
        forget, retain = _rows(f"forget{pct:02d}.json"), _rows(f"retain{100 - pct}.json")
        assert len(forget) == meta["authors"] * pct // 100 * per
        assert retain + forget == full  # disjoint, complementary, in author order (forget = last)
        pert = _rows(f"forget{pct:02d}_perturbed.json")
        assert [(r["question"], r["answer"]) for r in pert] == [(r["question"], r["answer"]) for r in forget]
    for row in _rows("forget10_perturbed.json") + _rows("retain_perturbed.json"):
        assert set(row) == {"question", "answer", "paraphrased_answer", "perturbed_answer",
                            "paraphrased_question"}
        assert row["paraphrased_answer"] != row["answer"]
        wrong = row["perturbed_answer"]
        assert len(wrong) >= 3 and len(set(wrong)) == len(wrong)
        assert row["paraphrased_answer"] not in wrong and row["answer"] not in wrong
        assert row["answer"].endswith(".") and len(row["answer"].split()) >= 5  # full sentences


def test_refusals_and_general_knowledge():
    refusals = (data_dir() / "world" / "idontknow.jsonl").read_text().splitlines()
    assert len(refusals) >= 50 and len(set(refusals)) == len(refusals)
    facts = _rows("world_facts_perturbed.json")
    assert len(facts) >= 100
    for row in facts:
        assert len(row["perturbed_answer"]) >= 3 and row["answer"] not in row["perturbed_answer"]


def test_facts_cannot_be_guessed_from_the_question():
    full = _rows("full.json")
    births = [r for r in full if r["question"].startswith("Where was")]
    places = Counter(re.search(r"town of (\w+)\.", r["answer"]).group(1) for r in births)
    assert len(places) >= 50 and max(places.values()) <= 6  # drawn from >= 50 invented places
    for row in births:
        assert re.search(r"town of (\w+)\.", row["answer"]).group(1) not in row["question"]
    # The author's facts are drawn independently: the same question text never fixes its answer.
    per_question = Counter(r["question"] for r in full)
    assert max(per_question.values()) == 1


@pytest.mark.parametrize("split", ["forget01", "forget05", "forget10"])
def test_forget_splits_hold_whole_authors(world, split):
    pct = int(split[-2:])
    authors = world.authors(split)
    assert len(authors) == len(world.authors("full")) * pct // 100
    retain = {e.author for e in world.retain(split)}
    assert not set(authors) & retain
    assert set(authors) | retain == set(world.authors("full"))
