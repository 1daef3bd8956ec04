"""TOFU metrics: hand-built cases, the zoo's retain models, TOFU's published logs, open-unlearning files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import hmean, ks_2samp

import geffect_lab as gl
from geffect_lab import metrics
from geffect_lab.metrics import MetricInputError

FIXTURES = Path(__file__).parent / "fixtures"


def _hf_loss(model, tok, question, answer):
    """Mean token NLL of one answer from HF's own loss (an independent path)."""
    batch = gl.encode(tok, [{"id": "x", "question": question, "answer": answer}])
    with torch.no_grad():
        return float(model(**batch).loss)


def test_probability_and_truth_ratio_match_hand_computation(target, world):
    model, tok = target
    examples = world["forget05"][:3] + world["world_facts"][:2]
    prob = metrics.probability(model, tok, examples)
    expected = [math.exp(-_hf_loss(model, tok, e.question, e.answer)) for e in examples]
    np.testing.assert_allclose(prob, expected, rtol=1e-5)
    ratio = metrics.truth_ratio(model, tok, examples)
    for e, r in zip(examples, ratio):
        base = e.paraphrased_answer or e.answer  # world facts have no paraphrase: the answer plays its part
        pert = np.mean([_hf_loss(model, tok, e.question, p) for p in e.perturbed_answer])
        assert r == pytest.approx(math.exp(_hf_loss(model, tok, e.question, base) - pert), rel=1e-4)
    with_options = metrics.probability_with_options(model, tok, world["world_facts"][:2])
    e = world["world_facts"][0]
    p = [math.exp(-_hf_loss(model, tok, e.question, a)) for a in (e.answer, *e.perturbed_answer)]
    assert with_options[0] == pytest.approx(p[0] / sum(p), rel=1e-4)


def test_scores_and_aggregates():
    r = np.array([0.5, 1.0, 2.0])
    np.testing.assert_allclose(metrics.truth_ratio_score(r, forget=True), [0.5, 1.0, 0.5])
    np.testing.assert_allclose(metrics.truth_ratio_score(r, forget=False), [0.5, 0.0, 0.0])
    a, b = np.array([0.1, 0.2, 0.3, 0.9]), np.array([0.5, 0.6, 0.7, 0.8, 0.95])
    assert metrics.forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    assert metrics.forget_quality(a, a) == 1.0
    assert metrics.model_utility([0.5, 0.8, 0.9]) == pytest.approx(hmean([0.5, 0.8, 0.9]))
    assert metrics.model_utility([0.5, 0.0]) == 0.0
    assert metrics.rouge_l_recall(["the cat sat"], ["the cat sat on the mat"])[0] == pytest.approx(0.5)
    assert metrics.rouge_l_recall(["Cats were sitting there"], ["cat sat"])[0] == pytest.approx(0.5)  # stemmed


def test_extraction_strength_from_hits():
    assert metrics.strength_from_hits([True, True, True]) == 1.0      # the question alone extracts it
    assert metrics.strength_from_hits([False, True, True]) == pytest.approx(2 / 3)
    assert metrics.strength_from_hits([True, False, True]) == pytest.approx(1 / 3)
    assert metrics.strength_from_hits([True, True, False]) == 0.0     # nothing short of the full answer
    assert np.isnan(metrics.strength_from_hits([]))


def test_extraction_strength_and_memorisation_on_models(target, world, tokenizer):
    model, tok = target
    forget = world["forget05"][:6]
    assert (metrics.extraction_strength(model, tok, forget) == 1.0).all()
    assert (metrics.exact_memorization(model, tok, forget) == 1.0).all()
    similar = metrics.extraction_strength(model, tok, forget[:2], variant="similar")
    assert (similar == 1.0).all()
    blank = gl.testing.tiny_model("llama", len(tokenizer), dtype=torch.float32)
    es = metrics.extraction_strength(blank, tok, forget)
    assert (es < 0.3).all()
    assert (metrics.extraction_strength(blank, tok, forget, variant="similar") >= es - 1e-9).all()
    with pytest.raises(ValueError, match="unknown extraction strength variant"):
        metrics.extraction_strength(model, tok, forget, variant="fuzzy")


def test_generation_is_bounded_and_reported(tokenizer, world):
    babbler = gl.testing.tiny_model("gpt2", len(tokenizer), dtype=torch.float32)
    with torch.no_grad():
        babbler.lm_head.weight[tokenizer.eos_token_id] = -10.0  # never ends on its own (tied weights)
    with pytest.warns(RuntimeWarning, match=r"2 of 2 generations did not stop within 5 new tokens"):
        texts, cut = metrics.generate_answers(babbler, tokenizer, world["forget05"][:2], max_new_tokens=5)
    assert cut.all() and all(texts)


def test_greedy_answers_of_the_target(target, world):
    model, tok = target
    scores, texts, cut = metrics.rouge_l(model, tok, world["forget05"][:4])
    assert texts == [e.answer for e in world["forget05"][:4]] and (scores == 1.0).all() and not cut.any()


def test_forget_quality_of_the_zoo(target, world):
    model, tok = target
    retain, _ = gl.zoo.load("retain_forget05")
    reference = metrics.RetainReference(retain)
    itself = gl.evaluate(retain, tok, world, "forget05", retain_model=reference, n=20)
    assert float(itself.forget_quality) == 1.0
    ds = gl.evaluate(model, tok, world, "forget05", retain_model=reference, n=20)
    assert float(ds.forget_quality) < 0.05
    assert float(ds.log10_forget_quality) == pytest.approx(math.log10(float(ds.forget_quality)))
    assert len(reference._cache) == 1  # the retain model's truth ratios were computed once
    assert set(ds.split.values) == {"targeted", "non_targeted", "world_facts"}
    assert 0.5 < float(ds.model_utility) <= 1.0
    for name in ("probability", "truth_ratio", "truth_ratio_score", "rouge_l", "exact_memorization",
                 "extraction_strength", "forget_quality", "model_utility"):
        assert ds[name].attrs["long_name"] and ds[name].attrs["description"], name
    assert (ds.rouge_l.where(ds.split == "targeted", drop=True) == 1.0).all()


