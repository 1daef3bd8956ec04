"""The schema is executable: every producer's Dataset passes ``validate``, and ``validate`` names what does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import geffect_lab as gl
from geffect_lab.schema import COORDS, DIMS, VARIABLES, SchemaError, validate


@pytest.fixture(scope="module")
def measured(target, world):
    model, tok = target
    return gl.g_effect(model, tok, "npo+gd", forget=world["forget01"][:3], retain=world["retain_perturbed"][:3],
                       targets={"targeted": world["forget01"][3:5], "non_targeted": world["retain_perturbed"][5:7]})


def test_the_schema_declares_every_variable_fully():
    for name, var in VARIABLES.items():
        assert set(var.dims) <= set(DIMS), name
        assert var.long_name and var.description and var.kind in ("float", "int", "text"), name
    for name, dims in COORDS.items():
        assert set(dims) <= set(DIMS), name


def test_the_producers_datasets_validate(measured, short_runs, tmp_path):
    assert validate(measured) is measured
    runs, folder = short_runs
    for ds in runs.values():
        validate(ds)
        assert {"probability", "forget_quality", "g_effect"} <= set(ds.data_vars)
    validate(gl.combine(runs))
    gl.save(measured, tmp_path / "m.nc")
    validate(gl.load(tmp_path / "m.nc"))
    for name, var in VARIABLES.items():
        if name in measured:
            assert measured[name].attrs["units"] == var.units and measured[name].dims == var.dims


def test_validate_names_what_does_not_fit(measured):
    cases = [
        (measured.assign(extra=measured.risk * 2), r"variable 'extra' is not in the schema"),
        (measured.assign(risk=measured.risk.transpose("instance", "step")), r"variable 'risk' has dims \('instance', "
                                                                             r"'step'\)"),
        (measured.assign(risk=(measured.risk.dims, measured.risk.values)), r"'risk' has no long_name/units"),
        (measured.assign_attrs(schema_version=1), r"schema_version attribute is 1, expected 2"),
        (measured.assign_attrs(sign_convention="dR = +lr * g"), r"sign_convention attribute"),
        (measured.assign_coords(split=("layer", np.array(["x"] * measured.sizes["layer"], dtype=object))),
         r"coordinate 'split' has dims \('layer',\)"),
        (measured.assign_coords(instance=[str(measured.instance.values[0])] * measured.sizes["instance"]),
         r"instance ids repeat"),
    ]
    for bad, message in cases:
        with pytest.raises(SchemaError, match=message):
            validate(bad, where="a test")
    with pytest.raises(SchemaError, match=r"'generated_text' is float64, the schema's kind is text \(mine\)"):
        validate(xr.Dataset({"generated_text": ("instance", np.zeros(2))},
                            attrs={"schema_version": 2}).pipe(gl.schema.annotate), where="mine")


def test_attribution_prompt_positions_have_their_own_dim(target, world):
    model, tok = target
    da = gl.attribution.tokens(model, tok, world["forget01"][:2], methods=("feature_ablation",))
    assert da.dims == ("instance", "prompt_token", "method") and "prompt_token_text" in da.coords
    assert "token" not in da.dims  # DESIGN's token is an answer token
    validate(da)
