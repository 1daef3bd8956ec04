"""Sphinx configuration of geffect-lab's documentation site (``make docs``; output in docs/_build/html).

Built offline with warnings as errors. The notebooks are rendered from the executed copies that the notebook
tests write to ``docs/notebooks/`` (tests/test_notebooks.py, SMOKE mode): they run once, as tests, and the site
shows what those tests ran. Tables of objectives, the schema and the metrics are made from the code at build
time (``docs/_ext/geffect_docs.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import geffect_lab  # noqa: E402  (the checkout's package, or the installed one)

project = "geffect-lab"
author = "geffect-lab developers"
release = version = geffect_lab.__version__
copyright = "geffect-lab developers"  # noqa: A001  (Sphinx's name)

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "geffect_docs",
]

exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# MyST: $...$ maths, ::: fences, heading anchors for [text](page.md#anchor) links (checked: -W)
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# notebooks: never executed here (see the module docstring)
nb_execution_mode = "off"
nb_output_stderr = "remove"  # kernel log lines (Dask shutting workers down, progress bars); errors fail the tests
nb_merge_streams = True

# API reference: docstrings are numpydoc-style sections (Parameters, Returns) read by napoleon
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_param = False  # "objective, params" stays one entry with one description

html_theme = "furo"
html_title = f"geffect-lab {release}"
html_static_path: list[str] = []
