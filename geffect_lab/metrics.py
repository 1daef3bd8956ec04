"""TOFU's evaluation metrics, per instance where they are defined, and the paper's extraction strength.

All per-instance functions take ``(model, tokenizer, examples)`` and return a numpy array ``[instance]``.
Teacher-forced metrics need one forward pass: with labels on the answer positions, greedy decoding from the
prompt reproduces an answer (or its suffix) exactly iff the argmax of every position concerned equals its
label, so :func:`exact_match` and the exact :func:`extraction_strength` are exact without generating.

==============================  =====================================================================
metric                          definition (``a`` an answer of ``|a|`` tokens, ``NLL`` its mean token NLL)
==============================  =====================================================================
probability                     ``exp(-NLL(a))``, TOFU's length-normalised probability
probability_with_options        ``P(a) / (P(a) + Σ_k P(a_k))`` over the perturbed answers ``a_k`` (TOFU's
                                "Prob." on real authors and world facts)
truth_ratio                     ``R = exp(NLL(ã) − mean_k NLL(a_k))`` = P_perturbed / P_paraphrased, ``ã`` the
                                paraphrased answer (the answer itself on sets without paraphrases)
truth_ratio_score               forget sets ``min(R, 1/R)``; other sets ``max(0, 1 − R)``
rouge_l                         ROUGE-L recall of the greedy answer against ``a`` (rouge-score, stemmed)
exact_memorization              share of answer tokens whose argmax equals the label (teacher forcing)
extraction_strength             ``1 − k*/|a|``, ``k*`` the shortest answer prefix from which greedy decoding
                                reproduces the rest (exact; ``similar``: the paper's rule, token LCS of the
                                continuation and the rest ≥ half the continuation's length; ``similar_rouge``:
                                ROUGE-L recall ≥ a threshold); ``question_field="paraphrased_question"``: the
                                paper's perturbed-question variant
forget_quality                  KS-test p-value (``scipy.stats.ks_2samp``) between the forget-set truth
                                ratios of the model and of a model never trained on the forget set (against a
                                published log: on the questions the log holds, matched by text)
model_utility                   harmonic mean of probability, ROUGE-L and truth-ratio score on the retain
                                set and on the general-knowledge sets (``scipy.stats.hmean``)
==============================  =====================================================================

Extraction strength and exact memorisation leave out a trailing end-of-sequence token, as open-unlearning
does; probabilities and truth ratios keep it (it is part of the risk).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._batching import check_number, check_tokenizer, chunks, eval_mode, log_probs, model_device, shifted, to_device
from .data import PromptTemplate, encode, encode_pairs, example_field, example_id, resolve_template, spread
from .results import flat_attrs
from .schema import EVALUATION_METRICS, SCHEMA_VERSION, annotate, validate

__all__ = ["exact_match", "token_accuracy", "exact_memorization", "probability", "probability_with_options",
           "truth_ratio", "truth_ratio_score", "generate_answers", "rouge_l_recall", "rouge_l",
           "extraction_strength", "ES_VARIANTS", "token_lcs", "lcs_match", "log_question", "forget_quality",
           "log10_forget_quality", "model_utility", "RetainReference", "evaluate", "read_open_unlearning",
           "read_tofu_log", "MetricInputError", "PER_INSTANCE", "instance_metrics", "strength_from_hits",
           "utility_values"]


class MetricInputError(ValueError):
    """Examples that cannot be evaluated as asked (missing perturbed answers, mismatched tokenizers …)."""


# ------------------------------------------------------------------------------ teacher-forced passes
@torch.no_grad()
def _teacher_forced(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
                    template: PromptTemplate | str | None = None):
    """Per pair: mean token NLL of the answer, and the argmax hits of its tokens (without a final EOS)."""
    batch = encode_pairs(tokenizer, list(pairs), template)
    device = model_device(model)
    eos = tokenizer.eos_token_id
    nll, hits = [], []
    with eval_mode(model):
        for _, part in chunks(batch, batch_size):
            part = to_device(part, device)
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            lg, lab, mask = shifted(logits, part["labels"])
            logp = log_probs(lg)
            tok_logp = logp.gather(-1, lab.clamp_min(0)[..., None]).squeeze(-1)
            counts = mask.sum(1).clamp_min(1)
            nll.append((-(tok_logp * mask).sum(1) / counts).double().cpu())
            pred = lg.argmax(-1)
            for row in range(lab.shape[0]):
                labels = lab[row][mask[row]]
                ok = (pred[row][mask[row]] == labels)
                if eos is not None and labels.numel() > 1 and int(labels[-1]) == eos:
                    ok = ok[:-1]
                hits.append(ok.cpu().numpy())
    return torch.cat(nll).numpy(), hits


def exact_match(model, tokenizer, examples: Sequence[Any], batch_size: int = 128) -> np.ndarray:
    """``[instance]`` bool: greedy decoding from the prompt reproduces the whole answer and its EOS."""
    batch = encode(tokenizer, examples)
    device = model_device(model)
    out = []
    with torch.no_grad(), eval_mode(model):
        for _, part in chunks(batch, batch_size):
            part = to_device(part, device)
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            lg, lab, mask = shifted(logits, part["labels"])
            out.append((((lg.argmax(-1) == lab) | ~mask).all(1)).cpu())
    return torch.cat(out).numpy()


def _pairs(examples, field: str = "answer", question_field: str = "question"):
    if question_field == "question":
        return [(example_field(e, "question"), example_field(e, field)) for e in examples]
    out = []
    for i, e in enumerate(examples):
        question = example_field(e, question_field, None)
        if not question:
            raise MetricInputError(f"{example_id(e, i)!r} has no {question_field!r}: the perturbed-question variant "
                                   "needs TOFU's paraphrased questions (the *_perturbed.json files)")
        out.append((question, example_field(e, field)))
    return out


def exact_memorization(model, tokenizer, examples, batch_size: int = 64, template=None) -> np.ndarray:
    """``[instance]``: share of answer tokens predicted by the argmax under teacher forcing."""
    _, hits = _teacher_forced(model, tokenizer, _pairs(examples), batch_size, template)
    return np.array([h.mean() if len(h) else np.nan for h in hits])


token_accuracy = exact_memorization


def probability(model, tokenizer, examples, batch_size: int = 64, template=None,
                field: str = "answer") -> np.ndarray:
    """``[instance]``: ``exp(-mean token NLL)`` of the answer (``field`` picks another answer)."""
    nll, _ = _teacher_forced(model, tokenizer, _pairs(examples, field), batch_size, template)
    return np.exp(-nll)


def _perturbed(examples, split_name: str) -> list[tuple[str, ...]]:
    out = []
    for i, e in enumerate(examples):
        pert = tuple(example_field(e, "perturbed_answer", ()) or ())
        if not pert:
            raise MetricInputError(
                f"the {split_name} set has no perturbed answers for {example_id(e, i)!r}: truth ratios need the "
                "field 'perturbed_answer' (TOFU's *_perturbed.json files); evaluate a split that has them, such "
                "as retain_perturbed or a forget split")
        out.append(pert)
    return out


def _with_perturbed(model, tokenizer, examples, base_field, batch_size, template, split_name):
    """Mean token NLL of each example's base answer and of each of its perturbed answers (one batched pass)."""
    examples = list(examples)
    perturbed = _perturbed(examples, split_name)
    pairs, owner = [], []
    for i, (e, pert) in enumerate(zip(examples, perturbed)):
        q = example_field(e, "question")
        pairs.append((q, base_field(e)))
        owner.append(-1 - i)
        pairs += [(q, p) for p in pert]
        owner += [i] * len(pert)
    nll, _ = _teacher_forced(model, tokenizer, pairs, batch_size, template)
    owner = np.array(owner)
    return nll[owner < 0], [nll[owner == i] for i in range(len(examples))]


