"""geffect-lab's own Sphinx extension: reference tables made from the code, and the build's checks.

Directives (in MyST pages, as ```` ```{geffect-objectives} ```` fences):

- ``geffect-objectives``: every registered objective (``gl.list_objectives()``): role, its per-sample loss (the
  first paragraph of its docstring), parameters with their defaults and valid ranges, what the engine computes
  for it;
- ``geffect-schema``: ``geffect_lab.schema``'s dims, coordinates and variables (dims, long name, units, meaning);
- ``geffect-metrics``: the metric variables, their dims and definitions, and the open-unlearning
  ``TOFU_EVAL.json`` keys that ``gl.read_open_unlearning`` reads into each;
- ``geffect-zoo``: the zoo's models from their committed ``zoo.json`` reports.

Checks, each a warning (an error under ``-W``): every public name of ``geffect_lab`` (``dir(gl)``) and of its
public modules is documented in the API reference; every notebook has an executed copy, with the committed
notebook's cells, with outputs and no error.

The exercises notebooks (notebooks/exercises/) are copied into the site as shipped, without outputs.

Notebooks link the site's pages from notebooks/ (``../docs/findings.md``); those links are rewritten for the
notebooks' place in the site.

Docstrings: the package writes numpydoc sections with ``name:`` lines (``objective, params:``); they are read
here as numpydoc's ``name`` lines, before napoleon parses them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
from docutils import nodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import geffect_lab as gl

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = DOCS / "notebooks"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"

# modules whose public names (``__all__``) the API reference documents, besides the top level
PUBLIC_MODULES = ("zoo", "objectives", "runs", "metrics", "schema", "testing", "plots", "widgets", "attribution")

SECTION = re.compile(r"^(Parameters|Returns|Yields|Raises|Other Parameters|Attributes|See Also|Notes|Examples)$")
NAME_LINE = re.compile(r"^([A-Za-z_*][\w*]*(?:, ?[A-Za-z_*][\w*]*)*):$")


# --------------------------------------------------------------------------------------- docstrings
def numpydoc_name_lines(app, what, name, obj, options, lines):
    """``objective, params:`` → ``objective, params`` inside Parameters sections (numpydoc's form)."""
    in_params = False
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and SECTION.match(line.strip()) and set(lines[i + 1].strip()) == {"-"}:
            in_params = line.strip() in ("Parameters", "Other Parameters")
            continue
        if in_params and NAME_LINE.match(line):
            lines[i] = line[:-1]


# --------------------------------------------------------------------------------------- tables
def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _code(text) -> str:
    return f"`{text}`" if text not in ("", None) else ""


class _MarkdownDirective(SphinxDirective):
    """A directive that writes MyST markdown made from the code and parses it in place."""

    has_content = False

    def markdown(self) -> str:
        raise NotImplementedError

    def run(self):
        container = nodes.container()
        self.state.nested_parse(self.markdown().splitlines(), self.content_offset, container)
        return container.children


class ObjectivesTable(_MarkdownDirective):
    def markdown(self) -> str:
        rows = []
        for name in gl.list_objectives():
            spec = gl.get_objective(name)
            params = []
            for key, default in spec.defaults.items():
                bound = spec.bounds.get(key)
                params.append(f"`{key}={default!r}`" + (f" ({key} {bound})" if bound else ""))
            rows.append([f"`{name}`", spec.role, spec.description, ", ".join(params) or "—",
                         ", ".join(f"`{n}`" for n in sorted(spec.needs)) or "—"])
        return _table(["name", "role", "per-sample loss ℓ", "parameters (defaults, valid range)",
                       "engine computes"], rows)


class SchemaTables(_MarkdownDirective):
    def markdown(self) -> str:
        s = gl.schema
        dims = _table(["dim", "one position along it"], [[f"`{d}`", m] for d, m in s.DIMS.items()])
        coords = _table(["coordinate", "dims"], [[f"`{c}`", ", ".join(d)] for c, d in s.COORDS.items()])
        variables = _table(["variable", "dims", "long name", "units", "meaning"],
                           [[f"`{n}`", "[" + ", ".join(v.dims) + "]", v.long_name, v.units or "—", v.description]
                            for n, v in s.VARIABLES.items()])
        return (f"Schema version {s.SCHEMA_VERSION}; sign convention `{s.SIGN_CONVENTION}`.\n\n"
                f"**Dims**\n\n{dims}\n**Coordinates**\n\n{coords}\n**Variables** (in a run Dataset; an evaluation "
                f"Dataset has the same variables without `step`)\n\n{variables}")


def open_unlearning_keys() -> dict[str, list[str]]:
    """Variable → the ``TOFU_EVAL.json`` keys that :func:`geffect_lab.read_open_unlearning` reads into it."""
    from geffect_lab import metrics

    out: dict[str, list[str]] = {}
    for prefix in metrics._OU_PREFIX:
        for key, (var, _field) in metrics._OU_METRIC.items():
            out.setdefault(var, []).append(f"{prefix}{key}")
    for key in metrics._OU_TARGETED_ONLY:
        out.setdefault(key, []).append(key)
    for key in ("forget_quality", "model_utility"):
        out.setdefault(key, []).append(key)
    return out


class MetricsTable(_MarkdownDirective):
    def markdown(self) -> str:
        s = gl.schema
        ou = open_unlearning_keys()
        rows = [[f"`{n}`", "[" + ", ".join(s.VARIABLES[n].dims) + "]", s.VARIABLES[n].description,
                 ", ".join(f"`{k}`" for k in ou.get(n, [])) or "—"] for n in s.METRICS]
        return _table(["variable", "dims (along a run)", "definition", "open-unlearning TOFU_EVAL.json keys"], rows)


class ZooTable(_MarkdownDirective):
    def markdown(self) -> str:
        rows = []
        for name in gl.zoo.list():
            report = json.loads((gl.zoo.zoo_dir() / name / "zoo.json").read_text())
            em = report.get("exact_match", {})
            rows.append([f"`{name}`", report["description"], f"{report['parameters']:,}",
                         " + ".join(report["train_splits"]), f"{report['train_seconds']:.0f} s",
                         " / ".join(f"{em[s]:.0%}" for s in ("forget01", "forget05", "forget10") if s in em),
                         " / ".join(f"{em[s]:.0%}" for s in ("retain99", "retain95", "retain90") if s in em)])
        return _table(["model", "what", "parameters", "trained on", "build time", "exact match forget01/05/10",
                       "retain99/95/90"], rows)


class StudyZooTable(_MarkdownDirective):
    """The study models: built on first use (not committed), so only their recipe is shown."""

    def markdown(self) -> str:
        rows = [[f"`{name}`", e.description, "the real TOFU" if e.world == "tofu" else "the bundled world",
                 (f"`{e.base}`, then " if e.base else "") + " + ".join(e.train_splits),
                 f"{e.recipe.hidden} / {e.recipe.layers} layers, {e.recipe.epochs} epochs"]
                for name, e in gl.zoo.ZOO.items() if not e.bundled]
        return _table(["model", "what", "text", "trained on", "width / depth, epochs"], rows)


# --------------------------------------------------------------------------------------- checks
def public_names() -> set[str]:
    """``geffect_lab.X`` for every X of ``dir(gl)`` that is not a module, and ``geffect_lab.M.X`` for every
    X in the ``__all__`` of the public modules that is a function or a class defined in the package."""
    import inspect

    out = set()
    for name in dir(gl):
        if name.startswith("_") or name in PUBLIC_MODULES:
            continue
        out.add(f"geffect_lab.{name}")
    for module_name in PUBLIC_MODULES:
        module = getattr(gl, module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__.startswith("geffect_lab"):
                out.add(f"geffect_lab.{module_name}.{name}")
    return out


def _resolve(dotted: str):
    obj = gl
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part, None)
    return obj


def check_api_coverage(app, env):
    """A re-export (``gl.unlearn`` is ``gl.runs.unlearn``) is documented once, under either name."""
    documented = {id(obj) for obj in map(_resolve, env.get_domain("py").objects) if obj is not None}
    for name in sorted(public_names()):
        if id(_resolve(name)) not in documented:
            logger.warning(f"public name {name} is not in the API reference (docs/reference/api.md)",
                           type="geffect", subtype="api")


def check_notebooks(app, config):
    """Every notebook has an executed copy with the committed cells, outputs, and no error output."""
    for path in sorted(NOTEBOOKS.glob(NOTEBOOK_GLOB)):
        copy = EXECUTED / path.name
        hint = "run `make docs` (it executes the notebooks through tests/test_notebooks.py)"
        if not copy.exists():
            logger.warning(f"notebook {path.name} has no executed copy in docs/notebooks/: {hint}",
                           type="geffect", subtype="notebook")
            continue
        source = [c.source for c in nbformat.read(path, as_version=4).cells]
        executed = nbformat.read(copy, as_version=4)
        if [c.source for c in executed.cells] != source:
            logger.warning(f"docs/notebooks/{path.name} was executed from another version of "
                           f"notebooks/{path.name}: {hint}", type="geffect", subtype="notebook")
        code = [c for c in executed.cells if c.cell_type == "code"]
        if code and not any(c.outputs for c in code):
            logger.warning(f"docs/notebooks/{path.name} has no outputs: {hint}", type="geffect", subtype="notebook")
        if any(o.output_type == "error" for c in code for o in c.outputs):
            logger.warning(f"docs/notebooks/{path.name} holds an error output", type="geffect", subtype="notebook")
    stale = sorted(p.name for p in EXECUTED.glob("*.ipynb") if not (NOTEBOOKS / p.name).exists())
    for name in stale:
        logger.warning(f"docs/notebooks/{name} has no notebook in notebooks/ (delete it)",
                       type="geffect", subtype="notebook")


def copy_exercises(app, config):
    """The exercises notebooks, as shipped (stubs to fill, no outputs: tests/test_exercises.py runs them), are
    pages of the site too; their solutions (``solutions.py``) are not."""
    out = EXECUTED / "exercises"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.ipynb"):
        stale.unlink()
    for path in sorted((NOTEBOOKS / "exercises").glob("*.ipynb")):
        (out / path.name).write_bytes(path.read_bytes())


def notebook_links(app, docname, source):
    """A notebook links a page of the site as ``../docs/page.md`` (from notebooks/); rendered from
    docs/notebooks/ the same page is ``../page.md``."""
    if docname.startswith("notebooks/"):
        source[0] = source[0].replace("](../docs/", "](../")


def setup(app):
    app.connect("source-read", notebook_links)
    app.connect("autodoc-process-docstring", numpydoc_name_lines, priority=100)
    app.connect("config-inited", check_notebooks)
    app.connect("config-inited", copy_exercises)
    app.connect("env-check-consistency", check_api_coverage)
    app.add_directive("geffect-objectives", ObjectivesTable)
    app.add_directive("geffect-schema", SchemaTables)
    app.add_directive("geffect-metrics", MetricsTable)
    app.add_directive("geffect-zoo", ZooTable)
    app.add_directive("geffect-zoo-study", StudyZooTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
