# agentbill: every target a developer or CI needs. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup demo test lint typecheck bench check clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "agentbill needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(STAMP)  ## create .venv and install agentbill with its dev tools

demo: $(STAMP)  ## several worker processes share budgets on the embedded local server
	$(PY) examples/demo.py

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check agentbill tests benchmarks examples
	$(PY) -m ruff format --check agentbill tests benchmarks examples

typecheck: $(STAMP)  ## mypy --strict
	$(PY) -m mypy

test: lint typecheck  ## lint, typecheck and the whole suite against real redis-server processes
	$(PY) -m pytest

bench: $(STAMP)  ## benchmarks (~4 min): writes benchmarks/RESULTS.md and benchmarks/results.png
	$(PY) -m benchmarks

check: test  ## everything CI runs

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis dist build