def _truth_base(example) -> str:
    """The answer a truth ratio compares the perturbed ones with: the paraphrase, or the answer itself on sets
    without paraphrases (TOFU's convention for real authors and world facts)."""
    return example_field(example, "paraphrased_answer", None) or example_field(example, "answer")


def _ratio(base_nll: np.ndarray, perturbed_nll: list[np.ndarray]) -> np.ndarray:
    return np.exp(base_nll - np.array([p.mean() for p in perturbed_nll]))


def _with_options(answer_nll: np.ndarray, perturbed_nll: list[np.ndarray]) -> np.ndarray:
    correct = np.exp(-answer_nll)
    return correct / (correct + np.array([np.exp(-p).sum() for p in perturbed_nll]))


def truth_ratio(model, tokenizer, examples, batch_size: int = 64, template=None,
                split_name: str = "given") -> np.ndarray:
    """``[instance]``: ``R = exp(NLL(paraphrase) − mean_k NLL(perturbed_k))`` = P_perturbed / P_paraphrased.

    A model that knows the fact prefers the paraphrase (R < 1); one that never saw it is indifferent (R ≈ 1).
    The paraphrase is ``paraphrased_answer`` when the example has one, the answer itself otherwise (TOFU's
    convention for real authors and world facts).
    """
    return _ratio(*_with_perturbed(model, tokenizer, examples, _truth_base, batch_size, template, split_name))


def truth_ratio_score(ratios: np.ndarray, forget: bool) -> np.ndarray:
    """TOFU's score of truth ratios: ``min(R, 1/R)`` on forget sets, ``max(0, 1 − R)`` elsewhere."""
    ratios = np.asarray(ratios, dtype=np.float64)
    return np.minimum(ratios, 1.0 / ratios) if forget else np.maximum(0.0, 1.0 - ratios)


