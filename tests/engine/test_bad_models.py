"""Mismatches between a model and its data, or a model the engine cannot handle: one clear error before any
computation, naming the token id, the instance, the module or the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import geffect_lab as gl
from geffect_lab.engine.core import EngineCheckError
from geffect_lab.engine.ghost import UnsupportedModuleError
from geffect_lab.engine.groups import ModelStructureError
from geffect_lab.objectives import ObjectiveError
from geffect_lab.testing import tiny_model


@pytest.fixture(scope="module")
def few(world):
    return dict(forget=world["forget01"][:2], targets={"targeted": world["forget01"][2:4]})


def test_a_tokenizer_larger_than_the_embedding_names_the_token_and_instance(tokenizer, few):
    small = tiny_model("llama", vocab_size=40)
    with pytest.raises(ObjectiveError, match=r"instance 'forget01/.*' holds token id \d+, beyond the model's "
                                             r"embedding of 40 rows"):
        gl.g_effect(small, tokenizer, "ga", **few)


def test_an_answer_longer_than_the_positions_names_the_instance(tokenizer, few):
    model = tiny_model("gpt2", len(tokenizer))
    model.config.n_positions = 8
    with pytest.raises(ObjectiveError, match=r"instance 'forget01/.*' is \d+ tokens long .* more than the model's "
                                             r"8 positions"):
        gl.g_effect(model, tokenizer, "ga", **few)
    with pytest.raises(ObjectiveError, match="8 positions"):
        gl.unlearn(model, tokenizer, "ga", forget=few["forget"], eval=few["targets"], steps=1, progress=False)


def test_a_device_that_does_not_exist_is_named():
    with pytest.raises(ValueError, match=r"device='cuda:7' does not exist here"):
        gl.zoo.load("target", device="cuda:7")
    with pytest.raises(ValueError, match="device='gpu0' is not a device name"):
        gl.zoo.load("target", device="gpu0")


def test_a_model_without_decoder_blocks_is_refused_by_name(tokenizer, few):
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(len(tokenizer), 8)

        def get_input_embeddings(self):
            return self.emb

    with pytest.raises(ModelStructureError, match="Flat has no ModuleList of decoder blocks"):
        gl.g_effect(Flat(), tokenizer, "ga", **few)


class _Abs(nn.Module):
    """A norm-like layer whose output is positively homogeneous in its weight but not linear: y = |w| · x."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1, 1, d, dtype=torch.float64))

    def forward(self, x):
        return self.weight.abs() * x


