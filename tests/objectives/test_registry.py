"""The registry: names, signatures, composites, user objectives and the errors people see."""

from __future__ import annotations

import pytest
import torch

import geffect_lab as gl
from geffect_lab.objectives import Objective, ObjectiveError, Term, resolve_objective

BUILTINS = ["ga", "wga", "npo", "simnpo", "tnpo", "wtnpo", "po", "dpo", "rmu"]
REGULARISERS = ["gd", "kl", "rr"]


def test_every_builtin_is_registered_with_its_role():
    names = gl.list_objectives()
    assert set(BUILTINS + REGULARISERS) <= set(names)
    assert set(gl.list_objectives("retain")) >= set(REGULARISERS)
    assert not set(gl.list_objectives("forget")) & set(REGULARISERS)


def test_parameters_and_defaults_come_from_the_signature():
    assert gl.get_objective("npo").defaults == {"beta": 0.1}
    assert gl.get_objective("simnpo").defaults == {"beta": 2.5, "delta": 0.0, "delta_inside": False}
    assert gl.get_objective("wtnpo").defaults == {"alpha": 1.5, "beta": 1.0, "pooled": False}
    assert gl.get_objective("rmu").defaults == {"layer": None, "c": 5.0, "seed": 0, "normalize": False,
                                                "positions": "answer", "pooled": False}
    assert gl.get_objective("po").defaults == {"refusal": "fixed", "refusal_seed": 0, "pooled": False}
    assert gl.get_objective("ga").defaults == {}
    assert gl.get_objective("npo").needs == {"ref_logp"}
    assert gl.get_objective("dpo").needs == {"ref_logp", "alt", "ref_alt_logp"}


def test_unknown_objective_lists_the_names():
    with pytest.raises(ObjectiveError, match=r"unknown objective 'nop'.*npo.*rmu"):
        gl.get_objective("nop")


def test_composites_from_strings_and_objects():
    obj = resolve_objective("npo+0.5*gd", {"beta": 0.2})
    assert obj.name == "npo+0.5*gd" and obj.term_names == ["forget", "gd"]
    assert obj.terms[0].params == {"beta": 0.2} and obj.terms[1].weight == 0.5
    built = gl.objectives.npo(beta=0.2) + 0.5 * gl.objectives.gd()
    assert isinstance(built, Objective) and built.name == obj.name and built.params() == obj.params()
    assert resolve_objective("npo+kl", {"kl.weight": 2.0}).terms[1].weight == 2.0
    assert resolve_objective(gl.objectives.ga()).name == "ga"
    assert sum([gl.objectives.ga(), gl.objectives.gd()]).name == "ga+gd"


def test_bad_parameters_name_the_valid_ones():
    with pytest.raises(ObjectiveError, match=r"has no parameter 'gamma'.*beta=0.1"):
        resolve_objective("npo", {"gamma": 1})
    with pytest.raises(ObjectiveError, match=r"'beta' must be float"):
        resolve_objective("npo", {"beta": "high"})
    with pytest.raises(ObjectiveError, match="ambiguous"):
        resolve_objective("rmu+rr", {"layer": 1})
    with pytest.raises(ObjectiveError, match="exactly one forget term"):
        resolve_objective("gd+kl")
    with pytest.raises(ObjectiveError, match="exactly one forget term"):
        resolve_objective("ga+npo")
    assert resolve_objective("npo", {"beta": "0.3"}).terms[0].params["beta"] == 0.3  # CLI strings convert
    assert resolve_objective("rmu", {"normalize": "true", "layer": "1"}).terms[0].params == {
        "layer": 1, "c": 5.0, "seed": 0, "normalize": True, "positions": "answer", "pooled": False}


def test_a_user_objective_is_indistinguishable_from_a_builtin(scratch_objectives):
    @gl.objective("test_damped_ga", needs=("ref_logp",))
    def damped(x, gamma: float = 0.5):
        """GA damped by the reference's confidence."""
        return -x.mean(x.nll * torch.exp(gamma * x.ref_logp))

    assert "test_damped_ga" in gl.list_objectives()
    spec = gl.get_objective("test_damped_ga")
    assert spec.defaults == {"gamma": 0.5} and spec.description.startswith("GA damped")
    term = damped(gamma=0.1)
    assert isinstance(term, Term) and term.params == {"gamma": 0.1}
    assert resolve_objective("test_damped_ga+gd").term_names == ["forget", "gd"]


def test_registration_errors():
    with pytest.raises(ObjectiveError, match="unknown inputs"):
        gl.objective("bad_needs", needs=("logits",))
    with pytest.raises(ObjectiveError, match="'layer' parameter"):
        gl.objective("no_layer", needs=("hidden",))(lambda x: x.hidden.sum())
    with pytest.raises(ObjectiveError, match="role"):
        gl.objective("bad_role", role="both")


def test_a_registered_name_is_replaced_only_with_overwrite(scratch_objectives):
    @gl.objective("test_twice")
    def first(x):
        return -x.mean(x.nll)

    with pytest.raises(ObjectiveError, match="objective 'test_twice' is already registered: pass overwrite=True"):
        @gl.objective("test_twice")
        def again(x):
            return x.mean(x.nll)

    with pytest.raises(ObjectiveError, match="objective 'npo' is a built-in: pass overwrite=True"):
        gl.objective("npo")(lambda x: x.mean(x.nll))
    assert gl.get_objective("test_twice").fn is first.fn

    @gl.objective("test_twice", overwrite=True)
    def replaced(x, scale: float = 2.0):
        return -scale * x.mean(x.nll)

    assert gl.get_objective("test_twice").defaults == {"scale": 2.0}
    assert gl.objectives.remove_objective("test_twice").fn is replaced.fn
    assert "test_twice" not in gl.list_objectives()
    with pytest.raises(ObjectiveError, match="unknown objective 'test_twice'"):
        gl.objectives.remove_objective("test_twice")
