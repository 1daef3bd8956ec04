"""from_open_unlearning: every mapped method's composite has the batch loss (and gradient) of open-unlearning's
definition, written here independently on logits and labels; unknown methods and method_args are refused by
name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import geffect_lab as gl
from geffect_lab.engine.forward import Samples, objective_inputs
from geffect_lab.objectives import ObjectiveError, from_open_unlearning
from geffect_lab.testing import tiny_causal_lm

V = 48
RTOL = 1e-10


@pytest.fixture(scope="module")
def models():
    return tiny_causal_lm("llama", V, seed=0), tiny_causal_lm("llama", V, seed=1)


def _batch(seed: int, prompts, answers) -> dict[str, torch.Tensor]:
    """Right-padded question + answer rows, padded to the longest as open-unlearning's collator does; labels -100
    outside the answers (the Hugging Face convention)."""
    g = torch.Generator().manual_seed(seed)
    width = max(p + a for p, a in zip(prompts, answers))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (p, a) in enumerate(zip(prompts, answers)):
        ids[r, :p + a] = torch.randint(3, V, (p + a,), generator=g)
        att[r, :p + a] = 1
        labels[r, p:p + a] = ids[r, p:p + a]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


FORGET = _batch(1, prompts=[3, 5, 2], answers=[4, 2, 6])
ALTERNATE = _batch(2, prompts=[3, 5, 2], answers=[3, 5, 2])
RETAIN = _batch(3, prompts=[4, 2], answers=[5, 3])


def _ours(objective, model, ref) -> torch.Tensor:
    sides = {"forget": Samples(["f0", "f1", "f2"], FORGET, refusal=ALTERNATE), "retain": Samples(["r0", "r1"], RETAIN)}
    return sum(t.weight * t.loss(objective_inputs(model, t, sides[t.spec.role], ref)).mean() for t in objective.terms)


# ------------------------------------------------------------ open-unlearning's definitions, on logits/labels
def _run(model, batch, layer=None):
    """Logits and, when asked, the output of decoder block ``layer``."""
    seen = []
    hook = model.model.layers[layer].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple)
                                                                                       else o)) \
        if layer is not None else None
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if hook is not None:
        hook.remove()
    return logits, (seen[0] if seen else None)


def _token_nll(logits, labels):
    """Next-token NLL [row, position] at the shifted labels (0 where ignored) and the valid mask."""
    target = labels[:, 1:]
    valid = target != -100
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp_min(0), reduction="none")
    return nll * valid, valid


def ou_mean_nll(model, batch):
    """A causal LM's loss: NLL averaged over every label token of the batch."""
    nll, valid = _token_nll(_run(model, batch)[0], batch["labels"])
    return nll.sum() / valid.sum()


def ou_seq_nll(model, batch):
    return _token_nll(_run(model, batch)[0], batch["labels"])[0].sum(-1)


def ou_kl(model, ref, batch):
    """KL(ref ‖ model) over every position of the batch, divided by rows × positions."""
    cur = F.log_softmax(_run(model, batch)[0], -1).reshape(-1, V)
    with torch.no_grad():
        old = F.log_softmax(_run(ref, batch)[0], -1).reshape(-1, V)
    return (old.exp() * (old - cur)).sum() / cur.shape[0]


def ou_preference(model, ref, lose, win=None, beta=0.1):
    """-(2/β)·mean logsigmoid(β(win log-ratio − lose log-ratio)), log-ratios of summed NLLs vs the reference."""
    with torch.no_grad():
        lose_ref = ou_seq_nll(ref, lose)
        win_ref = ou_seq_nll(ref, win) if win is not None else None
    lose_ratio = -(ou_seq_nll(model, lose) - lose_ref)
    win_ratio = -(ou_seq_nll(model, win) - win_ref) if win is not None else 0.0
    return -2 / beta * F.logsigmoid(beta * (win_ratio - lose_ratio)).mean()


def ou_simnpo(model, batch, beta, delta):
    per_row = ou_seq_nll(model, batch) / (batch["labels"] != -100).sum(-1) - delta
    return -F.logsigmoid(beta * per_row).mean() * 2 / beta


def ou_weighted_ascent(model, batch, weight_of_p):
    """-(token mean over the batch) of sg(w(p)) · nll, p the probability of each label token."""
    nll, valid = _token_nll(_run(model, batch)[0], batch["labels"])
    w = weight_of_p(torch.exp(-nll).detach())
    return -(w * nll)[valid].mean()


def ou_activation_loss(a, b, labels):
    """Squared difference averaged over the hidden dimension, then over each row's label tokens, then rows."""
    mask = (labels != -100).to(a.dtype)
    per_row = ((a - b).pow(2).mean(-1) * mask).sum(-1) / mask.sum(-1)
    return per_row.mean()


