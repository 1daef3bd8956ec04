"""The code base passes ruff, runs on the oldest Python it declares, and kernel-side modules never import the UI
libraries."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SIDE = ["engine", "objectives", "runs", "recorder", "replay", "sweep", "results", "schema", "metrics", "data",
               "zoo", "_batching"]
UI = {"ipywidgets", "seaborn", "IPython"}


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a dev dependency: pip install -e '.[dev]'"
    targets = [p for p in ("geffect_lab", "tests", "data", "benchmarks", "docs") if (ROOT / p).exists()]
    result = subprocess.run([ruff, "check", *targets], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_needs_no_python_newer_than_declared(tmp_path):
    """``requires-python = ">=3.10"``: vermin reads every module, test, script and notebook code cell and fails on
    any syntax, module or function newer than 3.10 (only 3.11 is installed here, so this is the check we can run)."""
    import nbformat

    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    assert vermin, "vermin is a dev dependency: pip install -e '.[dev]'"
    for nb_path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        cells = [c.source for c in nbformat.read(nb_path, as_version=4).cells if c.cell_type == "code"]
        code = "\n\n".join("\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
                           for src in cells)
        ast.parse(code, filename=nb_path.name)  # vermin passes files it cannot parse
        (tmp_path / f"{nb_path.stem}.py").write_text(code)
    folders = ("geffect_lab", "tests", "data", "benchmarks", "docs", "notebooks")
    targets = [str(ROOT / p) for p in folders] + [str(tmp_path)]
    result = subprocess.run([vermin, "--no-tips", "--violations", "--eval-annotations", "-t=3.10-", *targets],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "error:" not in result.stdout, result.stdout + result.stderr


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_kernel_side_never_imports_ui_libraries():
    pkg = ROOT / "geffect_lab"
    files = []
    for name in KERNEL_SIDE:
        files += [pkg / f"{name}.py"] if (pkg / f"{name}.py").exists() else sorted((pkg / name).rglob("*.py"))
    assert files
    for path in files:
        assert not (_imports(path) & UI), f"{path.relative_to(ROOT)} imports {_imports(path) & UI}"
