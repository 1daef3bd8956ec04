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
    # a rest reproduced token for token passes both looser rules, so their k* is never longer
    for variant in ("similar", "similar_rouge"):
        assert (metrics.extraction_strength(blank, tok, forget, variant=variant) >= es - 1e-9).all()
    with pytest.raises(ValueError, match="unknown extraction strength variant 'fuzzy'; use one of exact, similar"):
        metrics.extraction_strength(model, tok, forget, variant="fuzzy")


def test_token_lcs_and_the_papers_similar_rule():
    assert metrics.token_lcs([1, 2, 3, 4], [2, 4, 3]) == 2
    assert metrics.token_lcs([5, 1, 5, 2], [1, 2, 5]) == 2
    assert metrics.token_lcs([1, 2, 3], [1, 2, 3]) == 3
    assert metrics.token_lcs([], [1, 2]) == 0 and metrics.token_lcs([4, 4], [5]) == 0
    assert metrics.token_lcs([7, 1, 7, 1], [1, 7, 1, 7]) == 3
    # the continuation is cut to the rest's length before the LCS: [7, 8] against [7, 9] shares 1 ≥ 0.5 · 2
    assert metrics.lcs_match([7, 8, 9, 10], [7, 9])
    assert not metrics.lcs_match([8, 8, 8], [7, 9, 10])          # 0 < 1.5
    assert not metrics.lcs_match([1], [2, 3])                    # 0 < 0.5
    assert metrics.lcs_match([2, 9, 9, 3], [2, 3, 4, 5])         # 2 ≥ 2
    assert not metrics.lcs_match([2, 9, 9, 3], [2, 3, 4, 5], threshold=0.6)
    assert metrics.lcs_match([], [2, 3])                         # the paper's code: an empty continuation matches


