"""The conventions where other code differs from ours (docs/conventions.md), each a parameter: the alternative
gives the numbers of a hand-written float64 reference."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import geffect_lab as gl
from geffect_lab.data import encode_pairs
from geffect_lab.engine.api import Measurement
from geffect_lab.engine.forward import refusal_for
from geffect_lab.objectives import ObjectiveError, ObjectiveInputs
from geffect_lab.objectives.builtin import rmu_direction
from geffect_lab.testing import relative_error, tiny_model


@pytest.fixture(scope="module")
def sets(world):
    """Mixed answer lengths (world facts are short, author answers long), so batches are padded."""
    return {"forget": world["forget01"][:2] + world["world_facts"][:1],
            "targets": {"targeted": world["forget01"][2:4], "non_targeted": world["world_facts"][1:3]}}


MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)


def _logp_inputs(**extra) -> ObjectiveInputs:
    p = torch.tensor([[0.5, 0.25, 0.8], [0.9, 0.6, 1.0]], dtype=torch.float64)
    return ObjectiveInputs(logp=(torch.log(p) * MASK).requires_grad_(True), mask=MASK, ids=["s0", "s1"], **extra)


def _mean_logp(x: ObjectiveInputs, j: int) -> float:
    k = int(MASK[j].sum())
    return float(x.logp[j, :k].detach().mean())


# ------------------------------------------------------------------------------------------- SimNPO's δ
@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_simnpo_delta_inside_beta_is_the_official_form(delta):
    """Official SimNPO: ℓ = -(2/β)·logsigmoid(β·(nll̄ − δ)); ours by default: -(2/β)·logsigmoid(-β·mean log p − δ)."""
    beta = 2.5
    x = _logp_inputs()
    inside = gl.objectives.simnpo(x, beta=beta, delta=delta, delta_inside=True)
    outside = gl.objectives.simnpo(x, beta=beta, delta=delta)
    for j in range(2):
        nll = -_mean_logp(x, j)
        official = -(2 / beta) * math.log(1 / (1 + math.exp(-beta * (nll - delta))))
        ours = -(2 / beta) * math.log(1 / (1 + math.exp(beta * (-nll) + delta)))
        assert float(inside[j].detach()) == pytest.approx(official, rel=1e-13)
        assert float(outside[j].detach()) == pytest.approx(ours, rel=1e-13)
    # the two agree when δ_ours = β·δ_official, and the recorded weight is the gradient's factor in both forms
    torch.testing.assert_close(inside, gl.objectives.simnpo(x, beta=beta, delta=beta * delta), rtol=1e-13, atol=0)
    (grad,) = torch.autograd.grad(inside.sum(), x.logp)
    weight = gl.get_objective("simnpo").weight(x, beta=beta, delta=delta, delta_inside=True)
    torch.testing.assert_close(grad, weight[:, None] * MASK / MASK.sum(1, keepdim=True), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------- rr's reduction
@pytest.mark.parametrize("dim_mean", [False, True])
def test_rr_sums_or_averages_the_hidden_dimension(dim_mean):
    torch.manual_seed(2)
    hidden = torch.randn(size=(2, 3, 4), dtype=torch.float64)
    ref = torch.randn(size=(2, 3, 4), dtype=torch.float64)
    x = ObjectiveInputs(logp=torch.zeros(2, 3, dtype=torch.float64), mask=MASK, hidden=hidden, hidden_mask=MASK,
                        ref_hidden=ref)
    for j, value in enumerate(gl.objectives.rr(x, layer=0, dim_mean=dim_mean)):
        tokens = range(int(MASK[j].sum()))
        per_token = [sum((float(hidden[j, k, d]) - float(ref[j, k, d])) ** 2 for d in range(4)) for k in tokens]
        expected = sum(per_token) / len(per_token) / (4 if dim_mean else 1)
        assert float(value) == pytest.approx(expected, rel=1e-13)


# ------------------------------------------------------------------------------------------- RMU's positions
def _mean_nll(model, batch) -> torch.Tensor:
    """Each row's mean answer-token NLL, written by hand from the logits (float64 throughout)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (nll * mask).sum(1) / mask.sum(1)