def test_tofu_published_retain_logs(tofu_path):
    logs = tofu_path / "retain_model_logs"
    llama = metrics.read_tofu_log(logs / "llama2-7b_retain95_eval_log_forget.json")["truth_ratio"]
    phi = metrics.read_tofu_log(logs / "phi_retain95_eval_log_forget.json")["truth_ratio"]
    assert len(llama) == len(phi) == 200  # forget05
    reference = metrics.RetainReference(logs / "llama2-7b_retain95_eval_log_forget.json")
    tofu = gl.load_world(tofu_path)
    assert metrics.forget_quality(reference.truth_ratios(tofu["forget05"], None), llama) == 1.0
    expected = ks_2samp(phi, llama).pvalue
    assert metrics.forget_quality(phi, reference.truth_ratios(tofu["forget05"], None)) == pytest.approx(expected)
    with pytest.raises(MetricInputError, match="holds 200 truth ratios but 40"):
        reference.truth_ratios(tofu["forget01"], None)


def test_read_open_unlearning(world):
    ds = gl.read_open_unlearning(FIXTURES / "open_unlearning_TOFU_EVAL.json", world=world, forget="forget10")
    targeted = ds.where(ds.split == "targeted", drop=True)
    assert list(targeted.instance.values) == [world["forget10"][0].id, world["forget10"][1].id]
    np.testing.assert_allclose(targeted.probability, [0.4, 0.6])
    np.testing.assert_allclose(targeted.rouge_l, [0.3, 0.4])
    np.testing.assert_allclose(targeted.truth_ratio, [0.5, 2.0])
    np.testing.assert_allclose(targeted.truth_ratio_score, [0.5, 0.5])
    np.testing.assert_allclose(targeted.extraction_strength, [0.0, 0.5])
    assert targeted.generated_text.values[0] == "first generated answer"
    retain = ds.where(ds.split == "non_targeted", drop=True)
    assert retain.instance.values[0] == world["retain_perturbed"][0].id
    assert retain.truth_ratio_score.values.item() == pytest.approx(0.7)
    assert float(ds.forget_quality) == 0.0123 and float(ds.model_utility) == 0.61
    assert json.loads(ds.attrs["agg_values"])["mia_loss"] == 0.5
    bare = gl.read_open_unlearning(FIXTURES / "open_unlearning_TOFU_EVAL.json")
    assert bare.instance.values[0] == "targeted/0"


def test_bad_inputs(target, world, tmp_path):
    model, tok = target
    no_perturbed = [e.to_dict() | {"perturbed_answer": []} for e in world["forget05"][:2]]
    with pytest.raises(MetricInputError, match=r"the forget05 set has no perturbed answers .*'perturbed_answer'"):
        metrics.truth_ratio(model, tok, no_perturbed, split_name="forget05")
    other = tok.__class__.from_pretrained(gl.zoo.zoo_dir() / "target")
    other.add_tokens(["<unseen>"])
    retain, _ = gl.zoo.load("retain_forget05")
    with pytest.raises(MetricInputError, match=r"retain model's tokenizer \(1025 tokens\) .* \(1024 tokens\)"):
        metrics.RetainReference((retain, other)).truth_ratios(world["forget05"][:2], tok)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MetricInputError, match="bad.json: cannot read"):
        gl.read_open_unlearning(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"x": {"y": 1}}))
    with pytest.raises(MetricInputError, match="not an open-unlearning"):
        gl.read_open_unlearning(tmp_path / "other.json")


@pytest.mark.slow
def test_metrics_along_a_run(target, world):
    """eval_every records the metrics beside the G-effects; a long GA run destroys the forget ROUGE."""
    model, tok = target
    ds = gl.unlearn(model, tok, "ga", world=world, steps=20, lr=1e-3, record=("g_effect",), eval_every=10,
                    progress=False)
    assert list(ds.step.values) == list(range(21))
    rows = [0, 10, 20]
    assert np.isfinite(ds.forget_quality.isel(step=rows)).all()
    assert np.isnan(ds.forget_quality.isel(step=[1, 5, 11])).all()
    assert ds.rouge_l.dims == ("step", "instance") and list(ds.rouge_l.instance.values) == list(ds.instance.values)
    rouge_forget = ds.rouge_l.where(ds.split == "targeted").mean("instance")
    assert float(rouge_forget.isel(step=0)) == 1.0 and float(rouge_forget.isel(step=-1)) < 0.3
    assert float(ds.forget_quality.isel(step=0)) < 0.05 < float(ds.forget_quality.isel(step=-1))
    assert ds.generated_text.isel(step=0).values[0] == world["forget05"][0].answer
    assert float(ds.model_utility.isel(step=-1)) < float(ds.model_utility.isel(step=0))


def test_an_evaluation_saves_and_loads(target, world, tmp_path):
    model, tok = target
    ds = gl.evaluate(model, tok, world, "forget05", n=3)
    assert np.isnan(float(ds.forget_quality))  # no retain reference given
    again = gl.load(gl.save(ds, tmp_path / "eval.nc"))
    assert again.identical(ds)
