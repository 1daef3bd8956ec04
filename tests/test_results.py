"""The results contract: save/load, combine, the ds.geffect accessor and summaries."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import geffect_lab as gl
from geffect_lab.results import SchemaError, summarize


@pytest.fixture(scope="module")
def runs(target, world):
    model, tok = target
    ev = {"targeted": world["forget05"][:5], "non_targeted": world["retain_perturbed"][:5]}
    return {name: gl.unlearn(model, tok, name, world=world, eval=ev, steps=3, batch_size=8, progress=False)
            for name in ("ga", "npo+gd")}


def test_save_and_load_round_trip_exactly(runs, tmp_path):
    ds = runs["npo+gd"]
    path = gl.save(ds, tmp_path / "run.nc")
    again = gl.load(path)
    assert again.identical(ds)
    assert list(again.token_text.values[0, :3]) == list(ds.token_text.values[0, :3])
    assert again.attrs["config"] == ds.attrs["config"] and again.g_effect.attrs["long_name"] == "G-effect"
    assert np.isnan(again.g_effect.isel(step=-1)).all()


def test_another_schema_version_is_refused(runs, tmp_path):
    old = runs["ga"].copy()
    old.attrs["schema_version"] = 0
    old.to_netcdf(tmp_path / "old.nc", engine="h5netcdf")
    with pytest.raises(SchemaError, match="schema version 0.*reads schema versions 1 and 2"):
        gl.load(tmp_path / "old.nc")
    xr.Dataset({"x": ("a", [1.0])}).to_netcdf(tmp_path / "other.nc", engine="h5netcdf")
    with pytest.raises(SchemaError, match="not a geffect-lab results file"):
        gl.load(tmp_path / "other.nc")
    with pytest.raises(FileNotFoundError):
        gl.load(tmp_path / "missing.nc")


def _as_version_1(ds: xr.Dataset, weight: float = 1.0) -> xr.Dataset:
    """``ds`` as schema version 1 wrote it: ``pg_effect`` was <grad R(D), grad l_j> (unweighted, not divided by the
    step's number of forget samples), ``extraction_strength_similar`` the ROUGE-L rule, no sample_token_count."""
    old = ds.drop_vars(["pg_effect", "sample_effect", "sample_token_count"])
    n = np.isfinite(ds.sample_effect).sum("sample")
    old["pg_effect"] = ds.sample_effect * n / weight
    old["extraction_strength_similar"] = ds.risk * 0 + 0.25
    old.attrs["schema_version"] = 1
    return old


def test_a_version_1_file_loads_under_the_new_names(runs, target, world, tmp_path):
    model, tok = target
    weighted = gl.g_effect(model, tok, "0.5*npo+gd", forget=world["forget05"][:3], retain=world["retain_perturbed"][:3],
                           targets={"targeted": world["forget05"][3:5], "non_targeted": world["retain_perturbed"][5:7]})
    for ds, weight in ((runs["npo+gd"], 1.0), (weighted, 0.5)):
        # a run measures each step's batch only: the other samples are NaN there, and n counts the batch
        assert np.isnan(ds.sample_effect).any() == ("learning_rate" in ds)
        _as_version_1(ds, weight).to_netcdf(tmp_path / "v1.nc", engine="h5netcdf")
        with pytest.warns(gl.schema.SchemaUpgradeWarning, match=r"schema version 1; its 'pg_effect' is each forget "
                          r"sample's share .* renamed 'sample_effect'.*no paper PG-effect.*'extraction_strength_"
                          r"similar' \(the ROUGE-L rule\) has been renamed 'extraction_strength_similar_rouge'"):
            again = gl.load(tmp_path / "v1.nc")
        assert "pg_effect" not in again and again.attrs["schema_version"] == 2
        assert again.attrs["schema_upgraded_from"] == 1
        np.testing.assert_allclose(again.sample_effect, ds.sample_effect, rtol=1e-12)
        assert (again.extraction_strength_similar_rouge.dropna("step") == 0.25).all()
        assert "extraction_strength_similar" not in again
        with pytest.raises(KeyError, match="this file, of results schema version 1, holds sample_effect only"):
            gl.plots.pg_scatter(again)


def test_combine_along_objective(runs):
    both = gl.combine([runs["ga"], runs["npo+gd"]])
    assert list(both.objective.values) == ["ga", "npo+gd"]
    assert both.g_effect.dims == ("objective", "step", "instance", "layer", "term")
    assert list(both.term.values) == ["forget", "gd"]
    assert np.isnan(both.g_effect.sel(objective="ga", term="gd")).all()  # GA has no gd term
    np.testing.assert_array_equal(both.risk.sel(objective="ga").values, runs["ga"].risk.values)
    assert "objective_attrs" in both.attrs and both.attrs["schema_version"] == 2
    named = gl.combine({"a": runs["ga"], "b": runs["ga"]}, dim="run")
    assert list(named.run.values) == ["a", "b"]


def test_combine_refuses_runs_on_different_instances(runs, target, world):
    model, tok = target
    other = gl.unlearn(model, tok, "ga", world=world, steps=3, batch_size=8, record=("g_effect",),
                       eval={"targeted": world["forget05"][5:10], "non_targeted": world["retain_perturbed"][:5]},
                       progress=False)
    with pytest.raises(ValueError, match=r"'instance' coordinates differ \(e.g. forget05/a95/q0"):
        gl.combine([runs["ga"], other])


def test_accessor_views(runs):
    ds = runs["npo+gd"]
    total = ds.geffect.total()
    assert total.dims == ("step", "instance")
    np.testing.assert_allclose(total.values[:-1], ds.g_effect.values[:-1].sum((2, 3)))
    e_u = ds.geffect.unlearning()
    e_r = ds.geffect.retaining()
    targeted = (ds.split == "targeted").values
    np.testing.assert_allclose(e_u.values[:-1], total.values[:-1, targeted].mean(1))
    np.testing.assert_allclose(e_r.values[:-1], total.values[:-1, ~targeted].mean(1))
    by_layer = ds.geffect.unlearning(keep=("layer",))
    assert by_layer.dims == ("step", "layer")
    np.testing.assert_allclose(by_layer.sum("layer").values[:-1], e_u.values[:-1])
    coarse = ds.geffect.coarse()
    assert list(coarse.layer.values) == ["embed", "shallow", "middle", "deep", "lm"]
    np.testing.assert_allclose(coarse.sum("layer").values[:-1], ds.g_effect.sum("layer").values[:-1])
    cum = ds.geffect.cumulative()
    lr = ds.learning_rate.values
    manual = np.cumsum(np.nan_to_num(ds.g_effect.values * lr[:, None, None, None]), axis=0)
    np.testing.assert_allclose(cum.values[1:], manual[:-1])
    assert (cum.isel(step=0) == 0).all()
    np.testing.assert_allclose(ds.geffect.risk_change().values, ds.risk.values - ds.risk.values[0])
    with pytest.raises(KeyError, match=r"no per-step learning rates \(learning_rate\)"):
        ds.drop_vars("learning_rate").geffect.cumulative()


def test_summary_table(runs):
    table = summarize(runs)
    assert list(table.index) == ["ga", "npo+gd"]
    assert (table["mean_e_u"] < 0).all()
    assert (table["forget_risk_end"] > table["forget_risk_start"]).all()
    assert table.loc["npo+gd", "weight_end"] <= 1.0