def probability_with_options(model, tokenizer, examples, batch_size: int = 64, template=None,
                             split_name: str = "given") -> np.ndarray:
    """``[instance]``: the answer's probability normalised over itself and its perturbed answers."""
    return _with_options(*_with_perturbed(model, tokenizer, examples, lambda e: example_field(e, "answer"),
                                          batch_size, template, split_name))


# ------------------------------------------------------------------------------ generation and ROUGE
@torch.no_grad()
def _greedy(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int):
    """Greedy continuations of token-id prompts (left-padded batches): the new tokens up to EOS, and whether
    each was cut by ``max_new_tokens`` instead of ending on its own."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    device = model_device(model)
    rows, truncated = [], []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            group = prompts[start:start + batch_size]
            width = max(len(p) for p in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(group):
                ids[i, width - len(p):] = torch.tensor(list(p))
                mask[i, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 num_beams=1, temperature=None, top_p=None, top_k=None)
            for row in out[:, width:].cpu():
                ended = eos is not None and bool((row == eos).any())
                if ended:
                    row = row[:int((row == eos).nonzero()[0])]
                rows.append(row)
                truncated.append(not ended and row.numel() >= max_new_tokens)
    return rows, np.array(truncated, dtype=bool)


def generate_answers(model, tokenizer, examples, max_new_tokens: int | None = None, batch_size: int = 32,
                     template: PromptTemplate | str | None = None) -> tuple[list[str], np.ndarray]:
    """Greedy answers to the examples' questions, batched (left-padded prompts).

    Generation stops at the tokenizer's EOS or after ``max_new_tokens`` (default: twice the longest reference
    answer plus 8, at most 256). Returns the texts and ``[instance]`` bools: True where generation was cut
    by the length bound instead of ending on its own (reported with a warning).
    """
    tpl = resolve_template(template)
    examples = list(examples)
    prompts = [tokenizer(tpl.prompt.format(question=example_field(e, "question")), add_special_tokens=True)
               ["input_ids"] for e in examples]
    if max_new_tokens is None:
        longest = max(len(tokenizer(tpl.answer.format(answer=example_field(e, "answer")),
                                    add_special_tokens=False)["input_ids"]) for e in examples)
        max_new_tokens = min(256, 2 * longest + 8)
    rows, flags = _greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    if flags.any():
        warnings.warn(f"{int(flags.sum())} of {len(flags)} generations did not stop within {max_new_tokens} new "
                      "tokens and were cut there (see generation_truncated)", RuntimeWarning, stacklevel=2)
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows], flags


_SCORER = None


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """``[instance]``: ROUGE-L recall of each prediction against its reference (rouge-score, stemmed)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([_SCORER.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)])


def rouge_l(model, tokenizer, examples, max_new_tokens: int | None = None, batch_size: int = 32,
            template=None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """ROUGE-L recall of the greedy answers: ``(scores, generated texts, truncated flags)``."""
    texts, flags = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size, template)
    return rouge_l_recall(texts, [example_field(e, "answer") for e in examples]), texts, flags


# ------------------------------------------------------------------------------ extraction strength
ES_VARIANTS = {"exact": None, "similar": 0.5, "similar_rouge": 0.9}  # variant -> its default threshold


def extraction_strength(model, tokenizer, examples, variant: str = "exact", threshold: float | None = None,
                        batch_size: int = 64, template=None, question_field: str = "question") -> np.ndarray:
    """``[instance]``: ``ES = 1 − k*/|a|``, ``k*`` the shortest answer prefix (in tokens, 0 … ``|a|``) from which
    greedy decoding reproduces the rest of the answer.

    ``variant="exact"``: the rest must come out token for token (computed from one teacher-forced pass: the
    suffix from ``k`` is reproduced iff every argmax from ``k`` on is right). ``variant="similar"``, the paper's
    rule: the greedy continuation, cut to the rest's length in tokens, shares a token LCS with the rest of at
    least ``threshold`` (0.5) × its own length (:func:`lcs_match`; as in the paper's code, a continuation that
    ends at once, with no token, counts as a match). ``variant="similar_rouge"``: ROUGE-L recall of the decoded
    continuation against the rest ≥ ``threshold`` (0.9). Both generate greedily from every prefix (batched) and
    take the shortest that matches (the paper's code bisects, which finds the same ``k*`` whenever matching is
    monotone in the prefix, as the exact rule is). ``question_field="paraphrased_question"`` is the paper's
    perturbed-question variant: the paraphrased question prompts, the original answer is extracted.
    ES = 1 means the bare question extracts the answer, 0 that nothing short of the full answer does.
    """
    examples = list(examples)
    if variant not in ES_VARIANTS:
        raise ValueError(f"unknown extraction strength variant {variant!r}; use one of {', '.join(ES_VARIANTS)}")
    if variant == "exact":
        _, hits = _teacher_forced(model, tokenizer, _pairs(examples, question_field=question_field), batch_size,
                                  template)
        return np.array([strength_from_hits(h) for h in hits])
    check_number("threshold", threshold, optional=True)
    threshold = ES_VARIANTS[variant] if threshold is None else threshold
    return _similar_extraction_strength(model, tokenizer, examples, variant, threshold, batch_size, template,
                                        question_field)


