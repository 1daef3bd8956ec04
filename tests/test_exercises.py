"""The exercises notebook (notebooks/exercises/08_exercises.ipynb): with every stub replaced by its solution
(notebooks/exercises/solutions.py) every check passes; as shipped, every check fails, on its own exercise's
stub, and nothing else fails. The committed notebook carries no outputs and never reads its solutions.

The notebook sits in its own folder, outside tests/test_notebooks.py's ``NN_*.ipynb`` glob, because as shipped
it is meant to stop at its checks: it cannot be one of the notebooks that run top to bottom without error."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks" / "exercises"
NOTEBOOK = FOLDER / "08_exercises.ipynb"
SOLUTIONS = FOLDER / "solutions.py"
BUDGET_S = 120  # the notebook tests' SMOKE budget; one execution takes well under a minute on 2 CPU cores
MARKER = re.compile(r"^# %% (exercise-\d+)\s*$", re.MULTILINE)


@functools.cache
def _notebook_tests():
    """tests/test_notebooks.py, loaded from its file (the tests are not a package)."""
    spec = importlib.util.spec_from_file_location("_notebook_tests", Path(__file__).with_name("test_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notebook_client(nb, **kwargs):
    """test_notebooks' nbclient client, whose kernel channels are polled in short slices (see its docstring)."""
    return _notebook_tests()._notebook_client(nb, **kwargs)


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def _number(cell) -> int:
    return int(cell.id.rsplit("-", 1)[1])


def _solutions() -> dict[str, str]:
    """``{cell id: source}`` from the ``# %% exercise-N`` blocks of the solutions file."""
    parts = MARKER.split(SOLUTIONS.read_text())
    return {cell_id: body.strip() for cell_id, body in zip(parts[1::2], parts[2::2])}


def _functions(source: str) -> set[str]:
    return {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}


def _errors(cell) -> list:
    return [o for o in cell.get("outputs", []) if o.output_type == "error"]


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _execute(nb, *, allow_errors: bool) -> float:
    client = _notebook_client(nb, timeout=300, kernel_name="python3", allow_errors=allow_errors,
                              resources={"metadata": {"path": str(FOLDER)}})
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def test_the_notebook_is_laid_out_as_exercises():
    nb = _read()
    cells = nb.cells
    exercises, checks = _tagged(nb, "exercise"), _tagged(nb, "check")
    assert [_number(c) for c in exercises] == [1, 2, 3, 4]
    assert [c.id for c in checks] == [f"check-{_number(c)}" for c in exercises]
    for cell in exercises:
        n = _number(cell)
        assert cell.id == f"exercise-{n}" and cell.cell_type == "code"
        assert cells[cells.index(cell) + 1].id == f"check-{n}", f"the check of exercise {n} sits right under it"
        assert "# YOUR CODE HERE" in cell.source
        stubs = re.findall(r'raise NotImplementedError\("Exercise (\d+): ', cell.source)
        assert stubs and set(stubs) == {str(n)}, f"exercise {n}'s stubs name their exercise"
        assert stubs.count(str(n)) == len(_functions(cell.source)), "every function of an exercise is a stub"
    for cell in cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{cell.id}: clear the outputs"
            assert "solutions" not in cell.source, f"{cell.id}: the notebook must not read its solutions"


def test_every_stub_has_a_solution_with_the_same_functions():
    nb = _read()
    solutions = _solutions()
    exercises = {c.id: c.source for c in _tagged(nb, "exercise")}
    assert set(solutions) == set(exercises)
    for cell_id, stub in exercises.items():
        assert _functions(solutions[cell_id]) == _functions(stub), cell_id
        assert "NotImplementedError" not in solutions[cell_id] and "YOUR CODE HERE" not in solutions[cell_id]


@pytest.mark.notebook
def test_with_the_solutions_every_check_passes():
    nb = _read()
    solutions = _solutions()
    for cell in _tagged(nb, "exercise"):
        cell.source = solutions[cell.id]
    elapsed = _execute(nb, allow_errors=False)  # a failing cell raises CellExecutionError, with its traceback
    for cell in _tagged(nb, "check"):
        assert f"Exercise {_number(cell)} passed" in _stdout(cell), f"{cell.id} did not reach its end"
    assert elapsed <= BUDGET_S, f"the notebook with its solutions took {elapsed:.0f} s"
    print(f"with the solutions: {elapsed:.1f} s")


@pytest.mark.notebook
def test_as_shipped_each_check_fails_on_its_own_stub():
    nb = _read()
    elapsed = _execute(nb, allow_errors=True)  # every cell runs, errors and all
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        errors = _errors(cell)
        if "check" not in cell.metadata.get("tags", []):
            assert not errors, f"{cell.id} failed: " + "; ".join(f"{e.ename}: {e.evalue}" for e in errors)
            continue
        n = _number(cell)
        assert len(errors) == 1, f"{cell.id} ran without failing"
        assert errors[0].ename == "NotImplementedError", f"{cell.id}: {errors[0].ename}: {errors[0].evalue}"
        assert errors[0].evalue.startswith(f"Exercise {n}: "), f"{cell.id} failed on another stub: {errors[0].evalue}"
        assert f"Exercise {n} passed" not in _stdout(cell)
    assert elapsed <= BUDGET_S, f"the notebook as shipped took {elapsed:.0f} s"
    print(f"as shipped: {elapsed:.1f} s")
