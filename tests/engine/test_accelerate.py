"""Models spread by accelerate give the same numbers as the model in one piece: hooks that move inputs and
outputs between devices, and offload (CPU or disk), which keeps the weights off the model between calls and
swaps new tensors in at each call."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, disk_offload
from accelerate.hooks import attach_align_device_hook

import geffect_lab as gl
from geffect_lab.engine.groups import ModelStructureError
from geffect_lab.engine.offload import is_offloaded
from geffect_lab.testing import assert_effects_close


@pytest.fixture(scope="module")
def sets(world):
    return dict(forget=world["forget01"][:2], retain=world["retain_perturbed"][:2],
                targets={"targeted": world["forget01"][2:4], "non_targeted": world["retain_perturbed"][2:4]})


def test_device_hooks_give_the_numbers_of_the_model_in_one_piece(target, sets):
    model, tok = target
    whole = gl.g_effect(model, tok, "npo+gd", **sets)
    spread = copy.deepcopy(model)
    attach_align_device_hook(spread, execution_device="cpu", offload=False)  # what device_map dispatch adds
    assert sum(hasattr(m, "_hf_hook") for m in spread.modules()) > 10
    hooked = gl.g_effect(spread, tok, "npo+gd", **sets)
    for name in ("g_effect", "g_effect_token", "pg_effect", "risk"):
        assert_effects_close(hooked[name], whole[name], 1e-12, name)


NAMES = ("g_effect", "g_effect_token", "pg_effect", "risk", "objective_loss")


def _offloaded_copy(model, how, tmp_path):
    out = copy.deepcopy(model)
    if how == "cpu":
        cpu_offload(out, execution_device="cpu")
    else:
        disk_offload(out, offload_dir=str(tmp_path / "offload"), execution_device="cpu")
    assert next(out.parameters()).device.type == "meta" and is_offloaded(out)
    return out


@pytest.mark.parametrize("how", ["cpu", "disk"])
def test_offload_gives_the_numbers_of_the_model_in_one_piece(target, sets, how, tmp_path):
    model, tok = target
    whole = gl.g_effect(model, tok, "npo+gd", **sets)
    offloaded = _offloaded_copy(model, how, tmp_path)
    got = gl.g_effect(offloaded, tok, "npo+gd", **sets)
    for name in NAMES:
        assert_effects_close(got[name], whole[name], 1e-12, name)
    # afterwards the model is offloaded as before, and still computes what it did
    assert next(offloaded.parameters()).device.type == "meta" and is_offloaded(offloaded)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["cpu", "disk"])
def test_offloaded_tied_embeddings_are_one_parameter(tiny_gpt2, tokenizer, tiny_sets, how, tmp_path):
    """GPT-2 ties its output head to the token embedding. Offload loads the two names as separate tensors;
    measured apart, their gradients would be split and the embed/lm_head G-effects wrong."""
    model = tiny_gpt2
    assert model.lm_head.weight is model.transformer.wte.weight
    whole = gl.g_effect(model, tokenizer, "npo+gd", **tiny_sets)
    got = gl.g_effect(_offloaded_copy(model, how, tmp_path), tokenizer, "npo+gd", **tiny_sets)
    assert float(abs(whole.g_effect.sel(layer="embed")).max()) > 0
    for name in NAMES:
        assert_effects_close(got[name], whole[name], 1e-10, name)


def test_offloaded_model_with_the_reference_engine(target, sets, tmp_path):
    model, tok = target
    whole = gl.g_effect(model, tok, "ga", engine="reference", per_token=False, **sets)
    got = gl.g_effect(_offloaded_copy(model, "cpu", tmp_path), tok, "ga", engine="reference", per_token=False, **sets)
    assert_effects_close(got.g_effect, whole.g_effect, 1e-12, "g_effect")


def test_weights_never_loaded_are_refused_by_name(target, sets):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    model, tok = target
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model.config)
    with pytest.raises(ModelStructureError, match=r"parameter 'model.embed_tokens.weight' of LlamaForCausalLM is on "
                                                  r"the meta device and no accelerate offload hook"):
        gl.g_effect(empty, tok, "ga", **sets)


def test_unlearn_refuses_an_offloaded_model_by_name(target, tmp_path):
    model, tok = target
    with pytest.raises(ModelStructureError, match="offload"):
        gl.unlearn(_offloaded_copy(model, "cpu", tmp_path), tok, "ga", forget="forget01", steps=1)


def test_a_device_map_with_disk_offloaded_blocks(target, sets, tmp_path):
    """What ``from_pretrained(device_map=..., offload_folder=...)`` builds: some modules resident, the blocks
    offloaded to disk (a tied or untied head, and buffers, stay where the map says)."""
    from accelerate import dispatch_model

    model, tok = target
    whole = gl.g_effect(model, tok, "npo+gd", **sets)
    spread = copy.deepcopy(model)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatch_model(spread, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert spread.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    assert spread.model.embed_tokens.weight.device.type == "cpu"
    got = gl.g_effect(spread, tok, "npo+gd", **sets)
    for name in NAMES:
        assert_effects_close(got[name], whole[name], 1e-12, name)
