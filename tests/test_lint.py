"""The code base passes ruff, and kernel-side modules never import the UI libraries."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SIDE = ["engine", "objectives", "runs", "results", "metrics", "data", "zoo", "_batching"]
UI = {"ipywidgets", "seaborn", "IPython"}


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a dev dependency: pip install -e '.[dev]'"
    targets = [p for p in ("geffect_lab", "tests", "data", "benchmarks", "docs") if (ROOT / p).exists()]
    result = subprocess.run([ruff, "check", *targets], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


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