def _hand_rmu(model, batch, layer: int, c: float, positions: str) -> torch.Tensor:
    """RMU's per-sample loss from HF's own hidden states (after block ``layer``: ``hidden_states[layer + 1]``,
    layer 0 here, before any final norm), the positions picked from the labels by hand."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states[layer + 1]
    u = rmu_direction(hidden.shape[-1], 0, False, hidden.dtype, hidden.device)
    out = []
    for j in range(hidden.shape[0]):
        answer = (batch["labels"][j] != -100).nonzero().flatten().tolist()   # the answer tokens' own positions
        rows = {"answer": answer, "predicting": [t - 1 for t in answer],
                "all": batch["attention_mask"][j].nonzero().flatten().tolist()}[positions]
        out.append(((hidden[j, rows] - c * u) ** 2).mean(-1).mean())
    return torch.stack(out)


@pytest.mark.parametrize("positions", ["answer", "predicting", "all"])
def test_rmu_hidden_state_positions(positions, tokenizer, sets):
    model = tiny_model("gpt2", len(tokenizer))
    forget, targets = sets["forget"], sets["targets"]
    args = dict(forget=forget, targets=targets, params={"layer": 0, "c": 2.0, "positions": positions},
                chunk_size=4, per_token=False)
    ds = gl.g_effect(model, tokenizer, "rmu", **args).isel(step=0)
    hand = _hand_rmu(model, gl.encode(tokenizer, forget), 0, 2.0, positions)
    np.testing.assert_allclose(ds.sample_loss, hand.detach().numpy(), rtol=1e-12)
    # the G-effect: ⟨∇R(D), ∇ mean_j ℓ_j⟩ with the hand-written loss
    g_loss = torch.autograd.grad(hand.mean(), list(model.parameters()), allow_unused=True)
    for name, examples in targets.items():
        g_risk = torch.autograd.grad(_mean_nll(model, gl.encode(tokenizer, examples)).mean(),
                                     list(model.parameters()))
        want = sum(float((a * b).sum()) for a, b in zip(g_risk, g_loss) if b is not None)
        got = ds.g_effect.sel(term="forget").sum("layer").where(ds.split == name, drop=True).mean()
        assert float(got) == pytest.approx(want, rel=1e-10)
    ref = gl.g_effect(model, tokenizer, "rmu", engine="reference", **args)
    assert relative_error(ref.isel(step=0).g_effect, ds.g_effect) <= 1e-9
    if positions != "answer":
        answer = gl.g_effect(model, tokenizer, "rmu", **{**args, "params": {"layer": 0, "c": 2.0}})
        assert relative_error(answer.isel(step=0).sample_loss, ds.sample_loss) > 1e-6  # a different loss


def test_rmu_positions_are_checked():
    with pytest.raises(ObjectiveError, match=r"positions='last' is out of range; use positions in \{answer, "
                                             r"predicting, all\}"):
        gl.objectives.rmu(positions="last")


# ------------------------------------------------------------------------------------------- PO's refusal
def _refusal_ids(tokenizer, examples, refusals):
    return encode_pairs(tokenizer, [(e.question, r) for e, r in zip(examples, refusals)])["input_ids"]


@pytest.mark.parametrize("objective", ["po", "dpo"])
def test_refusals_drawn_per_fetch_or_fixed(objective, tokenizer, world, sets):
    model = tiny_model("gpt2", len(tokenizer))
    forget = world["forget01"][:6]
    targets = sets["targets"]
    refusals = list(world.refusals)
    drawn = Measurement(model, tokenizer, objective, {"refusal": "per_fetch", "refusal_seed": 3}, forget=forget,
                        targets=targets, refusals=refusals)
    drawn.set_reference(model)
    rng = random.Random(3)
    fetches = [[refusals[rng.randrange(len(refusals))] for _ in forget] for _ in range(2)]
    assert fetches[0] != fetches[1]
    torch.testing.assert_close(drawn.sides["forget"].refusal["input_ids"], _refusal_ids(tokenizer, forget, fetches[0]))
    again = drawn.sides_for(forget)   # a second fetch of the same samples draws anew
    torch.testing.assert_close(again["forget"].refusal["input_ids"], _refusal_ids(tokenizer, forget, fetches[1]))
    fixed = Measurement(model, tokenizer, objective, forget=forget, targets=targets, refusals=refusals)
    fixed.set_reference(model)
    pairs = [refusal_for(e.id, refusals) for e in forget]
    for sides in (fixed.sides, fixed.sides_for(forget)):
        torch.testing.assert_close(sides["forget"].refusal["input_ids"], _refusal_ids(tokenizer, forget, pairs))
    if objective == "po":  # the loss is the drawn refusal's mean token NLL, each pair encoded alone
        losses = drawn.gradient(model).sample_loss
        for j, (e, r) in enumerate(zip(forget, fetches[0])):
            with torch.no_grad():
                nll = _mean_nll(model, gl.encode(tokenizer, [{"id": "x", "question": e.question, "answer": r}]))
            assert losses[j] == pytest.approx(float(nll[0]), rel=1e-12)


# ------------------------------------------------------------------------------------------- token pooling
def test_pooled_forms_average_over_the_batchs_tokens():
    """The paper's code takes one mean over all (answer or hidden-state) tokens of the batch: with ``pooled=True``
    the mean over samples of ℓ_j is that batch mean, written here by hand."""
    torch.manual_seed(4)
    p = torch.tensor([[0.5, 0.25, 0.8], [0.9, 0.6, 1.0]], dtype=torch.float64)
    p_ref = torch.tensor([[0.4, 0.5, 0.7], [0.9, 0.3, 1.0]], dtype=torch.float64)
    hidden = torch.randn(size=(2, 3, 4), dtype=torch.float64)
    x = ObjectiveInputs(logp=torch.log(p) * MASK, mask=MASK, ref_logp=torch.log(p_ref) * MASK,
                        alt_logp=torch.log(p) * MASK, alt_mask=MASK, hidden=hidden, hidden_mask=MASK)
    tokens = [(j, k) for j in range(2) for k in range(int(MASK[j].sum()))]

    def batch_mean(per_token):
        return sum(per_token(j, k) for j, k in tokens) / len(tokens)

    def npo_weight(j, k, beta, alpha):
        pk, ok = float(p[j, k]), float(p_ref[j, k])
        return 2 * pk ** (beta + alpha) / (pk ** beta + ok ** beta)

    u = rmu_direction(4, 0, False, torch.float64, "cpu")
    cases = {
        "tnpo": (dict(beta=1.5), lambda j, k: npo_weight(j, k, 1.5, 0.0) * math.log(float(p[j, k]))),
        "wtnpo": (dict(alpha=0.5, beta=2.0), lambda j, k: npo_weight(j, k, 2.0, 0.5) * math.log(float(p[j, k]))),
        "po": ({}, lambda j, k: -math.log(float(p[j, k]))),
        "rmu": (dict(layer=0, c=3.0), lambda j, k: float(((hidden[j, k] - 3.0 * u) ** 2).mean())),
    }
    for name, (params, per_token) in cases.items():
        spec = gl.get_objective(name)
        pooled = spec(x, pooled=True, **params)
        assert float(pooled.mean()) == pytest.approx(batch_mean(per_token), rel=1e-13), name
        per_sample = spec(x, **params)  # the default: per sample, then over samples
        want = np.mean([np.mean([per_token(j, k) for jj, k in tokens if jj == j]) for j in range(2)])
        assert float(per_sample.mean()) == pytest.approx(want, rel=1e-13), name