def token_lcs(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programming, ``O(len(a)·len(b))``)."""
    a, b = list(a), list(b)
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def lcs_match(generated: Sequence[int], rest: Sequence[int], threshold: float = 0.5) -> bool:
    """The paper's "similar" rule: ``generated``, cut to ``len(rest)`` tokens, matches ``rest`` when their token
    LCS is at least ``threshold`` × its (cut) length. An empty continuation matches (0 ≥ 0), as in the paper's
    code."""
    cut = list(generated)[:len(rest)]
    return token_lcs(cut, rest) >= threshold * len(cut)


def strength_from_hits(hits: np.ndarray) -> float:
    """Exact extraction strength from one answer's teacher-forced argmax hits: the rest is reproduced from
    prefix k iff every hit from k on is true, so k* is one past the last miss (0 when there is none)."""
    hits = np.asarray(hits, dtype=bool)
    if hits.size == 0:
        return float("nan")
    wrong = np.flatnonzero(~hits)
    k_star = 0 if wrong.size == 0 else int(wrong[-1]) + 1
    return 1.0 - k_star / hits.size


def _similar_extraction_strength(model, tokenizer, examples, variant, threshold, batch_size, template,
                                 question_field="question"):
    tpl = resolve_template(template)
    questions = [q for q, _ in _pairs(examples, question_field=question_field)]
    answers = []
    for e in examples:
        ids = tokenizer(tpl.answer.format(answer=example_field(e, "answer")), add_special_tokens=False)["input_ids"]
        answers.append(list(ids))
    k_star = np.array([len(a) for a in answers])
    pending = list(range(len(examples)))
    k = 0
    while pending:
        rows = [i for i in pending if k < len(answers[i])]
        for i in pending:
            if k >= len(answers[i]):
                k_star[i] = len(answers[i])
        if not rows:
            break
        prompts = [tokenizer(tpl.prompt.format(question=questions[i]), add_special_tokens=True)["input_ids"]
                   + answers[i][:k] for i in rows]
        new, _ = _greedy(model, tokenizer, prompts, max(len(answers[i]) - k for i in rows) + 4, batch_size)
        if variant == "similar":
            matched = [lcs_match(r.tolist(), answers[i][k:], threshold) for i, r in zip(rows, new)]
        else:
            rest = [tokenizer.decode(answers[i][k:], skip_special_tokens=True).strip() for i in rows]
            scores = rouge_l_recall([tokenizer.decode(r, skip_special_tokens=True).strip() for r in new], rest)
            matched = [s >= threshold for s in scores]
        done = {i for i, ok in zip(rows, matched) if ok}
        for i in done:
            k_star[i] = k
        pending = [i for i in rows if i not in done]
        k += 1
    return np.array([1.0 - k_star[i] / len(a) if a else np.nan for i, a in enumerate(answers)])


# ------------------------------------------------------------------------------ aggregate metrics
def log10_forget_quality(fq: float) -> float:
    """log10 of a forget quality: -inf at 0 (a p-value that underflowed), NaN where there is none."""
    return math.log10(fq) if fq > 0 else (-math.inf if fq == 0 else math.nan)


def forget_quality(truth_ratios, reference_truth_ratios) -> float:
    """KS-test p-value between the forget-set truth ratios of a model and of the retain ("oracle") model.
    1 means indistinguishable from never having seen the forget set; TOFU reads < 0.05 as not forgotten."""
    from scipy.stats import ks_2samp

    a = np.asarray(truth_ratios, dtype=np.float64)
    b = np.asarray(reference_truth_ratios, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise MetricInputError("forget quality needs truth ratios on both sides; one of them is empty")
    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the per-set means (probability, ROUGE-L, truth-ratio score on each utility set)."""
    from scipy.stats import hmean

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.isnan(v).any():
        return float("nan")
    return 0.0 if (v <= 0).any() else float(hmean(v))


_PROMPT_WRAPPERS = (re.compile(r"^\s*(\[INST\]|Question:)\s*"), re.compile(r"\s*\[/INST\]\s*$"))


def _question_key(text: str) -> str:
    """A question as matched against a log: its words, single-spaced."""
    return " ".join(str(text).split())