def ou_ceu(model, batch, skip):
    logits = _run(model, batch)[0]
    labels = batch["labels"]
    valid = labels != -100
    labels = labels.masked_fill(valid & (valid.cumsum(-1) <= skip), -100)[:, 1:]
    keep = labels != -100
    z, y = logits[:, :-1][keep], labels[keep]
    target = F.softmax(z.detach().scatter(-1, y[:, None], float("-inf")), -1)
    return -(target * F.log_softmax(z, -1)).sum(-1).mean()


def _retain(kind, model, ref, layer=None):
    if kind == "NLL":
        return ou_mean_nll(model, RETAIN)
    if kind == "KL":
        return ou_kl(model, ref, RETAIN)
    h = _run(model, RETAIN, layer)[1]
    with torch.no_grad():
        h_ref = _run(ref, RETAIN, layer)[1]
    return ou_activation_loss(h, h_ref, RETAIN["labels"])


def _assert_same(ours, theirs, model):
    """Equal losses and equal gradients over every parameter."""
    assert torch.allclose(ours, theirs, rtol=RTOL, atol=0), (float(ours), float(theirs))
    params = [p for p in model.parameters()]
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    for a, b in zip(g_ours, g_theirs):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


# -------------------------------------------------------------------------------------------------- tests
def test_grad_ascent_pools_tokens_over_the_batch(models):
    model, ref = models
    objective = from_open_unlearning("GradAscent")
    assert objective.name == "wga" and objective.forget_term.params == {"alpha": 0.0, "pooled": True}
    _assert_same(_ours(objective, model, ref), -ou_mean_nll(model, FORGET), model)


@pytest.mark.parametrize("args", [{}, {"gamma": 0.7, "alpha": 2.5}])
def test_grad_diff_with_nll(models, args):
    model, ref = models
    gamma, alpha = args.get("gamma", 1.0), args.get("alpha", 1.0)
    theirs = gamma * -ou_mean_nll(model, FORGET) + alpha * ou_mean_nll(model, RETAIN)
    _assert_same(_ours(from_open_unlearning("GradDiff", args), model, ref), theirs, model)


def test_npo_with_its_defaults(models):
    model, ref = models
    objective = from_open_unlearning("NPO")
    assert objective.params()["npo.beta"] == 0.1
    theirs = ou_preference(model, ref, FORGET, beta=0.1) + ou_mean_nll(model, RETAIN)
    _assert_same(_ours(objective, model, ref), theirs, model)


@pytest.mark.parametrize("args", [{}, {"delta": 0.3, "beta": 2.0, "gamma": 0.5, "alpha": 0.25}])
def test_simnpo_delta_inside_beta(models, args):
    model, ref = models
    a = {"delta": 0.0, "beta": 4.5, "gamma": 0.125, "alpha": 1.0, **args}
    theirs = a["gamma"] * ou_simnpo(model, FORGET, a["beta"], a["delta"]) + a["alpha"] * ou_mean_nll(model, RETAIN)
    objective = from_open_unlearning("SimNPO", args)
    assert objective.params()["simnpo.delta"] == a["delta"] and objective.params()["simnpo.delta_inside"]
    _assert_same(_ours(objective, model, ref), theirs, model)


def test_dpo_prefers_the_alternate_answer(models):
    model, ref = models
    theirs = 0.5 * ou_preference(model, ref, FORGET, win=ALTERNATE, beta=0.3) + ou_mean_nll(model, RETAIN)
    objective = from_open_unlearning("DPO", {"beta": 0.3, "gamma": 0.5})
    _assert_same(_ours(objective, model, ref), theirs, model)