def _similar_by_hand(model, tok, example, question):
    """The paper's "similar" extraction strength of one example, one prefix at a time, unbatched: the first prefix
    k whose greedy continuation (cut to the rest's length) has a token LCS with the rest ≥ half its length."""
    tpl = gl.data.resolve_template(None)
    answer = tok(tpl.answer.format(answer=example.answer), add_special_tokens=False)["input_ids"]
    prompt = tok(tpl.prompt.format(question=question), add_special_tokens=True)["input_ids"]
    for k in range(len(answer)):
        ids = torch.tensor([prompt + answer[:k]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=len(answer) - k, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in out:
            out = out[:out.index(tok.eos_token_id)]
        cut = out[:len(answer) - k]
        rest = answer[k:]
        lcs = [[0] * (len(rest) + 1) for _ in range(len(cut) + 1)]
        for i, a in enumerate(cut):
            for j, b in enumerate(rest):
                lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
        if lcs[-1][-1] >= 0.5 * len(cut):
            return 1.0 - k / len(answer)
    return 0.0


def test_similar_extraction_strength_against_a_hand_search(tokenizer, world):
    """A random float64 model (its continuations share some tokens with the answers by chance) against the rule
    applied prefix by prefix, with the question and with the paraphrased question."""
    model = gl.testing.tiny_model("llama", len(tokenizer))
    examples = world["forget05"][:3] + world["world_facts"][:2]
    got = metrics.extraction_strength(model, tokenizer, examples, variant="similar")
    want = [_similar_by_hand(model, tokenizer, e, e.question) for e in examples]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    perturbed = metrics.extraction_strength(model, tokenizer, examples[:3], variant="similar",
                                            question_field="paraphrased_question")
    np.testing.assert_allclose(perturbed, [_similar_by_hand(model, tokenizer, e, e.paraphrased_question)
                                           for e in examples[:3]], rtol=0, atol=1e-12)


def test_perturbed_question_extraction_strength(target, world):
    """The paper's perturbed-question variant: the paraphrased question prompts, the original answer is extracted
    (exact rule), i.e. exact extraction strength on records whose question is the paraphrase."""
    model, tok = target
    forget = world["forget05"][:8]
    got = metrics.extraction_strength(model, tok, forget, question_field="paraphrased_question")
    swapped = [e.to_dict() | {"question": e.paraphrased_question} for e in forget]
    np.testing.assert_array_equal(got, metrics.extraction_strength(model, tok, swapped))
    assert (got <= 1.0).all() and (got >= 0.0).all()
    with pytest.raises(MetricInputError, match=r"has no 'paraphrased_question'"):
        metrics.extraction_strength(model, tok, world["world_facts"][:2], question_field="paraphrased_question")


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
    # rows are matched by question: forget01's 40 questions are forget05's last 40 (a retain95 model never saw
    # them either); forget10's log holds 300 of its 400 questions
    rows, ratios = reference.pair(tofu["forget01"], None)
    assert reference.matched == 40 and list(rows) == list(range(40))
    np.testing.assert_array_equal(ratios, llama[160:])
    with pytest.raises(MetricInputError, match=r"holds 200 of the 400 forget questions evaluated"):
        reference.truth_ratios(tofu["forget10"], None)


def test_forget10_log_holds_300_of_400_questions(tofu_path):
    log = tofu_path / "retain_model_logs" / "llama2-7b_retain90_eval_log_forget.json"
    raw = json.loads(log.read_text())
    assert len(raw["truth_ratio"]) == 300
    tofu = gl.load_world(tofu_path)
    assert len(tofu["forget10"]) == 400
    reference = metrics.RetainReference(log)
    rows, ratios = reference.pair(tofu["forget10"], None)
    assert reference.matched == 300 and list(rows) == list(range(300))  # TOFU evaluated the first 300
    np.testing.assert_array_equal(ratios, [raw["truth_ratio"][str(i)] for i in range(300)])
    # each matched row is the log's row with that very question (its prompt is "[INST] question [/INST]")
    for r in (0, 150, 299):
        assert raw["generated_text"][str(r)][0] == f"[INST] {tofu['forget10'][r].question} [/INST]"
    phi = metrics.RetainReference(tofu_path / "retain_model_logs" / "phi_retain90_eval_log_forget.json")
    phi_rows, phi_ratios = phi.pair(tofu["forget10"], None)  # phi's prompts read "Question: ...\n"
    assert phi.matched == 300 and list(phi_rows) == list(rows)
    assert metrics.forget_quality(phi_ratios, ratios) == pytest.approx(ks_2samp(phi_ratios, ratios).pvalue)


def test_forget_quality_on_the_questions_a_log_holds(target, world, tmp_path):
    """A log holding 7 of forget05's 10 questions (in another order): forget quality is the KS test on those 7,
    and the evaluation says how many it matched."""
    model, tok = target
    forget = world.forget("forget05")
    held = [forget[i] for i in (9, 0, 4, 2, 7, 5, 1)]
    theirs = [0.2, 0.5, 0.9, 0.35, 0.6, 0.45, 0.8]
    log = {"truth_ratio": {str(i): r for i, r in enumerate(theirs)},
           "generated_text": {str(i): [f"[INST] {e.question} [/INST]", "x", e.answer] for i, e in enumerate(held)}}
    (tmp_path / "log.json").write_text(json.dumps(log))
    ds = gl.evaluate(model, tok, world, "forget05", retain_reference=tmp_path / "log.json", n=2)
    assert ds.attrs["forget_quality_instances"] == 7
    order = sorted(range(7), key=lambda r: forget.index(held[r]))          # the examples' order
    ours = metrics.truth_ratio(model, tok, [held[r] for r in order], split_name="forget05")
    assert float(ds.forget_quality) == pytest.approx(ks_2samp(ours, [theirs[r] for r in order]).pvalue, rel=1e-12)


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
    assert ds.attrs["forget_quality_instances"] == len(world["forget05"])  # the zoo's retain model: every one
    assert ds.generated_text.isel(step=0).values[0] == world["forget05"][0].answer
    assert float(ds.model_utility.isel(step=-1)) < float(ds.model_utility.isel(step=0))


def test_an_evaluation_saves_and_loads(target, world, tmp_path):
    model, tok = target
    ds = gl.evaluate(model, tok, world, "forget05", n=3)
    assert np.isnan(float(ds.forget_quality))  # no retain reference given
    again = gl.load(gl.save(ds, tmp_path / "eval.nc"))
    assert again.identical(ds)