class _PositionsFirst(nn.Module):
    """Scales by its own parameter and returns [positions, rows, d]: its rows cannot be attributed."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return self.scale * x.transpose(0, 1)


class _Around(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.swap = inner, _PositionsFirst()

    def forward(self, x):
        return self.swap(self.inner(x)).transpose(0, 1)


def test_a_module_it_cannot_attribute_is_refused_by_name(tokenizer, few):
    model = tiny_model("llama", len(tokenizer))
    model.model.layers[0].mlp = _Around(model.model.layers[0].mlp)
    with pytest.raises(UnsupportedModuleError, match=r"'model.layers.0.mlp.swap' \(_PositionsFirst\) returned an "
                                                     r"output of shape \(\d+, 2, 32\) for a batch of 2 rows"):
        gl.g_effect(model, tokenizer, "ga", **few)


def test_a_wrong_fast_path_is_caught_by_the_built_in_check(tokenizer, few, monkeypatch):
    """If a fast path were wrong for some module (simulated: the embedding's tangent doubled), the first
    measurement's check against one plain backward raises, naming the layer and its module types."""
    from geffect_lab.engine import ghost

    fast = ghost.FAST_TANGENTS[nn.Embedding]
    monkeypatch.setitem(ghost.FAST_TANGENTS, nn.Embedding,
                        fast._replace(tangent=lambda *a: 2 * fast.tangent(*a)))
    model = tiny_model("llama", len(tokenizer))
    with pytest.raises(EngineCheckError, match=r"layer 'embed' .* module types in that layer: Embedding"):
        gl.g_effect(model, tokenizer, "ga", **few)
    ds = gl.g_effect(model, tokenizer, "ga", verify="never", **few)  # the check is what stood in the way
    assert ds.g_effect.sel(layer="embed").any()
    with pytest.raises(ValueError, match="verify='sometimes' is not valid"):
        gl.g_effect(model, tokenizer, "ga", verify="sometimes", **few)


def test_a_homogeneous_but_nonlinear_norm_takes_the_exact_path(tokenizer, few):
    """y = |w|·x passes y(0) = 0 and y(2G) = 2·y(G) but is not linear: named like a norm, it must still fail
    the additivity check and be evaluated by forward mode, agreeing with the oracle."""

    class AbsRMSNorm(_Abs):
        pass

    model = tiny_model("llama", len(tokenizer))
    model.model.layers[0].post_attention_layernorm = AbsRMSNorm(model.config.hidden_size)
    args = dict(per_token=False, pg=False, **few)
    fast = gl.g_effect(model, tokenizer, "ga", **args)
    ref = gl.g_effect(model, tokenizer, "ga", engine="reference", **args)
    assert gl.testing.relative_error(fast.g_effect, ref.g_effect) <= 1e-9


# ------------------------------------------------------------------------------------------ the cheap check
@pytest.fixture(scope="module")
def many(world):
    """More targets than the check's rows (core.CHECK_ROWS), of varied lengths: the check runs over a subset."""
    return dict(forget=world["forget01"][:2], targets={"targeted": world["forget01"][2:10],
                                                       "non_targeted": world["retain_perturbed"][:8]})


def test_the_check_runs_over_the_shortest_the_longest_and_two_drawn_rows():
    from geffect_lab.engine.core import CHECK_ROWS, check_rows

    lengths = torch.tensor([7, 3, 9, 5, 12, 4, 8, 6, 10, 11])
    rows = check_rows(lengths)
    assert len(rows) == CHECK_ROWS == 4 and {1, 4} <= set(rows.tolist())  # lengths 3 and 12
    assert np.array_equal(rows, check_rows(lengths)) and np.array_equal(check_rows(lengths[:3]), [0, 1, 2])
    assert np.array_equal(check_rows(lengths, dtype=torch.bfloat16), np.arange(10))  # half precision: all rows


def _refused(model, tokenizer, many, layer: str):
    with pytest.raises(EngineCheckError, match=rf"layer '{layer}'"):
        gl.g_effect(model, tokenizer, "npo+gd", retain=many["forget"], **many)


def test_the_cheap_check_refuses_a_scaled_embedding_taken_for_a_plain_one(tokenizer, many, monkeypatch):
    """Gemma multiplies its embedding by √d in a subclass of nn.Embedding: given the plain embedding's formula
    (the defect the exact-type rule fixed), the G-effect on the embedding is √d times too small, and refused."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    from geffect_lab.engine import ghost
    from geffect_lab.testing import tiny_causal_lm

    model = tiny_causal_lm("gemma", len(tokenizer))
    monkeypatch.setitem(ghost.FAST_TANGENTS, GemmaTextScaledWordEmbedding, ghost.FAST_TANGENTS[nn.Embedding])
    _refused(model, tokenizer, many, "embed")


def test_the_cheap_check_refuses_hooks_lost_to_an_in_place_update(tokenizer, many, monkeypatch):
    """Falcon adds the attention output to the MLP output in place: a hook on the output itself (the defect the
    copy in ghost.hookable fixed) never fires, and a block's G-effect goes missing, which is refused."""
    from geffect_lab.engine import ghost
    from geffect_lab.testing import tiny_causal_lm

    model = tiny_causal_lm("falcon", len(tokenizer))
    monkeypatch.setattr(ghost, "hookable", lambda output: output)
    with pytest.raises(EngineCheckError, match=r"layer 'layers\.\d+' .* FalconLinear"):
        gl.g_effect(model, tokenizer, "npo+gd", retain=many["forget"], **many)


def test_the_cheap_check_refuses_a_wrong_closed_formula_for_a_new_module_type(tokenizer, many, monkeypatch):
    """A module type without a closed formula takes forward mode; given a wrong one (y = |w|·x taken as linear in
    w), its layer's G-effect is wrong, and refused."""
    from geffect_lab.engine import ghost

    class Gate(_Abs):
        pass

    model = tiny_model("llama", len(tokenizer))
    model.model.layers[1].mlp = nn.Sequential(model.model.layers[1].mlp, Gate(model.config.hidden_size))
    args = dict(retain=many["forget"], per_token=False, pg=False, **many)
    fast, ref = gl.g_effect(model, tokenizer, "npo+gd", **args), gl.g_effect(model, tokenizer, "npo+gd",
                                                                           engine="reference", **args)
    assert gl.testing.relative_error(fast.g_effect, ref.g_effect) <= 1e-9  # the exact path, as it is
    monkeypatch.setitem(ghost.FAST_TANGENTS, Gate,
                        ghost.FastTangent(frozenset({"weight"}), lambda m, g, a, k: g["weight"] * a[0], ghost._always))
    _refused(model, tokenizer, many, "layers.1")
