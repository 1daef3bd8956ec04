"""The package's shape, checked: a layered import graph without cycles, no private names used across modules,
one place for the version, small functions where the measuring happens, and a tidy ``dir(gl)``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import geffect_lab as gl

PKG = Path(gl.__file__).resolve().parent

# module -> the package modules it may never import (directly or through a function-level import)
FORBIDDEN = {
    "schema": "*",
    "objectives": "*",
    "results": {m for m in ("engine", "runs", "recorder", "metrics", "attribution", "plots", "widgets", "zoo")},
    "engine": {"runs", "recorder", "metrics", "attribution", "plots", "widgets", "cli", "demo", "zoo", "testing"},
    "metrics": {"zoo", "runs", "recorder", "plots", "widgets", "cli", "demo"},
    "plots": {"widgets", "runs", "recorder", "engine", "metrics", "zoo"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` for every ``from X import name`` of a package module (relative or absolute)."""
    me = _module_name(path).split(".") if _module_name(path) else []
    base = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "geffect_lab":
                parts = node.module.split(".")[1:]
            else:
                continue
            out += [(".".join(parts), a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(".".join(a.name.split(".")[1:]), "") for a in node.names if a.name.startswith("geffect_lab.")]
    return out


def _target(module: str, name: str) -> str:
    """The package module an import reaches (``from . import runs`` reaches ``runs``)."""
    full = f"{module}.{name}" if module else name
    as_path = PKG.joinpath(*full.split("."))
    return full if as_path.with_suffix(".py").exists() or as_path.is_dir() else module


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        graph[_module_name(path)] = {_target(m, n) for m, n in _imports(path)} - {""}
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_layers_import_only_downwards():
    for module, deps in _graph().items():
        rule = FORBIDDEN.get(_top(module))
        if rule is None:
            continue
        outside = {d for d in deps if _top(d) != _top(module)}
        bad = outside if rule == "*" else {d for d in outside if _top(d) in rule}
        assert not bad, f"{module} imports {sorted(bad)}, above its layer"


def test_no_import_cycles_between_modules():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if dep.startswith(node + ".") or node == "":  # a package importing its own submodules
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in graph:
        if node and node not in state:
            visit(node, [node])


def test_no_private_name_is_used_across_modules():
    for path in sorted(PKG.rglob("*.py")):
        for module, name in _imports(path):
            if name.startswith("_") and name != "__version__" and _target(module, name) == module:
                raise AssertionError(f"{_module_name(path)} uses {module}.{name}, a private name of another module")


def test_the_version_is_defined_once_from_package_metadata():
    from importlib.metadata import version

    assert gl.__version__ == version("geffect-lab")
    defining = [p.name for p in PKG.rglob("*.py") if "__version__ = " in p.read_text()]
    assert defining == ["_version.py"]


def _function_lengths(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                isinstance(first.value.value, str)
            start = node.body[1].lineno if doc and len(node.body) > 1 else first.lineno
            yield node.name, node.end_lineno - start + 1


@pytest.mark.parametrize("where", ["runs.py", "recorder.py", "engine"])
def test_no_function_over_80_lines_where_the_measuring_happens(where):
    """Code lines from the first statement after the docstring (a parameter's documentation is not code)."""
    paths = sorted((PKG / where).glob("*.py")) if (PKG / where).is_dir() else [PKG / where]
    long = [(p.name, name, n) for p in paths for name, n in _function_lengths(p) if n > 80]
    assert not long, long


def test_dir_lists_the_public_and_lazy_names_and_hides_internals():
    names = dir(gl)
    for name in ("g_effect", "unlearn", "GEffectRecorder", "plots", "widgets", "attribution", "Dashboard",
                 "estimate_memory", "schema", "RunConfig", "Measurement"):
        assert name in names, name
    assert not [n for n in names if n.startswith("_") and n != "__version__"]
    assert "annotations" not in names
