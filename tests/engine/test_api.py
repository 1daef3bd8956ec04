"""gl.g_effect: the Dataset it returns and the errors people see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geffect_lab as gl
from geffect_lab.objectives import ObjectiveError


@pytest.fixture(scope="module")
def ds(tokenizer, tiny_llama, tiny_sets):
    return gl.g_effect(tiny_llama, tokenizer, "npo+gd", forget=tiny_sets["forget"], retain=tiny_sets["retain"],
                       targets=tiny_sets["targets"])


def test_dataset_names_dims_and_attrs(ds, tiny_sets):
    assert ds.g_effect.dims == ("step", "instance", "layer", "term")
    assert ds.g_effect_token.dims == ("step", "instance", "token")
    assert ds.pg_effect.dims == ("step", "sample", "against")
    assert ds.risk.dims == ("step", "instance") and ds.objective_loss.dims == ("step",)
    assert list(ds.step.values) == [0]
    assert list(ds.term.values) == ["forget", "gd"]
    assert list(ds.layer.values) == ["embed", "layers.0", "layers.1", "norm", "lm_head"]
    assert list(ds.layer_index.values) == [-1, 0, 1, 2, 3]
    assert list(ds.against.values) == ["targeted", "non_targeted"]
    assert list(ds.sample.values) == [e.id for e in tiny_sets["forget"]]
    targeted = [e.id for e in tiny_sets["targets"]["targeted"]]
    assert list(ds.instance.values[:3]) == targeted
    assert list(ds.split.values) == ["targeted"] * 3 + ["non_targeted"] * 3
    assert ds.question.values[0] == tiny_sets["targets"]["targeted"][0].question
    for name in ds.data_vars:
        assert ds[name].attrs["long_name"] and ds[name].attrs["description"], name
    assert ds.attrs["objective"] == "npo+gd" and ds.attrs["schema_version"] == 2
    assert ds.attrs["sign_convention"] == "dR ≈ -lr * g_effect; g_effect < 0 raises the risk"
    assert all(isinstance(v, (str, int, float)) for v in ds.attrs.values())


def test_token_texts_spell_the_answers(ds, tokenizer):
    for i in range(ds.sizes["instance"]):
        n = int(ds.token_count[i])
        text = "".join(ds.token_text.values[i, :n])
        assert text == " " + str(ds.answer.values[i]) + tokenizer.eos_token
        assert np.isfinite(ds.g_effect_token.values[0, i, :n]).all()
        assert np.isnan(ds.g_effect_token.values[0, i, n:]).all()


def test_npo_weight_is_one_without_a_reference(tokenizer, tiny_llama, tiny_sets, scratch_objectives):
    """reference=None: the model as given, so NPO's gradient is exactly the sequence-level GA gradient."""
    forget = tiny_sets["forget"]
    npo = gl.g_effect(tiny_llama, tokenizer, "npo", forget=forget, targets=tiny_sets["targets"], pg=False)
    lengths = gl.encode(tokenizer, forget)["labels"].ne(-100).sum(1).double()

    @gl.objective("test_seq_ga")
    def seq_ga(x):
        return -x.sum(x.nll)

    seq = gl.g_effect(tiny_llama, tokenizer, "test_seq_ga", forget=forget, targets=tiny_sets["targets"],
                      pg=False)
    np.testing.assert_allclose(npo.g_effect.values, seq.g_effect.values, rtol=1e-12)
    assert lengths.min() > 1


def test_a_reference_model_changes_npo(tokenizer, tiny_llama, tiny_sets):
    other = gl.testing.tiny_model("llama", len(tokenizer), seed=1)
    args = dict(forget=tiny_sets["forget"], targets=tiny_sets["targets"], pg=False, per_token=False)
    same = gl.g_effect(tiny_llama, tokenizer, "npo", **args)
    shifted = gl.g_effect(tiny_llama, tokenizer, "npo", reference=other, **args)
    assert not np.allclose(same.g_effect.values, shifted.g_effect.values)


def test_bad_objective_outputs_name_the_objective_and_instance(tokenizer, tiny_llama, tiny_sets, scratch_objectives):
    @gl.objective("test_bad_shape")
    def bad_shape(x):
        return x.logp.sum()

    @gl.objective("test_nan")
    def nan_loss(x):
        return x.mean(x.logp) * torch.tensor([float("nan")] + [1.0] * (x.n_samples - 1), dtype=x.logp.dtype)

    args = dict(forget=tiny_sets["forget"], targets=tiny_sets["targets"])
    with pytest.raises(ObjectiveError, match=r"'test_bad_shape' must return one loss per sample, shape \(3,\)"):
        gl.g_effect(tiny_llama, tokenizer, "test_bad_shape", **args)
    first = tiny_sets["forget"][0].id
    with pytest.raises(ObjectiveError, match=rf"'test_nan' returned a non-finite loss .*{first}"):
        gl.g_effect(tiny_llama, tokenizer, "test_nan", **args)


def test_empty_sets_and_missing_inputs(tokenizer, tiny_llama, tiny_sets):
    with pytest.raises(ObjectiveError, match="target set 'non_targeted' is empty"):
        gl.g_effect(tiny_llama, tokenizer, "ga", forget=tiny_sets["forget"],
                    targets={"targeted": tiny_sets["forget"], "non_targeted": []})
    with pytest.raises(ObjectiveError, match="forget set is empty"):
        gl.g_effect(tiny_llama, tokenizer, "ga", forget=[], targets=tiny_sets["targets"])
    with pytest.raises(ObjectiveError, match="gd need retain samples"):
        gl.g_effect(tiny_llama, tokenizer, "ga+gd", forget=tiny_sets["forget"], targets=tiny_sets["targets"])
    with pytest.raises(ObjectiveError, match="layer=7 is out of range"):
        gl.g_effect(tiny_llama, tokenizer, "rmu", params={"layer": 7}, forget=tiny_sets["forget"],
                    targets=tiny_sets["targets"])
    with pytest.raises(ValueError, match="unknown engine"):
        gl.g_effect(tiny_llama, tokenizer, "ga", forget=tiny_sets["forget"], targets=tiny_sets["targets"],
                    engine="turbo")


def test_zoo_model_in_float32(target, world):
    model, tok = target
    ds = gl.g_effect(model, tok, "npo", forget=world["forget05"][:4],
                     targets={"targeted": world["forget05"][:4], "non_targeted": world["retain_perturbed"][:4]})
    assert ds.attrs["model_dtype"] == "float32" and np.isfinite(ds.g_effect).all()
    e_u = float(ds.g_effect.sum(["layer", "term"]).where(ds.split == "targeted", drop=True).mean())
    assert e_u < 0  # NPO raises the forget risk
