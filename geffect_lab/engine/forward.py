"""The engine's forward passes: token log-probabilities, risks and the inputs objectives ask for.

Objectives never run the model. :func:`objective_inputs` runs the forward passes a term needs (the answer,
a refusal answer, a hidden-state capture) and packs the results, with the reference quantities, into an
:class:`~geffect_lab.objectives.ObjectiveInputs`.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .._batching import captured_output, log_probs, model_device, trim
from ..data import PromptTemplate, check_records, encode_pairs, example_field, example_id
from ..objectives import ObjectiveError, ObjectiveInputs, Term
from .groups import find_blocks

__all__ = ["Samples", "encode_side", "answer_logp", "risk_and_tokens", "answer_loglik", "objective_inputs",
           "reference_quantities", "check_fits", "max_positions", "default_layer", "resolve_layers", "refusal_for",
           "refusal_drawer", "hidden_states_at", "hidden_reading", "HIDDEN_POSITIONS"]


def default_layer(model) -> int:
    """RMU's default layer ⌊2L/3⌋ for a model of L blocks."""
    return (2 * len(find_blocks(model)[1])) // 3


def resolve_layers(model, terms: Sequence[Term]) -> tuple[Term, ...]:
    """Give every term that reads hidden states a concrete ``layer`` (default ⌊2L/3⌋), checked in range."""
    n_blocks = len(find_blocks(model)[1])
    out = []
    for term in terms:
        if "layer" in term.params:
            layer = term.params["layer"]
            layer = default_layer(model) if layer is None else int(layer)
            if not -n_blocks <= layer < n_blocks:
                raise ObjectiveError(f"objective {term.name!r}: layer={layer} is out of range for a model of "
                                     f"{n_blocks} blocks (0 … {n_blocks - 1})")
            term = replace(term, params={**term.params, "layer": layer % n_blocks})
        out.append(term)
    return tuple(out)


def refusal_for(example_id_: str, refusals: Sequence[str]) -> str:
    """The refusal answer paired with an instance: stable (CRC32 of its id), spread over the refusals."""
    return refusals[zlib.crc32(example_id_.encode()) % len(refusals)]


def refusal_drawer(term: Term, refusals: Sequence[str] | None) -> Callable[[str], str]:
    """How a term's refusal answers are picked each time samples are encoded (a fetch): its ``refusal``
    parameter ``"fixed"`` (default; :func:`refusal_for`, the same one every time) or ``"per_fetch"`` (drawn at
    random for every sample of every fetch from a generator seeded with ``refusal_seed``)."""
    if term.params.get("refusal", "fixed") != "per_fetch" or not refusals:
        return lambda example_id_: refusal_for(example_id_, refusals)
    rng = random.Random(int(term.params.get("refusal_seed", 0)))
    return lambda example_id_: refusals[rng.randrange(len(refusals))]


@dataclass
class Samples:
    """The samples of one side of an objective (its forget or retain samples), encoded once: ``batch`` the
    question + answer, ``refusal`` the question + its refusal answer (for objectives that train towards one)."""

    ids: list[str]
    batch: dict[str, torch.Tensor]
    refusal: dict[str, torch.Tensor] | None = None
    ref: dict[str, torch.Tensor] = field(default_factory=dict)  # reference quantities, filled lazily


def encode_side(tokenizer, examples: Sequence[Any], *, refusals: Sequence[str] | None = None,
                need_refusal: bool = False, template: PromptTemplate | str | None = None,
                role: str = "forget", draw: Callable[[str], str] | None = None) -> Samples:
    """Encode one side's samples; with ``need_refusal`` also each question with a refusal answer, picked by
    ``draw(id)`` (default :func:`refusal_for`)."""
    if not examples:
        raise ObjectiveError(f"the {role} set is empty; the objective needs {role} samples")
    examples = check_records(examples, role)
    ids = [example_id(e, i) for i, e in enumerate(examples)]
    questions = [example_field(e, "question") for e in examples]
    batch = encode_pairs(tokenizer, list(zip(questions, [example_field(e, "answer") for e in examples])), template)
    refusal = None
    if need_refusal:
        if not refusals:
            raise ObjectiveError("this objective trains towards refusal answers, but no refusals were given "
                                 "(pass refusals=world.refusals)")
        draw = draw or (lambda example_id_: refusal_for(example_id_, refusals))
        refusal = encode_pairs(tokenizer, [(q, draw(i)) for q, i in zip(questions, ids)], template)
    return Samples(ids, batch, refusal)