@pytest.mark.parametrize("kind", ["EMBED_DIFF", "NLL"])
def test_rmu_steers_block_activations(models, kind):
    model, ref = models
    coeff, layer = 3.0, 1
    args = {"steering_coeff": coeff, "module_regex": rf"model\.layers\.{layer}", "retain_loss_type": kind,
            "alpha": 0.5}
    objective = from_open_unlearning("RMU", args, model=model)
    h = _run(model, FORGET, layer)[1]
    u = torch.rand(h.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # rmu.seed = 0
    theirs = ou_activation_loss(h, (u / u.norm() * coeff).expand_as(h), FORGET["labels"]) + \
        0.5 * _retain(kind, model, ref, layer)
    _assert_same(_ours(objective, model, ref), theirs, model)


def test_grad_diff_with_kl_over_every_position(models):
    """Their KL retain loss covers every position of the padded batch: kl_all, through the engine's forward."""
    model, ref = models
    objective = from_open_unlearning("GradDiff", {"retain_loss_type": "KL", "alpha": 2.0})
    assert [t.name for t in objective.terms] == ["wga", "kl_all"]
    assert (RETAIN["attention_mask"] == 0).any()  # padding positions count too
    theirs = -ou_mean_nll(model, FORGET) + 2.0 * ou_kl(model, ref, RETAIN)
    _assert_same(_ours(objective, model, ref), theirs, model)
    assert [t.name for t in from_open_unlearning("RMU", {"retain_loss_type": "KL"}).terms] == ["rmu", "kl_all"]


@pytest.mark.parametrize("args", [{}, {"beta": 2.5, "gamma": 0.5}])
def test_wga_their_beta_is_our_alpha(models, args):
    model, ref = models
    beta, gamma = args.get("beta", 1.0), args.get("gamma", 1.0)
    theirs = gamma * ou_weighted_ascent(model, FORGET, lambda p: p ** beta) + ou_mean_nll(model, RETAIN)
    objective = from_open_unlearning("WGA", args)
    assert objective.forget_term.params == {"alpha": beta, "pooled": True}
    _assert_same(_ours(objective, model, ref), theirs, model)


def test_satimp_with_its_defaults(models):
    model, ref = models
    theirs = 0.1 * ou_weighted_ascent(model, FORGET, lambda p: p ** 5.0 * (1 - p) ** 1.0) + \
        ou_mean_nll(model, RETAIN)
    _assert_same(_ours(from_open_unlearning("SatImp"), model, ref), theirs, model)


@pytest.mark.parametrize("skip", [0, 1, 2])
def test_ceu_skips_the_first_answer_tokens(models, skip):
    model, ref = models
    objective = from_open_unlearning("CEU", {"ignore_first_n_answer_tokens": skip})
    _assert_same(_ours(objective, model, ref), ou_ceu(model, FORGET, skip), model)


def test_zero_alpha_leaves_the_retain_term_out():
    assert from_open_unlearning("NPO", {"alpha": 0}).name == "npo"
    assert from_open_unlearning("npo", {"gamma": 2}).name == "2*npo+gd"


def test_defaults_keep_todays_objectives():
    assert gl.get_objective("gd").defaults == {"pooled": False}
    assert gl.get_objective("rr").defaults == {"layer": None, "dim_mean": False}
    assert gl.get_objective("ceu").defaults == {"skip_first": 0, "pooled": False}


def test_unknown_method_lists_the_mapped_ones():
    with pytest.raises(ObjectiveError, match="'UNDIAL' has no mapping; mapped methods: GradAscent, GradDiff, NPO"):
        from_open_unlearning("UNDIAL")
    assert set(gl.objectives.OPEN_UNLEARNING_METHODS) == {"GradAscent", "GradDiff", "NPO", "SimNPO", "DPO", "RMU",
                                                         "WGA", "SatImp", "CEU"}


@pytest.mark.parametrize("method,args,message", [
    ("NPO", {"betta": 0.1}, r"NPO has no method_arg 'betta' here; its method_args are: beta=0.1, gamma=1.0"),
    ("GradAscent", {"alpha": 1}, r"GradAscent has no method_arg 'alpha' here; its method_args are: none"),
    ("GradDiff", {"retain_loss_type": "EMBED_DIFF"}, r"retain_loss_type='EMBED_DIFF' is not supported; use one of "
                                                     r"NLL, KL"),
    ("NPO", {"beta": "high"}, r"method_arg beta='high' must be a finite number"),
    ("NPO", {"beta": 0}, r"open-unlearning NPO: objective 'npo': parameter beta=0.0 is out of range"),
    ("RMU", {"trainable_params_regex": [r"model\.layers\.7\.mlp.*"]}, r"selects parameters, not a loss"),
    ("RMU", {"module_regex": r"model\.layers\.(5|7)"}, r"cannot read a block index"),
])
def test_bad_method_args_are_refused_by_name(method, args, message):
    with pytest.raises(ObjectiveError, match=message):
        from_open_unlearning(method, args)


def test_rmu_module_must_be_one_block_of_the_model(models):
    model, _ = models
    assert from_open_unlearning("RMU", {"module_regex": r"model\.layers\.1"}, model=model).forget_term.params[
        "layer"] == 1
    with pytest.raises(ObjectiveError, match=r"matches 2 modules"):
        from_open_unlearning("RMU", {"module_regex": r"model\.layers\.\d"}, model=model)
    with pytest.raises(ObjectiveError, match=r"not a decoder block"):
        from_open_unlearning("RMU", {"module_regex": r"model\.layers\.0\.mlp"}, model=model)
