"""Per forget sample: the paper's PG-effect and the objective's per-sample share (``sample_effect``), each held to
a hand-written float64 computation and to the identities that tie them to the objective."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import geffect_lab as gl
from geffect_lab.testing import float64_exact_norms, relative_error, tiny_model


def _loglik(model, batch) -> torch.Tensor:
    """Each row's answer log-likelihood Σ_k log p_k, written by hand from the logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (logp * mask).sum(1), mask.sum(1)


def _grad(model, value):
    return torch.autograd.grad(value, list(model.parameters()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pg_effect_is_the_g_effect_of_each_samples_own_log_likelihood(arch, tokenizer, tiny_llama, tiny_gpt2,
                                                                      tiny_sets):
    """pg_j = ⟨∇R(D), ∇ log p(a_j | q_j)⟩ with log p the sum over the answer tokens, unweighted: computed here with
    plain autograd, each sample encoded alone, R(D) the mean over D of each instance's mean token NLL."""
    model = tiny_llama if arch == "llama" else tiny_gpt2
    ds = gl.g_effect(model, tokenizer, "npo+gd", forget=tiny_sets["forget"], retain=tiny_sets["retain"],
                     targets=tiny_sets["targets"])
    # HF's Llama computes RMSNorm in float32 even in float64: a sample encoded alone and in a padded batch agree
    # to ~1e-8 there (GPT-2: ~1e-15)
    tol = 1e-6 if arch == "llama" else 1e-10
    for name, examples in tiny_sets["targets"].items():
        loglik, count = _loglik(model, gl.encode(tokenizer, examples))
        g_d = _grad(model, -(loglik / count).mean())
        for sample in tiny_sets["forget"]:
            own, tokens = _loglik(model, gl.encode(tokenizer, [sample]))
            g_j = _grad(model, own[0])
            want = sum(float((a * b).sum()) for a, b in zip(g_d, g_j))
            assert float(ds.pg_effect.isel(step=0).sel(sample=sample.id, against=name)) == pytest.approx(want, rel=tol)
            assert int(ds.sample_token_count.sel(sample=sample.id)) == int(tokens[0])
    # the same for every objective: only the samples matter
    po = gl.g_effect(model, tokenizer, "po", forget=tiny_sets["forget"], targets=tiny_sets["targets"])
    assert relative_error(po.pg_effect, ds.pg_effect) <= 1e-12


@pytest.fixture(scope="module")
def clean_llama(tokenizer):
    """A Llama with SDPA attention; measured inside ``float64_exact_norms`` its norms and softmaxes run in float64
    (HF's casts to float32 would cap any float64 agreement at ~1e-8)."""
    return tiny_model("llama", len(tokenizer), attn_implementation="sdpa")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("objective", ["ga", "npo", "0.5*npo+gd", "tnpo", "po", "dpo", "rmu+0.5*rr", "ceu+kl_all"])
def test_sample_effects_sum_to_the_forget_terms_g_effect(arch, objective, tokenizer, clean_llama, tiny_gpt2,
                                                         tiny_sets):
    """Σ_j sample_effect_{j,D} = mean_{i∈D} Σ_l e_{i,l,forget}, to 1e-10 in float64 (two independent contractions:
    per forget sample against ∇R(D), and per target instance against the forget term's gradient)."""
    model = clean_llama if arch == "llama" else tiny_gpt2
    with float64_exact_norms():
        ds = gl.g_effect(model, tokenizer, objective, forget=tiny_sets["forget"], retain=tiny_sets["retain"],
                         targets=tiny_sets["targets"]).isel(step=0)
    for name in tiny_sets["targets"]:
        forget_term = ds.g_effect.sel(term="forget").sum("layer").where(ds.split == name, drop=True).mean()
        assert float(ds.sample_effect.sel(against=name).sum()) == pytest.approx(float(forget_term), rel=1e-10)


def test_npo_share_is_its_weight_times_the_pg_effect(tokenizer, tiny_gpt2, tiny_sets):
    """NPO's gradient is Σ_j w_j ∇log p(s_j) / n (the paper's decomposition), so its share of sample j is
    w_j · pg_j / n; GA's (a per-token mean) is pg_j / (|a_j| · n). A reference unlike the model makes w_j ≠ 1."""
    reference = copy.deepcopy(tiny_gpt2)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    args = dict(forget=tiny_sets["forget"], targets=tiny_sets["targets"])
    npo = gl.g_effect(tiny_gpt2, tokenizer, "npo", params={"beta": 0.5}, reference=reference, **args).isel(step=0)
    n = npo.sizes["sample"]
    assert np.abs(npo.sample_weight - 1).max() > 0.05
    np.testing.assert_allclose(npo.sample_effect, npo.sample_weight * npo.pg_effect / n, rtol=1e-10)
    ga = gl.g_effect(tiny_gpt2, tokenizer, "ga", **args).isel(step=0)
    np.testing.assert_allclose(ga.sample_effect, ga.pg_effect / (ga.sample_token_count * n), rtol=1e-10)
    np.testing.assert_allclose(ga.pg_effect, npo.pg_effect, rtol=1e-12)
