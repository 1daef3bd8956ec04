"""The command line and the documented commands."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

import geffect_lab as gl
from geffect_lab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_world_command_prints_the_splits(capsys):
    assert main(["world"]) == 0
    out = capsys.readouterr().out
    assert "forget05" in out and "retain95" in out and "world_facts" in out


def _zoo_listing(capsys) -> dict[str, str]:
    """``geffect-lab zoo list`` as name -> "built" / "not built"."""
    assert main(["zoo", "list"]) == 0
    rows = [line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return {name: "not built" if rest.startswith("not built") else "built" for name, rest in rows}


def test_zoo_list(capsys, tmp_path, monkeypatch):
    """The bundled models are built; a study model is built on first use into the cache (the session's cache is
    a fresh temporary folder, tests/conftest.py), so a fresh machine lists it as not built until it is."""
    monkeypatch.setenv("GEFFECT_CACHE_DIR", str(tmp_path / "cache"))
    listing = _zoo_listing(capsys)
    assert list(listing) == list(gl.zoo.ZOO)
    assert all(listing[n] == "built" for n in gl.zoo.list()) and {"target", "retain_forget05", "target-gpt2"} <= {
        n for n, state in listing.items() if state == "built"}
    study = set(gl.zoo.list(include_study=True)) - set(gl.zoo.list())
    assert {"target-15ep", "target-x4", "target-x16", "target-2stage", "tofu-target"} <= study
    assert all(listing[n] == "not built" for n in study)
    # one epoch at a vanishing learning rate: built into the cache in seconds, then listed as built
    gl.zoo.build(["target-2stage"], recipe_overrides={"epochs": 1, "lr": 1e-12}, progress=False)
    assert (tmp_path / "cache" / "zoo" / "target-2stage" / "config.json").exists()
    listing = _zoo_listing(capsys)
    assert listing["target-2stage"] == "built" and all(listing[n] == "not built" for n in study - {"target-2stage"})


def test_zoo_without_an_action_says_which_actions_there_are(capsys):
    assert main(["zoo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geffect-lab: error: the zoo command needs an action: 'geffect-lab zoo list'")
    assert "'geffect-lab zoo build [NAMES]'" in err and "required" not in err and len(err.splitlines()) == 1
    assert main(["zoo", "list", "target"]) == 2
    assert "zoo list takes no names (got target)" in capsys.readouterr().err


def test_demo_runs_ga_npo_wga_and_writes_results(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3"]) == 0
    for name in ("ga", "npo", "wga"):
        ds = gl.load(tmp_path / f"{name}.nc")
        assert ds.attrs["objective"] == name and ds.sizes["step"] == 4
    table = pd.read_csv(tmp_path / "demo_summary.csv", index_col="run")
    assert list(table.index) == ["ga", "npo", "wga"] and (table["mean_e_u"] < 0).all()
    out = capsys.readouterr().out
    assert "mean_e_u" in out and "forget_risk_end" in out


def test_run_info_compare(tmp_path, capsys):
    a, b = tmp_path / "npo.nc", tmp_path / "ga.nc"
    assert main(["run", "--objective", "npo", "--param", "beta=0.2", "--steps", "2", "--record", "g_effect",
                 "-o", str(a)]) == 0
    assert main(["run", "-O", "ga", "--steps", "2", "--record", "", "-o", str(b)]) == 0
    ds = gl.load(a)
    assert ds.attrs["objective"] == "npo" and '"npo.beta": 0.2' in ds.attrs["objective_params"]
    assert "g_effect" in ds and "g_effect" not in gl.load(b)
    capsys.readouterr()
    assert main(["info", str(a)]) == 0
    out = capsys.readouterr().out
    assert f"schema version {gl.schema.SCHEMA_VERSION}" in out and "optimizer: adamw" in out and "mean_e_u" in out
    assert main(["compare", str(a), str(b), "--csv", str(tmp_path / "cmp.csv")]) == 0
    out = capsys.readouterr().out
    assert "npo" in out and "ga" in out
    assert list(pd.read_csv(tmp_path / "cmp.csv", index_col="run").index) == ["npo", "ga"]


def test_run_errors_name_the_valid_choices(capsys):
    assert main(["run", "--objective", "nop", "--steps", "1"]) == 2
    assert "registered objectives are: ga, wga" in capsys.readouterr().err
    assert main(["run", "--objective", "npo", "--param", "gamma=1", "--steps", "1"]) == 2
    assert "its parameters are: beta=0.1" in capsys.readouterr().err
    assert main(["run", "--objective", "ga", "--steps", "1", "-o", "/proc/nope/x.nc"]) == 2
    assert "cannot write results" in capsys.readouterr().err


USER_MODULE = '''import geffect_lab as gl


@gl.objective("cli_scaled_ga")
def scaled(x, scale: float = 2.0):
    """GA times a constant."""
    return -scale * x.mean(x.nll)
'''


@pytest.mark.parametrize("where", ["before", "after"])
def test_import_brings_user_objectives_to_the_cli(where, tmp_path, monkeypatch, capsys, scratch_objectives):
    """``--import MODULE`` before the command or after it (as the how-to writes it), for every command."""
    module = f"my_objectives_{where}"  # a module imported once per process: one name per case
    (tmp_path / f"{module}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)

    def cli(*args):
        imports = ["--import", module]
        return main([*imports, *args] if where == "before" else [args[0], *imports, *args[1:]])

    assert cli("objectives") == 0
    assert "cli_scaled_ga" in capsys.readouterr().out
    assert cli("run", "--objective", "cli_scaled_ga", "--param", "scale=3", "--steps", "1", "--record", "g_effect",
               "-o", "out.nc") == 0
    ds = gl.load(tmp_path / "out.nc")
    assert ds.attrs["objective"] == "cli_scaled_ga" and json.loads(ds.attrs["config"])["params"] == {
        "cli_scaled_ga.scale": 3.0, "cli_scaled_ga.weight": 1.0}
    assert ds.sizes["step"] == 2 and float(abs(ds.g_effect.isel(step=0)).sum()) > 0
    assert cli("run", "--objective", "cli_scaled_ga", "--param", "beta=1", "--steps", "1") == 2  # still its own
    assert "its parameters are: scale=2.0" in capsys.readouterr().err


def test_help_texts_teach(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "dR ~ -lr * g_effect" in out and "npo+0.5*kl" in out and "beta=0.1" in out


def test_bad_input_is_one_clear_line(capsys):
    assert main(["world", "/nonexistent/tofu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geffect-lab: error:") and "no such folder" in err


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme and "make lab" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    # the install target is a no-op once up to date
    assert subprocess.run(["make", "-q", "install"], cwd=ROOT).returncode == 0