def _forward(model, batch: dict[str, torch.Tensor], hidden_layer: int | None = None):
    """Logits of a batch and, when asked, the hidden state after block ``hidden_layer``."""
    device = model_device(model)
    part = {k: v.to(device) for k, v in trim(batch).items()}
    block = find_blocks(model)[1][hidden_layer] if hidden_layer is not None else None
    with captured_output(block) as captured:
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False).logits
    return logits, part["labels"], (captured[-1] if captured else None)


def answer_logp(logits: torch.Tensor, labels: torch.Tensor, full: bool = False):
    """Token log-probs of the answer, compacted to ``[row, answer token]`` (answer tokens first, left-aligned).

    Returns ``(logp, mask, full_logp or None, positions)`` where ``positions[row, k]`` is the sequence
    position of answer token k (its label position) and ``mask`` is 1.0 on real answer tokens.
    """
    lab = labels[:, 1:]
    is_answer = lab != -100
    lengths = is_answer.sum(1)
    width = max(int(lengths.max()), 1)
    # Answers are a contiguous tail of the prompt+answer sequence: their first label position per row.
    first = torch.where(is_answer.any(1), is_answer.float().argmax(1), torch.zeros_like(lengths))
    k = torch.arange(width, device=labels.device)
    pos = (first[:, None] + k[None, :]).clamp(max=lab.shape[1] - 1)      # index into the shifted axis
    mask = (k[None, :] < lengths[:, None])
    lg = logits[:, :-1].gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    logp_all = log_probs(lg)
    tok = lab.gather(1, pos).clamp_min(0)
    logp = logp_all.gather(-1, tok[..., None]).squeeze(-1)
    maskf = mask.to(logp.dtype)
    return logp * maskf, maskf, (logp_all if full else None), pos + 1


def hidden_at_answers(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Hidden states [row, position, d] gathered at each answer token's own position → [row, token, d]."""
    idx = positions.clamp(max=hidden.shape[1] - 1)
    return hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))


HIDDEN_POSITIONS = ("answer", "predicting", "all")