def log_question(prompt: str) -> str:
    """The question in the prompt a TOFU log stores (``generated_text[i][0]``), without the chat wrapper TOFU put
    around it (Llama-2's ``[INST] … [/INST]``, phi's ``Question: …``)."""
    for wrapper in _PROMPT_WRAPPERS:
        prompt = wrapper.sub("", prompt)
    return _question_key(prompt)


def read_tofu_log(path) -> dict[str, np.ndarray]:
    """A TOFU ``eval_log_forget.json`` (per-index dicts) as arrays in index order: ``truth_ratio``,
    ``avg_gt_loss``, ``rougeL_recall`` …, and ``question`` (each row's question, from the prompt stored in
    ``generated_text``) when the log has it."""
    path = Path(path)
    try:
        log = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MetricInputError(f"{path}: cannot read a TOFU evaluation log ({err})") from None
    out = {}
    texts = log.get("generated_text")
    if isinstance(texts, Mapping) and texts and all(isinstance(v, list) and v for v in texts.values()):
        out["question"] = np.array([log_question(texts[k][0]) for k in sorted(texts, key=int)], dtype=object)
    for key, values in log.items():
        if isinstance(values, Mapping) and values:
            order = sorted(values, key=lambda k: int(k))
            first = values[order[0]]
            if isinstance(first, (int, float)):
                out[key] = np.array([values[k] for k in order], dtype=np.float64)
    if "truth_ratio" not in out:
        raise MetricInputError(f"{path}: this log has no per-index 'truth_ratio' (keys: {', '.join(log)})")
    return out


