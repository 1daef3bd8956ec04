# geffect-lab: one entry point. `make demo` shows a first result, `make test` sets up and passes the tests.
# Every target creates .venv when needed; re-running a target does not reinstall anything up to date.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU wheel this machine carries; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo test test-fast docs docs-html lab zoo world findings selection lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,docs]"
	touch $(STAMP)

demo: install
	$(PY) -m geffect_lab demo

# Debian's chromium for the browser test of the dashboard (Playwright drives it; no browser download).
system-deps:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is not installed and cannot be installed here (needs root on Debian): the browser test will skip"; fi

# The site is built after the tests: it renders the notebooks the notebook tests have just executed
# (docs/notebooks/), so CI runs each notebook once.
test: install system-deps
	$(PY) -m pytest
	$(MAKE) --no-print-directory docs-html

test-fast: install
	$(PY) -m pytest -m "not slow and not notebook and not browser"

# The documentation site, offline, warnings as errors: the notebooks run (SMOKE mode) through their tests, which
# write the executed copy of every notebook that ran without error; then Sphinx builds docs/_build/html, and
# fails on a notebook without a fresh copy. (A notebook over its CI time budget still makes the site: `-`.)
docs: install
	-$(PY) -m pytest -q -m notebook tests/test_notebooks.py
	$(MAKE) --no-print-directory docs-html

docs-html: install
	$(PY) -m sphinx -b html -E -W --keep-going -q docs docs/_build/html
	@echo "documentation: docs/_build/html/index.html"

lab: install
	$(VENV)/bin/jupyter lab notebooks/01_quickstart.ipynb

zoo: install
	$(PY) -m geffect_lab zoo build --force

world: install
	$(PY) data/generate_world.py

# docs/findings.csv and the table of docs/findings.md: the sweeps over 8 seeds (resumable, in results/findings/)
findings: install
	$(PY) docs/findings_study.py

# docs/selection.csv and the tables of docs/selection.md: which forget samples are worth unlearning, by their
# PG-effect (8 seeds, resumable, in results/selection/)
selection: install
	$(PY) docs/selection_study.py

lint: install
	$(VENV)/bin/ruff check geffect_lab tests benchmarks data

clean:
	rm -rf $(VENV) results .pytest_cache docs/_build docs/notebooks
