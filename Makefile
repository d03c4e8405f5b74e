# agentbill: every target a developer or CI needs. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TS := clients/typescript
NPM_STAMP := $(TS)/node_modules/.installed

.DEFAULT_GOAL := help
.PHONY: help setup demo test static lint typecheck bench check clean ts-setup ts-typecheck ts-build \
	ts-test library

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "agentbill needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# This project was installed as `agentbill` before it was named agentbill-redis; both put
	@# files in agentbill/lua, so the old one goes first, before it can take shared files along.
	$(PY) -m pip uninstall --quiet --yes agentbill 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(STAMP)  ## create .venv and install agentbill with its dev tools

demo: $(STAMP)  ## several worker processes share budgets on the embedded local server
	$(PY) examples/demo.py

library: $(STAMP)  ## rebuild lua/library.lua (the Functions library) after editing lua/*.lua
	$(PY) -c 'from agentbill._scripts import write; print("wrote", write())'

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check agentbill tests benchmarks examples
	$(PY) -m ruff format --check agentbill tests benchmarks examples

typecheck: $(STAMP)  ## mypy --strict
	$(PY) -m mypy

$(NPM_STAMP): $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund
	touch $@

ts-setup: $(NPM_STAMP)  ## npm ci in clients/typescript (from the committed package-lock.json)

ts-typecheck: $(NPM_STAMP)  ## strict tsc --noEmit over the TypeScript client and its tests
	cd $(TS) && npm run --silent typecheck

ts-build: $(NPM_STAMP)  ## build the TypeScript package and its tests (ts-test does it first)
	cd $(TS) && npm run --silent pretest

# The suite's redis-server: the one the Python suite uses (PATH, else agentbill-redis[local]).
TS_TEST = cd $(TS) && AGENTBILL_REDIS_SERVER="$$($(CURDIR)/$(PY) -c 'from agentbill._local import find_server_binary as f; print(f())')" npm test

ts-test: $(STAMP) $(NPM_STAMP)  ## the TypeScript suite, against redis-server processes it starts
	$(TS_TEST)

# The server matrix: these run a second time with every server the suite starts a valkey-server
# (tests/_servers.py); the chaos report is written by the first run only, and the second runs the
# chaos scenarios at half size (AGENTBILL_CHAOS_SCALE) to keep make test under 20 minutes.
VALKEY_TESTS := tests/test_preflight.py tests/test_record.py tests/test_preflight_many.py \
	tests/test_budget_model.py tests/test_accounting.py tests/test_functions.py tests/chaos

# The steps that start no server and time nothing, side by side (mypy alone takes longest):
# lint, typecheck and ts-typecheck, and the TypeScript build, which the TypeScript suite then
# runs on without building again (npm test --ignore-scripts skips its pretest).
static: $(STAMP) $(NPM_STAMP)  ## lint, typecheck, ts-typecheck and ts-build at once
	@$(MAKE) --no-print-directory -j4 --output-sync=target lint typecheck ts-typecheck ts-build

test: static  ## lint, typecheck, the TypeScript suite, the Python suite (interop included), then the core and chaos tests on valkey-server
	$(TS_TEST) --ignore-scripts
	$(PY) -m pytest
	AGENTBILL_TEST_SERVER=valkey AGENTBILL_CHAOS_REPORT= AGENTBILL_CHAOS_SCALE=0.5 $(PY) -m pytest -q $(VALKEY_TESTS)

bench: $(STAMP) $(NPM_STAMP)  ## benchmarks (~4 min): writes benchmarks/RESULTS.md and benchmarks/results.png
	$(PY) -m benchmarks

check: test  ## everything CI runs

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis dist build
	rm -rf $(TS)/node_modules $(TS)/dist $(TS)/build $(TS)/lua