def hidden_states_at(hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, attention: torch.Tensor,
                     which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states a term reads and their mask: ``"answer"`` at each answer token's own position,
    ``"predicting"`` one position earlier (the output there predicts the answer token), ``"all"`` every
    position the attention mask keeps (question and answer)."""
    if which == "answer":
        return hidden_at_answers(hidden, positions), mask
    if which == "predicting":
        return hidden_at_answers(hidden, positions - 1), mask
    if which == "all":
        return hidden, attention.to(mask.dtype)
    raise ObjectiveError(f"hidden-state positions {which!r} are not known; use one of {', '.join(HIDDEN_POSITIONS)}")


def risk_and_tokens(model, batch: dict[str, torch.Tensor]):
    """Per-instance risk ``R_i = mean_k nll_{i,k}`` and the token NLLs ``[instance, answer token]``."""
    logits, labels, _ = _forward(model, batch)
    logp, mask, _, _ = answer_logp(logits, labels)
    nll = -logp
    return (nll * mask).sum(1) / mask.sum(1).clamp_min(1), nll, mask


def answer_loglik(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's answer log-likelihood ``log p(a | q) = Σ_k log p_k`` (a sum over the answer tokens, not a mean):
    the ``log p(s_j)`` of the paper's PG-effect."""
    logits, labels, _ = _forward(model, batch)
    logp, _, _, _ = answer_logp(logits, labels)
    return logp.sum(1)


def _quantities(model, side: Samples, needs: frozenset[str], layer: int | None, alt: bool,
                positions: str = "answer"):
    logits, labels, hidden = _forward(model, side.batch, layer if needs & {"hidden", "ref_hidden"} else None)
    logp, mask, full, pos = answer_logp(logits, labels, full=bool(needs & {"full_logp", "ref_full_logp"}))
    out: dict[str, torch.Tensor | None] = {"logp": logp, "mask": mask, "full_logp": full}
    if needs & {"all_logp", "ref_all_logp"}:  # every position of the (trimmed) padded batch
        out["all_logp"] = log_probs(logits)
    if hidden is not None:  # pos: each answer token's own (label) position
        attention = trim(side.batch)["attention_mask"].to(hidden.device)
        out["hidden"], out["hidden_mask"] = hidden_states_at(hidden, pos, mask, attention, positions)
    if alt and side.refusal is not None:
        alt_logits, alt_labels, _ = _forward(model, side.refusal)
        out["alt_logp"], out["alt_mask"], _, _ = answer_logp(alt_logits, alt_labels)
    return out


@torch.no_grad()
def reference_quantities(reference, side: Samples, needs: frozenset[str], layer: int | None,
                         positions: str = "answer") -> dict[str, torch.Tensor]:
    """What a term needs from the frozen reference model, computed without gradients and cached on the side."""
    want = {n for n in needs if n.startswith("ref_")}
    key = (tuple(sorted(want)), layer, positions)
    if key in side.ref:
        return side.ref[key]
    if not want:
        return {}
    q = _quantities(reference, side, frozenset(n[4:] for n in want) | ({"hidden"} if "ref_hidden" in want else set()),
                    layer, alt="ref_alt_logp" in want, positions=positions)
    got = {}
    if "ref_logp" in want:
        got["ref_logp"] = q["logp"]
    if "ref_full_logp" in want:
        got["ref_full_logp"] = q["full_logp"]
    if "ref_alt_logp" in want:
        got["ref_alt_logp"] = q["alt_logp"]
    if "ref_hidden" in want:
        got["ref_hidden"] = q["hidden"]
    if "ref_all_logp" in want:
        got["ref_all_logp"] = q["all_logp"]
    side.ref[key] = {k: v.detach() for k, v in got.items()}
    return side.ref[key]


def hidden_reading(term: Term) -> tuple[int | None, str]:
    """The block a term reads hidden states after (its ``layer``) and at which positions (its ``positions``
    parameter, default the answer tokens); ``(None, "answer")`` for a term that reads none."""
    if not term.spec.needs & {"hidden", "ref_hidden"}:
        return None, "answer"
    return term.params.get("layer"), term.params.get("positions", "answer")


def objective_inputs(model, term: Term, side: Samples, reference) -> ObjectiveInputs:
    """Run the forward passes ``term`` needs on ``side`` and pack them (with reference quantities)."""
    needs = term.spec.needs
    layer, positions = hidden_reading(term)
    q = _quantities(model, side, needs, layer, alt="alt" in needs, positions=positions)
    ref = reference_quantities(reference, side, needs, layer, positions) if reference is not None else {}
    missing = {n for n in needs if n.startswith("ref_")} - set(ref)
    if missing:
        raise ObjectiveError(f"objective {term.name!r} needs {', '.join(sorted(missing))} from a reference model")
    return ObjectiveInputs(
        logp=q["logp"], mask=q["mask"], ids=side.ids, full_logp=q["full_logp"] if "full_logp" in needs else None,
        hidden=q.get("hidden"), hidden_mask=q.get("hidden_mask"),
        alt_logp=q.get("alt_logp"), alt_mask=q.get("alt_mask"),
        all_logp=q.get("all_logp") if "all_logp" in needs else None, **ref)


def max_positions(model) -> int | None:
    """The longest sequence the model's position scheme accepts, when its config states one."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits(model, batch: dict[str, torch.Tensor], ids: Sequence[str], what: str) -> None:
    """Refuse, before any computation, data the model cannot read: a token id beyond its embedding (a tokenizer
    larger than the model's vocabulary) or a prompt + answer longer than its maximum positions."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None) or emb.weight.shape[0]
    mask = batch["attention_mask"].bool()
    big = (batch["input_ids"] >= rows) & mask
    if big.any():
        r, c = (int(v) for v in big.nonzero()[0])
        raise ObjectiveError(
            f"{what} instance {ids[r]!r} holds token id {int(batch['input_ids'][r, c])}, beyond the model's "
            f"embedding of {rows} rows: the tokenizer does not belong to this model (load the model's own)")
    limit = max_positions(model)
    lengths = mask.sum(1)
    if limit is not None and int(lengths.max()) > limit:
        r = int(lengths.argmax())
        raise ObjectiveError(
            f"{what} instance {ids[r]!r} is {int(lengths[r])} tokens long (prompt + answer), more than the model's "
            f"{limit} positions: shorten it or leave it out")
