# geffect-lab: one entry point. `make demo` shows a first result, `make test` sets up and passes the tests.
# Every target creates .venv when needed; re-running a target does not reinstall anything up to date.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU wheel this machine carries; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo test test-fast lab zoo world lint clean

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

test: install system-deps
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not notebook and not browser"

lab: install
	$(VENV)/bin/jupyter lab notebooks/01_quickstart.ipynb

zoo: install
	$(PY) -m geffect_lab zoo build --force

world: install
	$(PY) data/generate_world.py

lint: install
	$(VENV)/bin/ruff check geffect_lab tests benchmarks data

clean:
	rm -rf $(VENV) results .pytest_cache