class RetainReference:
    """The forget-set truth ratios of a model never trained on the forget set, computed once and reused.

    ``source`` is a retain model (optionally ``(model, tokenizer)``), a TOFU ``eval_log_forget.json``
    (its per-index ``truth_ratio``), or an array of truth ratios. A log holds the questions it evaluated: the
    forget examples are matched to its rows by question text (TOFU's forget10 logs hold 300 of the 400
    questions), see :meth:`pair`; ``matched`` is the number of examples the last :meth:`pair` matched.
    """

    def __init__(self, source, tokenizer=None, template=None, batch_size: int = 64):
        self.template = template
        self.batch_size = batch_size
        self._cache: dict[tuple, np.ndarray] = {}
        self.model = self.tokenizer = None
        self.fixed: np.ndarray | None = None
        self.questions: list[str] | None = None
        self.matched: int | None = None
        self.name = ""
        if isinstance(source, (str, Path)):
            log = read_tofu_log(source)
            self.fixed = log["truth_ratio"]
            self.questions = list(log["question"]) if "question" in log else None
            self.name = str(source)
        elif isinstance(source, np.ndarray) or (isinstance(source, Sequence) and source
                                                and isinstance(source[0], (int, float))):
            self.fixed = np.asarray(source, dtype=np.float64)
            self.name = "given truth ratios"
        else:
            if isinstance(source, tuple):
                source, tokenizer = source
            self.model, self.tokenizer = source, tokenizer
            self.name = str(getattr(getattr(source, "config", None), "_name_or_path", "") or "retain model")

    def pair(self, examples, tokenizer) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, truth ratios)``: the indices of the ``examples`` the reference has a truth ratio for, and
        those truth ratios. A log with questions matches them by text (the rows it holds, in the examples'
        order); a model or a plain array covers every example. Sets :attr:`matched`."""
        examples = list(examples)
        if self.fixed is None or self.questions is None:
            ratios = self.truth_ratios(examples, tokenizer)
            rows = np.arange(len(examples))
        else:
            where = {q: r for r, q in enumerate(self.questions)}
            found = [(i, where.get(_question_key(example_field(e, "question")))) for i, e in enumerate(examples)]
            found = [(i, r) for i, r in found if r is not None]
            if not found:
                raise MetricInputError(f"none of the {len(examples)} forget questions is among the "
                                       f"{len(self.questions)} of the retain log {self.name}: use the log of the "
                                       "same forget split")
            rows = np.array([i for i, _ in found])
            ratios = self.fixed[[r for _, r in found]]
        self.matched = len(rows)
        return rows, ratios

    def truth_ratios(self, examples, tokenizer) -> np.ndarray:
        """The reference's truth ratios on ``examples`` (cached by instance ids); from a log, every example must
        be in it (:meth:`pair` takes the ones that are)."""
        examples = list(examples)
        if self.fixed is not None and self.questions is not None:
            rows, ratios = self.pair(examples, None)
            if len(rows) != len(examples):
                raise MetricInputError(f"the retain log {self.name} holds {len(rows)} of the {len(examples)} forget "
                                       "questions evaluated; RetainReference.pair(...) gives the ones it holds")
            return ratios
        if self.fixed is not None:
            if len(self.fixed) != len(examples):
                raise MetricInputError(f"the retain reference {self.name} holds {len(self.fixed)} truth ratios but "
                                       f"{len(examples)} forget instances are evaluated; use the log of the same "
                                       "forget split")
            return self.fixed
        key = tuple(example_id(e, i) for i, e in enumerate(examples))
        if key not in self._cache:
            tok = self.tokenizer if self.tokenizer is not None else tokenizer
            _check_same_tokenizer(tok, tokenizer, self.model)
            self._cache[key] = truth_ratio(self.model, tok, examples, self.batch_size, self.template,
                                           split_name="forget")
        return self._cache[key]


def _check_same_tokenizer(retain_tok, tok, retain_model) -> None:

    if retain_tok is not tok and retain_tok.get_vocab() != tok.get_vocab():
        raise MetricInputError(
            f"the retain model's tokenizer ({len(retain_tok)} tokens) is not the evaluated model's "
            f"({len(tok)} tokens): forget quality compares truth ratios taken with the same tokenizer. Give the "
            "retain model of the same family, or its published eval_log_forget.json")
    check_tokenizer(retain_model, retain_tok)


# ------------------------------------------------------------------------------ evaluate
PER_INSTANCE = EVALUATION_METRICS


def instance_metrics(model, tokenizer, examples, *, forget: bool, general: bool = False,
                     max_new_tokens=None, batch_size: int = 32, template=None, similar_es: bool = False,
                     split_name: str = "given", paraphrased_es: bool = False) -> dict[str, np.ndarray | list]:
    """Every per-instance metric on one set (``general``: a set without paraphrases, probability taken over
    the options as TOFU does for real authors and world facts)."""
    examples = list(examples)
    out: dict[str, Any] = {}
    pairs = _pairs(examples)
    nll, hits = _teacher_forced(model, tokenizer, pairs, batch_size, template)
    has_pert = all(example_field(e, "perturbed_answer", ()) for e in examples)
    out["probability"] = np.exp(-nll)
    if has_pert:
        base, perturbed = _with_perturbed(model, tokenizer, examples, _truth_base, batch_size, template, split_name)
        out["truth_ratio"] = _ratio(base, perturbed)
        out["truth_ratio_score"] = truth_ratio_score(out["truth_ratio"], forget)
        if general:  # TOFU's probability over the options; without paraphrases the same pass serves both
            paraphrased = any(example_field(e, "paraphrased_answer", None) for e in examples)
            out["probability"] = (probability_with_options(model, tokenizer, examples, batch_size, template,
                                                           split_name) if paraphrased
                                  else _with_options(base, perturbed))
    else:
        out["truth_ratio"] = out["truth_ratio_score"] = np.full(len(examples), np.nan)
    scores, texts, flags = rouge_l(model, tokenizer, examples, max_new_tokens, batch_size, template)
    out["rouge_l"], out["generated_text"], out["generation_truncated"] = scores, texts, flags.astype(np.int64)
    out["exact_memorization"] = np.array([h.mean() if len(h) else np.nan for h in hits])
    out["extraction_strength"] = np.array([strength_from_hits(h) for h in hits])
    if similar_es:
        out["extraction_strength_similar"] = extraction_strength(model, tokenizer, examples, "similar",
                                                                 batch_size=batch_size, template=template)
    if paraphrased_es:  # the paper's perturbed-question variant, where the set has paraphrased questions
        out["extraction_strength_paraphrased"] = (
            extraction_strength(model, tokenizer, examples, batch_size=batch_size, template=template,
                                question_field="paraphrased_question")
            if all(example_field(e, "paraphrased_question", None) for e in examples)
            else np.full(len(examples), np.nan))
    return out


def utility_values(per_set: Mapping[str, Mapping[str, np.ndarray]]) -> list[float]:
    """The numbers model utility takes the harmonic mean of: per utility set, the mean probability, ROUGE-L and
    truth-ratio score (sets without truth ratios contribute the first two)."""
    values = []
    for metrics in per_set.values():
        values.append(float(np.nanmean(metrics["probability"])))
        values.append(float(np.nanmean(metrics["rouge_l"])))
        if not np.isnan(metrics["truth_ratio_score"]).all():
            values.append(float(np.nanmean(metrics["truth_ratio_score"])))
    return values


def evaluate(model, tokenizer, world, forget: str = "forget05", *, retain_model=None, retain_reference=None,
             retain_split: str = "retain_perturbed", general: Sequence[str] | None = None, n: int | None = None,
             max_new_tokens: int | None = None, batch_size: int = 32, similar_es: bool = False,
             paraphrased_es: bool = False, template=None):
    """TOFU's evaluation of a model on a world, as a Dataset.

    Per instance (dim ``instance``, with ``split`` = ``targeted`` for the forget split, ``non_targeted`` for
    the retain evaluation split, and the general-knowledge sets by name): probability, truth ratio and its
    score, ROUGE-L recall and the generated answer, exact memorisation, extraction strength. Scalars:
    ``forget_quality`` and ``log10_forget_quality`` (against ``retain_model`` — a model, ``(model, tok)`` or
    a :class:`RetainReference`, whose truth ratios are computed once and cached — or ``retain_reference``, a
    TOFU ``eval_log_forget.json``, whose rows are matched to the forget split's questions by text: the KS test
    runs on the matched questions, their number in the attr ``forget_quality_instances``), and
    ``model_utility`` (retain split and general sets). ``similar_es``: also the paper's "similar" extraction
    strength; ``paraphrased_es``: also its perturbed-question variant (``extraction_strength_paraphrased``, on
    sets with paraphrased questions). ``n`` keeps up to ``n`` instances per set, spread evenly.

    Returns
    -------
    xarray.Dataset
        An evaluation Dataset (no ``step``): ``probability``, ``truth_ratio``, ``truth_ratio_score``,
        ``rouge_l``, ``exact_memorization``, ``extraction_strength``, ``generated_text`` [instance]
        (``extraction_strength_similar`` [instance] with ``similar_es``, ``extraction_strength_paraphrased``
        [instance] with ``paraphrased_es``), ``generation_truncated`` [instance]; ``forget_quality``,
        ``log10_forget_quality``, ``model_utility`` [] (scalars).
    """
    import xarray as xr

    check_number("batch_size", batch_size, whole=True)
    check_number("n", n, whole=True, optional=True)
    check_number("max_new_tokens", max_new_tokens, whole=True, optional=True)
    general = [s for s in (general if general is not None else ("real_authors", "world_facts")) if s in world]
    sets = {"targeted": spread(world.forget(forget), n), "non_targeted": spread(world[retain_split], n)}
    sets.update({name: spread(world[name], n) for name in general})
    per_set = {}
    for name, examples in sets.items():
        if not examples:
            raise MetricInputError(f"the {name} set is empty")
        per_set[name] = instance_metrics(
            model, tokenizer, examples, forget=name == "targeted", general=name in general,
            max_new_tokens=max_new_tokens, batch_size=batch_size, template=template, similar_es=similar_es,
            paraphrased_es=paraphrased_es,
            split_name=forget if name == "targeted" else (retain_split if name == "non_targeted" else name))
    ids = [example_id(e, i) for name in sets for i, e in enumerate(sets[name])]
    splits = [name for name in sets for _ in sets[name]]
    data = {}
    for var in PER_INSTANCE:
        if var not in per_set["targeted"]:
            continue
        values = [v for name in sets for v in per_set[name][var]]
        dtype = object if var == "generated_text" else None
        data[var] = ("instance", np.array(values, dtype=dtype))
    ds = xr.Dataset(data, coords={
        "instance": ("instance", np.array(ids, dtype=object)),
        "split": ("instance", np.array(splits, dtype=object)),
        "question": ("instance", np.array([example_field(e, "question") for s in sets.values() for e in s],
                                          dtype=object)),
        "answer": ("instance", np.array([example_field(e, "answer") for s in sets.values() for e in s],
                                        dtype=object))})
    reference = _reference(retain_model, retain_reference, template, batch_size)
    fq, matched = float("nan"), 0
    if reference is not None:
        ref_examples = sets["targeted"] if reference.fixed is None else world.forget(forget)
        rows, theirs = reference.pair(ref_examples, tokenizer)
        if ref_examples is sets["targeted"]:
            ours = per_set["targeted"]["truth_ratio"][rows]
        else:
            ours = truth_ratio(model, tokenizer, [ref_examples[i] for i in rows], batch_size, template,
                               split_name=forget)
        fq, matched = forget_quality(ours, theirs), len(rows)
    ds["forget_quality"] = fq
    ds["log10_forget_quality"] = log10_forget_quality(fq)
    ds["model_utility"] = model_utility(utility_values({k: v for k, v in per_set.items() if k != "targeted"}))
    ds.attrs.update(flat_attrs({"schema_version": SCHEMA_VERSION, "kind": "evaluation",
                                "forget_split": forget, "retain_split": retain_split, "general_sets": general,
                                "retain_reference": reference.name if reference is not None else "",
                                "forget_quality_instances": matched,
                                "world": world.name, "instances_per_set": n or 0}))
    return validate(annotate(ds), where="evaluate")


def _reference(retain_model, retain_reference, template, batch_size) -> RetainReference | None:
    if retain_model is not None and retain_reference is not None:
        raise ValueError("give retain_model or retain_reference, not both")
    source = retain_model if retain_model is not None else retain_reference
    if source is None:
        return None
    if isinstance(source, RetainReference):
        return source
    return RetainReference(source, template=template, batch_size=batch_size)


# ------------------------------------------------------------------------------ open-unlearning
_OU_PREFIX = {"forget_": "targeted", "retain_": "non_targeted", "ra_": "real_authors", "wf_": "world_facts"}
_OU_METRIC = {"Q_A_Prob": ("probability", "prob"), "Q_A_Prob_normalised": ("probability", "prob"),
              "Q_A_ROUGE": ("rouge_l", "rougeL_recall"), "truth_ratio": ("truth_ratio", "score"),
              "Truth_Ratio": ("truth_ratio", "score")}
_OU_TARGETED_ONLY = ("extraction_strength", "exact_memorization")  # forget-set metrics, keys without a prefix


def read_open_unlearning(path, world=None, forget: str = "forget10", retain_split: str = "retain_perturbed"):
    """An open-unlearning ``TOFU_EVAL.json`` (``{metric: {"agg_value", "value_by_index"}}``) as a Dataset with
    this package's variable names, so existing evaluations sit beside ours.

    Per-index values become ``instance`` rows: ``forget_*`` metrics on ``targeted`` instances, ``retain_*`` on
    ``non_targeted``, ``ra_*`` on ``real_authors``, ``wf_*`` on ``world_facts``; ``extraction_strength`` and
    ``exact_memorization`` are forget-set metrics. With a ``world`` the indices become its instance ids
    (``forget10/a180/q0``), otherwise ``forget/0`` … Scalars: ``forget_quality``, ``model_utility``, and every
    ``agg_value`` in the ``agg_values`` attr (JSON).

    Returns
    -------
    xarray.Dataset
        An evaluation Dataset (no ``step``): ``probability``, ``truth_ratio``, ``truth_ratio_score``,
        ``rouge_l``, ``generated_text``, ``extraction_strength``, ``exact_memorization`` [instance] where the
        file has them; ``forget_quality``, ``log10_forget_quality``, ``model_utility`` [] (scalars).
    """
    import xarray as xr

    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MetricInputError(f"{path}: cannot read an open-unlearning evaluation ({err})") from None
    if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) and "agg_value" in v for v in raw.values()):
        raise MetricInputError(f"{path}: not an open-unlearning TOFU_EVAL.json (every entry needs an 'agg_value')")
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for key, entry in raw.items():
        split, metric = None, None
        if key in _OU_TARGETED_ONLY:
            split, (var, field) = "targeted", (key, "score")
        else:
            for prefix, name in _OU_PREFIX.items():
                if key.startswith(prefix) and key[len(prefix):] in _OU_METRIC:
                    split, (var, field) = name, _OU_METRIC[key[len(prefix):]]
                    break
        if split is None or not isinstance(entry.get("value_by_index"), Mapping):
            continue
        metric = var
        for index, value in entry["value_by_index"].items():
            if not isinstance(value, Mapping) or value.get(field) is None:
                continue
            row = rows.setdefault((split, int(index)), {})
            row[metric] = float(np.mean(value[field]))
            if metric == "rouge_l" and "generation" in value:
                row["generated_text"] = str(value["generation"])
    order = sorted(rows, key=lambda k: (list(_OU_PREFIX.values()).index(k[0]), k[1]))
    lookup = {"targeted": forget, "non_targeted": retain_split, "real_authors": "real_authors",
              "world_facts": "world_facts"}

    def ident(split, index):
        name = lookup[split]
        if world is not None and name in world and index < len(world[name]):
            return world[name][index].id
        return f"{split}/{index}"

    variables = sorted({m for r in rows.values() for m in r})
    data = {}
    for var in variables:
        values = [rows[k].get(var, "" if var == "generated_text" else np.nan) for k in order]
        data[var] = ("instance", np.array(values, dtype=object if var == "generated_text" else np.float64))
    ds = xr.Dataset(data, coords={"instance": ("instance", np.array([ident(*k) for k in order], dtype=object)),
                                  "split": ("instance", np.array([k[0] for k in order], dtype=object))})
    if "forget_truth_ratio" in raw or "forget_Truth_Ratio" in raw:
        tr = ds["truth_ratio"].where(ds.split == "targeted")
        ds["truth_ratio_score"] = xr.where(ds.split == "targeted", np.minimum(tr, 1 / tr),
                                           np.maximum(0, 1 - ds["truth_ratio"]))
    for scalar in ("forget_quality", "model_utility"):
        if scalar in raw:
            ds[scalar] = float(raw[scalar]["agg_value"])
    if "forget_quality" in ds:
        fq = float(ds["forget_quality"])
        ds["log10_forget_quality"] = log10_forget_quality(fq)
    ds.attrs.update(flat_attrs({"schema_version": SCHEMA_VERSION, "kind": "evaluation",
                                "source": str(path), "format": "open-unlearning TOFU_EVAL.json",
                                "agg_values": {k: v["agg_value"] for k, v in raw.items()}}))
    return validate(annotate(ds), where=str(path))
