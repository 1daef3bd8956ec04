"""Models spread by accelerate: hooks that move inputs and outputs between devices give the same numbers as the
model in one piece; offload, which keeps weights off the model between calls, is refused by name."""

from __future__ import annotations

import copy

import pytest
from accelerate import cpu_offload
from accelerate.hooks import attach_align_device_hook

import geffect_lab as gl
from geffect_lab.engine.groups import ModelStructureError
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


def test_cpu_offload_is_refused_by_name(target, sets):
    model, tok = target
    offloaded = copy.deepcopy(model)
    cpu_offload(offloaded, execution_device="cpu")
    with pytest.raises(ModelStructureError, match=r"parameter 'model.embed_tokens.weight' of LlamaForCausalLM is on "
                                                  r"the meta device \(accelerate's CPU or disk offload"):
        gl.g_effect(offloaded, tok, "ga", **sets)
