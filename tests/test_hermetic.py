"""The test session is hermetic (tests/conftest.py): nothing a user's machine holds outside the checkout is read.

The proof runs a few representative tests in a fresh pytest process whose home directory and every setting the
package reads (its model cache, zoo and data folders, the TOFU location, Hugging Face's and matplotlib's folders)
point at a *decoy* folder full of plausible files: built study models, a matplotlibrc, a TOFU copy. A Python audit
hook, installed before pytest loads anything, records every file or folder opened under the decoy; the test fails
if one was, or if the representative tests fail there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import matplotlib
import pytest

import geffect_lab as gl

# Representative: the zoo listing (the study models), a study model built on first use, a cached model's recipe,
# the real-TOFU location, a figure (matplotlib), a CLI run (the bundled model, the Hugging Face loaders).
REPRESENTATIVE = [
    "tests/test_cli.py::test_zoo_list",
    "tests/test_zoo.py::test_a_cached_model_built_from_another_recipe_is_reported_when_loaded",
    "tests/test_zoo.py::test_a_tofu_model_without_tofu_says_where_it_looked",
    "tests/test_plots.py::test_missing_variables_are_named",
    "tests/test_cli.py::test_run_info_compare",
]

PROBE = '''
"""pytest plugin: records every open, listdir and scandir under $DECOY_ROOT (an audit hook sees them all)."""
import os
import sys

_root = os.environ["DECOY_ROOT"]
_log = os.environ["DECOY_LOG"]


def _hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(_root) and not path.startswith(_log):
            with open(_log, "a") as f:  # the log lies outside the root: this open is not recorded again
                f.write(f"{event} {path}\\n")


sys.addaudithook(_hook)
'''


def _decoy(root: Path) -> dict[str, str]:
    """A home directory and settings full of plausible files, and the environment that points at them."""
    cache = root / "home" / ".cache" / "geffect-lab" / "zoo"
    for name in ("target-15ep", "target-x4", "target-2stage", "tofu-target"):
        (cache / name).mkdir(parents=True)
        (cache / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "home" / ".config" / "matplotlib").mkdir(parents=True)
    (root / "home" / ".config" / "matplotlib" / "matplotlibrc").write_text("figure.dpi: 13\n")
    for folder in ("tofu", "zoo", "data", "hf", "mpl", "cache"):
        (root / folder).mkdir()
    (root / "tofu" / "full.json").write_text("{}\n")
    return {"HOME": str(root / "home"), "GEFFECT_CACHE_DIR": str(root / "home" / ".cache" / "geffect-lab"),
            "GEFFECT_TOFU_DIR": str(root / "tofu"), "GEFFECT_ZOO_DIR": str(root / "zoo"),
            "GEFFECT_DATA_DIR": str(root / "data"), "HF_HOME": str(root / "hf"), "MPLCONFIGDIR": str(root / "mpl"),
            "XDG_CACHE_HOME": str(root / "home" / ".cache"), "XDG_CONFIG_HOME": str(root / "home" / ".config")}


def test_the_session_environment_is_the_hermetic_one():
    home = Path(os.environ["HOME"])
    fresh = os.environ.get("GEFFECT_TEST_HOME") or tempfile.gettempdir()
    assert Path.home() == home and home.resolve().is_relative_to(Path(fresh).resolve())
    assert gl.zoo.cache_dir() == home / "geffect-cache" / "zoo"
    assert Path(matplotlib.get_configdir()) == home / "matplotlib"
    from huggingface_hub import constants

    assert Path(constants.HF_HOME) == home / "huggingface" and constants.HF_HUB_OFFLINE
    assert "GEFFECT_ZOO_DIR" not in os.environ and "GEFFECT_DATA_DIR" not in os.environ
    assert gl.data.data_dir() == Path(gl.__file__).resolve().parent.parent / "data"


@pytest.mark.slow
def test_nothing_outside_the_checkout_is_read(tmp_path):
    decoy = tmp_path / "decoy"
    env_decoy = _decoy(decoy)
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "decoy_probe.py").write_text(textwrap.dedent(PROBE))
    log = tmp_path / "opened.log"
    env = {k: v for k, v in os.environ.items() if k != "GEFFECT_TEST_HOME" and k != "PYTHONPATH"}
    env.update(env_decoy, DECOY_ROOT=str(decoy), DECOY_LOG=str(log), PYTHONPATH=str(tmp_path / "probe"))
    checkout = Path(gl.__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "decoy_probe", "-p", "no:cacheprovider",
                           *REPRESENTATIVE], cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(REPRESENTATIVE)} passed" in proc.stdout
    opened = log.read_text().splitlines() if log.exists() else []
    assert opened == [], "the tests opened files of the user's machine:\n" + "\n".join(opened[:20])
    # the probe works: the same hook does see an open under the decoy
    check = subprocess.run([sys.executable, "-c", "import decoy_probe, os; open(os.environ['GEFFECT_TOFU_DIR'] + "
                            "'/full.json').read()"], env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert log.read_text().splitlines() == [f"open {decoy / 'tofu' / 'full.json'}"]
