"""The fast engine against the per-instance autograd loop (the oracle), additivity and first order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geffect_lab as gl
from geffect_lab.testing import float64_exact_norms, relative_error, reorder_tolerance, tiny_model

OBJECTIVES = ["ga", "wga", "npo", "simnpo", "tnpo", "wtnpo", "po", "dpo", "rmu", "npo+gd", "ga+kl", "rmu+0.5*rr",
              "satimp", "ceu+kl_all"]


def _both(model, tok, sets, objective, **kw):
    args = dict(objective=objective, forget=sets["forget"], retain=sets["retain"], targets=sets["targets"],
                chunk_size=4, **kw)
    return gl.g_effect(model, tok, **args), gl.g_effect(model, tok, engine="reference", **args)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_matches_the_reference_loop(arch, objective, tokenizer, tiny_llama, tiny_gpt2, tiny_sets):
    model = tiny_llama if arch == "llama" else tiny_gpt2
    fast, ref = _both(model, tokenizer, tiny_sets, objective)
    assert relative_error(fast.g_effect, ref.g_effect) <= 1e-9
    assert relative_error(fast.pg_effect, ref.pg_effect) <= 1e-9
    assert relative_error(fast.sample_effect, ref.sample_effect) <= 1e-9
    # the two paths batch rows differently (the fast one sorts by length), so the risks may differ in the last
    # bits depending on the CPU's kernels (AVX2 or not): a dtype-derived tolerance, never bitwise equality
    assert relative_error(fast.risk, ref.risk) <= reorder_tolerance(torch.float64)
    # HF's Llama runs RMSNorm and the eager softmax in float32 even in a float64 model; forward-mode tangents
    # (fast) and reverse-mode gradients (oracle) round differently there, so Llama's token G-effects agree
    # to ~1e-8. GPT-2 has no such casts; the float64-clean Llama test below shows the engine itself is exact.
    assert relative_error(fast.g_effect_token, ref.g_effect_token) <= (1e-9 if arch == "gpt2" else 1e-6)
    assert abs(fast.g_effect).max() > 0 and np.isfinite(fast.g_effect).all()


@pytest.mark.parametrize("objective", ["npo+gd", "dpo", "rmu"])
def test_fast_per_token_is_exact_on_a_float64_clean_llama(objective, tokenizer, tiny_sets):
    with float64_exact_norms():
        model = tiny_model("llama", len(tokenizer), attn_implementation="sdpa")
        fast, ref = _both(model, tokenizer, tiny_sets, objective)
    assert relative_error(fast.g_effect_token, ref.g_effect_token) <= 1e-9
    assert relative_error(fast.g_effect, ref.g_effect) <= 1e-9


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_additivity(arch, tokenizer, tiny_llama, tiny_gpt2, tiny_sets):
    model = tiny_llama if arch == "llama" else tiny_gpt2
    ds = gl.g_effect(model, tokenizer, "npo+gd", forget=tiny_sets["forget"], retain=tiny_sets["retain"],
                     targets=tiny_sets["targets"])
    e_i = ds.g_effect.sum(["layer", "term"]).isel(step=0)
    # tokens average to the instance
    token_tol = 1e-12 if arch == "gpt2" else 1e-6
    assert relative_error(ds.g_effect_token.isel(step=0).mean("token", skipna=True), e_i) <= token_tol
    # layers sum to the full dot product <∇R_i, ∇L_u>, and instances average to the batch-level G-effect
    from geffect_lab.engine.core import risk_gradient, term_gradients
    from geffect_lab.engine.forward import encode_side
    from geffect_lab.objectives import resolve_objective

    obj = resolve_objective("npo+gd")
    sides = {"forget": encode_side(tokenizer, tiny_sets["forget"]),
             "retain": encode_side(tokenizer, tiny_sets["retain"], role="retain")}
    grads = term_gradients(model, obj, sides, model).grads
    total = {k: grads[0][k] + grads[1].get(k, 0) for k in grads[0]}
    # each check below encodes instances differently (alone, or one set at a time); HF's Llama computes
    # RMSNorm in float32, so different encodings of one instance agree to ~1e-8 there (GPT-2: ~1e-15)
    tol = 1e-6 if arch == "llama" else 1e-10
    for name, examples in tiny_sets["targets"].items():
        for ex in examples:
            g_i = risk_gradient(model, gl.encode(tokenizer, [ex]), None)
            full = sum(float((g_i[k] * total[k]).sum()) for k in total)
            assert float(e_i.sel(instance=ex.id)) == pytest.approx(full, rel=tol)
        g_d = risk_gradient(model, gl.encode(tokenizer, examples), None)
        batch_level = sum(float((g_d[k] * total[k]).sum()) for k in total)
        assert float(e_i.where(ds.split == name, drop=True).mean()) == pytest.approx(batch_level, rel=tol)
        # the sample effects sum over forget samples to the forget term's batch-level G-effect
        forget_only = sum(float((g_d[k] * grads[0][k]).sum()) for k in grads[0])
        assert float(ds.sample_effect.sel(against=name).sum()) == pytest.approx(forget_only, rel=tol)


@pytest.mark.parametrize("name", ["target", "target-gpt2"])
def test_first_order_prediction_of_one_sgd_step(name, world):
    """After one SGD step of size η along -∇L_u, each instance's risk changes by -η·e_i (within 1 %).

    The zoo models are saturated (answer NLL ~1e-3), so the risk is strongly curved: the step moves risks by
    ~1e-7, where the second order is ~0.1 % of the first. The Llama runs with float64 RMSNorm so that float32
    rounding (~1e-10 on these risks) does not swamp such small changes.
    """
    from geffect_lab.engine.core import term_gradients
    from geffect_lab.engine.forward import encode_side
    from geffect_lab.objectives import resolve_objective

    forget, retain = world["forget05"][:8], world["retain_perturbed"][:8]
    targets = {"targeted": forget, "non_targeted": retain}
    with float64_exact_norms():
        model, tok = gl.zoo.load(name, dtype=torch.float64, attn_implementation="sdpa")
        ds = gl.g_effect(model, tok, "ga", forget=forget, targets=targets, per_token=False, pg=False)
        e = ds.g_effect.sum(["layer", "term"]).isel(step=0).values
        grads = term_gradients(model, resolve_objective("ga"), {"forget": encode_side(tok, forget)}, model).grads
        lr = 1e-7 / abs(e).max()
        with torch.no_grad():
            for p in model.parameters():
                if id(p) in grads[0]:
                    p.sub_(lr * grads[0][id(p)])
        after = gl.g_effect(model, tok, "ga", forget=forget, targets=targets, per_token=False, pg=False)
    delta = (after.risk - ds.risk).isel(step=0).values
    assert (e[:8] < 0).all()  # GA raises every forget risk
    np.testing.assert_allclose(delta, -lr * e, rtol=0.01)


def test_gradient_checkpointing_and_an_untouched_model(tokenizer, tiny_sets):
    model = tiny_model("llama", len(tokenizer))
    args = dict(forget=tiny_sets["forget"], retain=tiny_sets["retain"], targets=tiny_sets["targets"])
    plain = gl.g_effect(model, tokenizer, "npo+gd", **args)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.gradient_checkpointing_enable()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    checkpointed = gl.g_effect(model, tokenizer, "npo+gd", **args)
    assert relative_error(checkpointed.g_effect, plain.g_effect) == 0.0
    assert relative_error(checkpointed.g_effect_token, plain.g_effect_token) == 0.0
    assert model.training and model.is_gradient_checkpointing
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad and torch.all(p.grad == 7.0) for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sdpa_attention_gives_the_same_numbers(arch, tokenizer, tiny_sets):
    eager = tiny_model(arch, len(tokenizer))
    sdpa = tiny_model(arch, len(tokenizer), attn_implementation="sdpa")
    a, _ = _both(eager, tokenizer, tiny_sets, "npo+gd")
    b, ref = _both(sdpa, tokenizer, tiny_sets, "npo+gd")
    assert relative_error(b.g_effect, ref.g_effect) <= 1e-9
    assert relative_error(b.g_effect, a.g_effect) <= 1e-6  # eager Llama softmaxes in float32, SDPA does not


def test_bfloat16_model_runs_and_agrees_roughly(target, world):
    """A bfloat16 model: contractions accumulate in float32; numbers agree with float32 to bf16 precision."""
    model, tok = target
    args = dict(forget=world["forget05"][:4],
                targets={"targeted": world["forget05"][:4], "non_targeted": world["retain_perturbed"][:4]})
    full = gl.g_effect(model, tok, "ga", **args)
    half = gl.g_effect(gl.zoo.load("target", dtype=torch.bfloat16)[0], tok, "ga", **args)
    assert half.attrs["model_dtype"] == "bfloat16" and half.g_effect.dtype == np.float64
    e_full = full.g_effect.sum(["layer", "term"]).values
    e_half = half.g_effect.sum(["layer", "term"]).values
    assert np.corrcoef(e_full.ravel(), e_half.ravel())[0, 1] > 0.95


@pytest.mark.parametrize("pg", [True, False])
def test_chunking_and_instance_order_change_nothing(pg, tokenizer, tiny_gpt2, tiny_sets):
    """The fast engine sorts rows by length within each chunked pass and puts them back: any chunk size and any
    order of the targets give each instance the same numbers (float64)."""
    sets = tiny_sets
    kw = dict(objective="npo", forget=sets["forget"], pg=pg)
    whole = gl.g_effect(tiny_gpt2, tokenizer, targets=sets["targets"], chunk_size=None, **kw)
    flipped = {k: v[::-1] for k, v in sets["targets"].items()}
    for chunk in (1, 2, 5):
        got = gl.g_effect(tiny_gpt2, tokenizer, targets=flipped, chunk_size=chunk, **kw).sel(instance=whole.instance)
        assert list(got.instance.values) == list(whole.instance.values)
        for var in ("g_effect", "g_effect_token", "risk"):
            assert relative_error(got[var].values, whole[var].values) <= 1e-12, (chunk, var)
        if pg:
            for var in ("pg_effect", "sample_effect"):
                assert relative_error(got[var].values, whole[var].values) <= 1e-12, (chunk, var)


class OffsetRMSNorm(torch.nn.Module):
    """A Gemma-style norm, ``x̂ · (1 + w)``: affine but not linear in its weight, so the engine must not take the
    norm shortcut (the layer evaluated with the direction as its weight) and falls back to a local jvp."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(0.1 * torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class Gate(torch.nn.Module):
    """Any other module with parameters: a learnable elementwise gate, tanh(a)·x."""

    def __init__(self, inner, d: int):
        super().__init__()
        self.inner, self.a = inner, torch.nn.Parameter(torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(self.a) * self.inner(x)


def test_norm_shortcut_and_the_jvp_fallback_are_both_exact(tokenizer, tiny_sets):
    torch.manual_seed(3)
    model = tiny_model("llama", len(tokenizer))
    d = model.config.hidden_size
    for layer in model.model.layers:
        layer.post_attention_layernorm = OffsetRMSNorm(d)
        layer.mlp = Gate(layer.mlp, d)
    fast, ref = _both(model, tokenizer, tiny_sets, "npo+gd", per_token=False)
    assert relative_error(fast.g_effect, ref.g_effect) <= 1e-9
    assert abs(fast.g_effect.sel(layer="layers.1")).max() > 0
    # which modules took which path
    from geffect_lab.engine.ghost import GhostPass

    direction = {id(p): torch.randn_like(p) for p in model.parameters()}
    ghost = GhostPass(model, gl.layer_groups(model), [direction])
    batch = gl.encode(tokenizer, tiny_sets["forget"])
    ghost.run(lambda: (model(input_ids=batch["input_ids"]).logits.sum((1, 2)), ()), len(tiny_sets["forget"]))
    kinds = {type(m).__name__: ghost._linear_norm[m] for m in model.modules() if m in ghost._linear_norm}
    assert kinds == {"LlamaRMSNorm": True, "OffsetRMSNorm": False, "Gate": False}
