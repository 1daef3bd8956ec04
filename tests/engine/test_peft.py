"""LoRA adapters from peft: G-effects over the trainable parameters only, named by the block they sit in, held to
the oracle, and usable by g_effect, unlearn and the recorder."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import geffect_lab as gl
from geffect_lab.engine.core import NoGradientWarning
from geffect_lab.testing import assert_effects_close

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora(target):
    model, tok = target
    base = copy.deepcopy(model).to(torch.float64)
    # init_lora_weights=False: random A and B, so that both carry a gradient (B = 0 would zero A's)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
    torch.manual_seed(0)
    return peft.get_peft_model(base, config), tok


@pytest.fixture(scope="module")
def sets(world):
    return dict(forget=world["forget01"][:2] + world["world_facts"][:1], retain=world["retain_perturbed"][:2],
                targets={"targeted": world["forget01"][2:4], "non_targeted": world["retain_perturbed"][10:12]})


def test_lora_matches_the_oracle_over_the_adapters_only(lora, sets):
    model, tok = lora
    args = dict(forget=sets["forget"], retain=sets["retain"], targets=sets["targets"], chunk_size=4)
    fast = gl.g_effect(model, tok, "npo+gd", **args)
    ref = gl.g_effect(model, tok, "npo+gd", engine="reference", **args)
    assert_effects_close(fast.g_effect, ref.g_effect, 1e-9, "g_effect")
    assert_effects_close(fast.pg_effect, ref.pg_effect, 1e-9, "pg_effect")
    assert_effects_close(fast.g_effect_token, ref.g_effect_token, 1e-6, "g_effect_token")
    # adapters are named by their block; the frozen embedding, final norm and head contribute nothing
    assert list(fast.layer.values) == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "lm_head"]
    per_layer = abs(fast.g_effect).sum(["step", "instance", "term"])
    assert float(per_layer.sel(layer=["embed", "norm", "lm_head"]).sum()) == 0.0
    assert (per_layer.sel(layer=[f"layers.{i}" for i in range(4)]) > 0).all()
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert fast.attrs["trainable_parameters"] == n_lora < fast.attrs["model_parameters"]


def test_unlearn_and_the_recorder_on_a_lora_model(lora, sets):
    model, tok = lora
    run = gl.unlearn(model, tok, "ga", forget=sets["forget"], eval=sets["targets"], steps=2, batch_size=3,
                     lr=1e-3, optimizer="sgd", progress=False)
    # under SGD the optimiser's step is the gradient: the update effect over the adapters is the G-effect
    assert_effects_close(run.update_effect.isel(step=0), run.g_effect.isel(step=0).sum("term"), 1e-9)
    assert abs(run.update_effect.isel(step=0).sel(layer="layers.0")).sum() > 0
    rec = gl.GEffectRecorder(tok, "ga", forget=sets["forget"], targets=sets["targets"])
    ds = rec.record(model, 0)
    expected = gl.g_effect(model, tok, "ga", forget=sets["forget"], targets=sets["targets"])
    assert_effects_close(ds.g_effect, expected.g_effect, 1e-12)


def test_adapters_the_objective_never_reaches_are_named_in_a_warning(lora, sets):
    model, tok = lora
    with pytest.warns(NoGradientWarning, match="layers.3"):
        gl.g_effect(model, tok, "rmu", params={"layer": 1}, forget=sets["forget"], targets=sets["targets"],
                    per_token=False, pg=False)
