"""Property-based tests (hypothesis) that search for inputs the boundary checks miss: any objective text and
parameters, any records, any run configuration either work (and then hold the documented ranges) or raise the
one documented error; any results Dataset survives a save/load round trip."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geffect_lab as gl
from geffect_lab.data import RecordError, check_records
from geffect_lab.objectives import ObjectiveError, resolve_objective
from geffect_lab.results import Axes, make_dataset

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])

NAMES = st.sampled_from(["ga", "wga", "npo", "simnpo", "tnpo", "wtnpo", "rmu", "gd", "kl", "rr", "po", "dpo",
                         "nope", "NPO", ""])
WEIGHTS = st.one_of(st.just(""), st.sampled_from(["0.5*", "2*", "1e999*", "-1*", "nan*", "x*", "0*"]))
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.booleans(), st.none(),
                   st.sampled_from(["0.1", "x", "", "nan", "-1", "True"]))
KEYS = st.sampled_from(["beta", "alpha", "delta", "c", "seed", "layer", "normalize", "gd.weight", "npo.beta",
                        "kl.weight", "gamma", "weight"])


@SETTINGS
@given(terms=st.lists(st.tuples(WEIGHTS, NAMES), min_size=1, max_size=3),
       params=st.dictionaries(KEYS, VALUES, max_size=3))
def test_any_objective_text_resolves_in_range_or_is_refused_by_name(terms, params):
    text = "+".join(w + n for w, n in terms)
    try:
        objective = resolve_objective(text, params)
    except ObjectiveError:
        return
    for term in objective.terms:
        assert math.isfinite(term.weight)
        for key, value in term.params.items():
            if isinstance(value, float):
                assert math.isfinite(value), (text, params)
            bound = term.spec.bounds.get(key)
            if bound is not None and value is not None:
                assert bound.contains(value), (text, params, key, value)


TEXT = st.one_of(st.none(), st.just(""), st.just("   "), st.integers(), st.text(min_size=1, max_size=20))


@SETTINGS
@given(records=st.lists(st.fixed_dictionaries({"id": st.sampled_from(["a", "b", "c", "d"]), "question": TEXT,
                                               "answer": TEXT}), min_size=1, max_size=4))
def test_any_records_pass_only_when_usable(records):
    try:
        check_records(records, "forget")
    except RecordError:
        return
    assert len({r["id"] for r in records}) == len(records)
    assert all(isinstance(r[f], str) and r[f].strip() for r in records for f in ("question", "answer"))


NUMBERS = st.one_of(st.integers(-3, 50), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans())


@SETTINGS
@given(steps=NUMBERS, epochs=NUMBERS, batch_size=NUMBERS, lr=NUMBERS, warmup=NUMBERS, weight_decay=NUMBERS,
       record_every=NUMBERS, eval_every=NUMBERS, chunk_size=st.one_of(NUMBERS, st.just("auto")))
def test_any_run_configuration_is_valid_or_refused(steps, epochs, batch_size, lr, warmup, weight_decay,
                                                   record_every, eval_every, chunk_size):
    try:
        config = gl.RunConfig(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup,
                              weight_decay=weight_decay, record_every=record_every, eval_every=eval_every,
                              chunk_size=chunk_size)
    except (ValueError, TypeError) as err:
        assert isinstance(err, ValueError), err  # never a TypeError from deep inside
        return
    assert config.batch_size >= 1 and config.record_every >= 1 and config.warmup >= 0
    assert math.isfinite(config.lr) and config.lr > 0 and math.isfinite(config.weight_decay)
    assert config.n_steps(10) >= 1
    assert gl.RunConfig.from_json(config.to_json()) == config


@FEW
@given(data=st.data())
def test_any_results_dataset_survives_save_and_load(data, tmp_path_factory):
    n_inst, n_layers, n_terms = (data.draw(st.integers(1, 4)) for _ in range(3))
    n_steps, width = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
    text = st.text(st.characters(blacklist_characters="\x00"), max_size=6)  # NUL: see the test below

    def array(*shape):
        return np.array(data.draw(st.lists(floats, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                        dtype=np.float64).reshape(shape)

    ids = data.draw(st.lists(st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=5),
                             min_size=n_inst, max_size=n_inst, unique=True))
    axes = Axes(instance_ids=ids, splits=data.draw(st.lists(st.sampled_from(["targeted", "non_targeted"]),
                                                            min_size=n_inst, max_size=n_inst)),
                questions=data.draw(st.lists(text, min_size=n_inst, max_size=n_inst)),
                answers=data.draw(st.lists(text, min_size=n_inst, max_size=n_inst)),
                layer_names=[f"layers.{i}" for i in range(n_layers)], layer_index=list(range(n_layers)),
                term_names=[f"t{i}" for i in range(n_terms)], sample_ids=["s0"], against=["targeted"],
                token_texts=[data.draw(st.lists(text, max_size=width)) for _ in range(n_inst)], token_width=width)
    values = {"g_effect": array(n_steps, n_inst, n_layers, n_terms), "risk": array(n_steps, n_inst),
              "g_effect_token": array(n_steps, n_inst, width), "objective_loss": array(n_steps),
              "generated_text": np.array(data.draw(st.lists(text, min_size=n_steps * n_inst,
                                                            max_size=n_steps * n_inst)),
                                         dtype=object).reshape(n_steps, n_inst)}
    ds = make_dataset(axes, list(range(n_steps)), values, np.arange(n_inst), {"objective": data.draw(text)})
    path = tmp_path_factory.mktemp("roundtrip") / "ds.nc"
    gl.save(ds, path)
    back = gl.load(path)
    xr.testing.assert_equal(back, ds)
    assert back.attrs == ds.attrs


def test_a_nul_in_generated_text_is_stored_as_the_replacement_character(tmp_path):
    axes = Axes(instance_ids=["i0"], splits=["targeted"], questions=["q"], answers=["a"], layer_names=["embed"],
                layer_index=[-1], term_names=["forget"], sample_ids=["s0"], against=["targeted"],
                token_texts=[["a"]], token_width=1)
    ds = make_dataset(axes, [0], {"risk": np.ones((1, 1)),
                                  "generated_text": np.array([["bad\x00text"]], dtype=object)}, np.ones(1))
    gl.save(ds, tmp_path / "nul.nc")
    assert gl.load(tmp_path / "nul.nc").generated_text.item() == "bad\ufffdtext"
