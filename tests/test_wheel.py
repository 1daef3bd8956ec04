"""The wheel works alone: built from the package sources (sdist first, the wheel from the sdist), installed (not
editable) into a fresh environment offline, and used from a folder outside the checkout, it loads the bundled
world, the zoo's target and measures a G-effect equal to the checkout's, and its console script runs the demo."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import geffect_lab as gl

ROOT = Path(__file__).resolve().parents[1]
# What goes into the sdist: pyproject.toml names everything else it needs from these.
SOURCES = ("pyproject.toml", "README.md", "geffect_lab", "data")
WHEEL_MAX_BYTES = 20_000_000  # the zoo's five models are 17.4 MB of float32 weights; the rest is small

# The same call in the checkout's process and in the fresh environment (NPO+GD, 4 + 4 samples, 3 + 3 targets).
G_EFFECT_CALL = """
import json, torch
import geffect_lab as gl
torch.manual_seed(0)
world = gl.load_world()
model, tok = gl.zoo.load("target", dtype=torch.float64)
ds = gl.g_effect(model, tok, "npo+gd", params={"beta": 0.1}, forget=world["forget05"][:4],
                 retain=world["retain95"][:4],
                 targets={"targeted": world["forget05"][4:7], "non_targeted": world["retain_perturbed"][:3]})
e = ds.g_effect.sum(["layer", "term"]).isel(step=0)
RESULT = {"instance": [str(i) for i in ds.instance.values], "g_effect": [float(x) for x in e.values],
          "splits": sorted(world), "n_forget05": len(world["forget05"]),
          "parameters": sum(p.numel() for p in model.parameters()), "file": gl.__file__,
          "data_dir": str(gl.data.data_dir()), "version": gl.__version__}
"""


def _project_version() -> str:
    """pyproject.toml's ``version``, the one place it is written."""
    return re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist and the wheel, built offline with this environment's setuptools from a copy of the sources."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    return wheels[0], sdists[0]


@pytest.fixture(scope="module")
def fresh_env(built, tmp_path_factory):
    """A new venv with the wheel installed (--no-deps --no-index), its dependencies read from this environment's
    site-packages through a .pth line (whose own .pth files, the checkout's editable finder among them, are not
    processed: only a site directory's .pth files are)."""
    wheel, _ = built
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           str(wheel)],
                          capture_output=True, text=True, timeout=600, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # after the install, so that pip never sees (nor offers to replace) this environment's geffect-lab
    (site / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir, site


def _clean_env() -> dict:
    """This process's environment without what would point the fresh one at the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("GEFFECT_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1", MPLBACKEND="Agg")
    return env


@pytest.mark.slow
def test_the_wheel_holds_the_data_and_nothing_of_the_checkout_else(built):
    wheel, sdist = built
    version = _project_version()
    assert wheel.name == f"geffect_lab-{version}-py3-none-any.whl"
    assert sdist.name == f"geffect_lab-{version}.tar.gz"
    size = wheel.stat().st_size
    assert 10_000_000 < size < WHEEL_MAX_BYTES, size
    names = zipfile.ZipFile(wheel).namelist()
    data = "geffect_lab/_data/"
    for path in sorted((ROOT / "data" / "world").iterdir()):
        assert f"{data}world/{path.name}" in names, path.name
    for path in sorted((ROOT / "data" / "tokenizer").iterdir()):
        assert f"{data}tokenizer/{path.name}" in names, path.name
    for name in gl.zoo.list():
        for path in sorted((ROOT / "data" / "zoo" / name).iterdir()):
            assert f"{data}zoo/{name}/{path.name}" in names, path
    # every module of the package (pyproject lists the subpackages; one forgotten there would be missing here)
    for path in sorted((ROOT / "geffect_lab").rglob("*.py")):
        assert path.relative_to(ROOT).as_posix() in names, path
    assert not [n for n in names if n.startswith(("tests/", "notebooks/", "docs/", "benchmarks/", "data/"))]
    assert not [n for n in names if n.endswith((".ipynb", ".pyc")) or "/test_" in n or "generate_world" in n]
    tops = {n.split("/")[0] for n in names}
    assert tops == {"geffect_lab", f"geffect_lab-{version}.dist-info"}, tops
    entry_points = zipfile.ZipFile(wheel).read(f"geffect_lab-{version}.dist-info/entry_points.txt").decode()
    assert "geffect-lab = geffect_lab.cli:main" in entry_points
    stated = re.search(r"The wheel is about (\d+\.\d) MB", (ROOT / "docs" / "install.md").read_text())
    assert stated and abs(float(stated.group(1)) - size / 1e6) <= 0.3, (
        f"docs/install.md states {stated and stated.group(1)} MB; the wheel is {size / 1e6:.1f} MB")
    print(f"wheel {wheel.name}: {size / 1e6:.1f} MB, {len(names)} files")


@pytest.mark.slow
def test_the_installed_wheel_works_outside_the_checkout(fresh_env, tmp_path):
    env_dir, site = fresh_env
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert ROOT not in outside.parents
    script = outside / "measure.py"
    script.write_text(G_EFFECT_CALL + "\nprint(json.dumps(RESULT))\n")
    proc = subprocess.run([str(env_dir / "bin" / "python"), str(script)], cwd=outside, capture_output=True,
                          text=True, timeout=600, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])

    # it is the wheel's copy that ran, with the wheel's data, and the version from pyproject
    assert Path(theirs["file"]).resolve().is_relative_to(site.resolve()), theirs["file"]
    assert Path(theirs["data_dir"]).resolve() == (site / "geffect_lab" / "_data").resolve()
    assert theirs["version"] == _project_version() == gl.__version__

    # the same call here, in the checkout
    here: dict = {}
    exec(G_EFFECT_CALL, here)
    ours = here["RESULT"]
    assert Path(ours["file"]).resolve().is_relative_to(ROOT)
    assert theirs["splits"] == ours["splits"] and theirs["n_forget05"] == ours["n_forget05"] == 50
    assert theirs["parameters"] == ours["parameters"] == 853_120
    assert theirs["instance"] == ours["instance"] and len(ours["instance"]) == 6
    assert all(abs(x) < float("inf") for x in theirs["g_effect"])
    assert any(x != 0 for x in theirs["g_effect"])
    # transformers' Llama computes its RMSNorm in float32 even in a float64 model, so two processes with other
    # thread counts agree to float32's precision, not float64's (CI measured 1.7e-8 relative): the tolerance of
    # every test where HF computes in float32
    assert theirs["g_effect"] == pytest.approx(ours["g_effect"], rel=1e-6, abs=0)


@pytest.mark.slow
def test_the_installed_console_script_runs_the_demo(fresh_env, tmp_path):
    env_dir, _ = fresh_env
    proc = subprocess.run([str(env_dir / "bin" / "geffect-lab"), "demo", "--steps", "2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "model 'target': 853,120 parameters" in proc.stdout
    for name in ("ga", "npo", "wga"):
        ds = gl.load(tmp_path / "results" / f"{name}.nc")
        assert ds.sizes["step"] >= 2 and ds.attrs["objective"] == name
