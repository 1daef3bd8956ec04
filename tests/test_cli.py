"""The command line and the documented commands."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd

from geffect_lab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_world_command_prints_the_splits(capsys):
    assert main(["world"]) == 0
    out = capsys.readouterr().out
    assert "forget05" in out and "retain95" in out and "world_facts" in out


def test_zoo_list(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in ("target", "retain_forget05", "target-gpt2")) and "not built" not in out


def test_demo_writes_the_exact_match_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "demo_exact_match.csv", index_col="split")
    assert {"forget05", "retain95", "world_facts"} <= set(table.index)
    assert (table["exact_match"] >= 0.95).all()
    assert "exact_match" in capsys.readouterr().out


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
