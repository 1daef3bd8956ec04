"""The documentation's claims that code can check: every public function that returns a Dataset has a numpydoc
``Returns`` section naming its variables' dims, and those dims are the schema's; the wheel size the install page
states is checked by tests/test_wheel.py. (The site itself is built by ``make docs``, and in CI by ``make test``
after the notebook tests: docs/conf.py.)"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import geffect_lab as gl
from geffect_lab import schema

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = ("zoo", "objectives", "runs", "metrics", "schema", "testing", "plots", "widgets", "attribution")
# return xarray Datasets but carry no return annotation
UNANNOTATED = {"geffect_lab.evaluate": gl.evaluate, "geffect_lab.read_open_unlearning": gl.read_open_unlearning}
# return the Dataset they are given (checked or annotated), not one of their own
PASS_THROUGH = {"geffect_lab.schema.annotate", "geffect_lab.schema.validate"}
# dims a Dataset may hold in front of the schema's: the dim gl.combine / gl.load_sweep add
OUTER = {"objective", "run", "seed"}
NAMED_DIMS = re.compile(r"``(\w+)``\s*\[([\w, ]*)\]")


def _public_callables() -> dict[str, object]:
    out = {}
    for name in dir(gl):
        obj = getattr(gl, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            out[f"geffect_lab.{name}"] = obj
    for module_name in PUBLIC_MODULES:
        module = getattr(gl, module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out[f"geffect_lab.{module_name}.{name}"] = obj
    for qual, obj in list(out.items()):
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if inspect.isfunction(member) and not name.startswith("_"):
                    out[f"{qual}.{name}"] = member
    return out


def _returns_dataset(obj) -> bool:
    ann = inspect.signature(obj).return_annotation if callable(obj) else None
    return isinstance(ann, str) and re.search(r"\bDataset\b", ann) is not None or ann is not None and (
        getattr(ann, "__name__", "") == "Dataset")


DATASET_RETURNING = {q: o for q, o in _public_callables().items()
                     if inspect.isfunction(o) and _returns_dataset(o) and q not in PASS_THROUGH} | UNANNOTATED


def test_the_dataset_returning_functions_are_found():
    for name in ("geffect_lab.g_effect", "geffect_lab.unlearn", "geffect_lab.replay", "geffect_lab.load",
                 "geffect_lab.combine", "geffect_lab.load_sweep", "geffect_lab.GEffectRecorder.dataset"):
        assert name in DATASET_RETURNING, name


@pytest.mark.parametrize("qualname", sorted(DATASET_RETURNING))
def test_returned_datasets_name_their_dims(qualname):
    doc = inspect.getdoc(DATASET_RETURNING[qualname]) or ""
    section = re.search(r"^Returns\n-------\n(.+?)(?:\n\n\S|\Z)", doc, re.M | re.S)
    assert section, f"{qualname}: no numpydoc 'Returns' section"
    text = section.group(1)
    assert text.splitlines()[0].strip().startswith("xarray.Dataset"), text.splitlines()[0]
    named = [(var, tuple(d.strip() for d in dims.split(",") if d.strip()))
             for var, dims in NAMED_DIMS.findall(text) if var in schema.VARIABLES]
    assert named, f"{qualname}: its Returns section names no variable with its dims"
    for var, dims in named:
        own = dims[1:] if dims and dims[0] in OUTER else dims
        valid = (schema.variable_dims(var), schema.variable_dims(var, run=False))
        assert own in valid, f"{qualname}: ``{var}`` {list(dims)}, but the schema's dims are {list(valid[0])}"

