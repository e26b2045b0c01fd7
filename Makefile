# Every target installs what it needs into .venv first: `make serve` and `make test`
# are all the set-up a fresh machine needs (Python 3.11+ and make).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= ./var

.PHONY: serve test bench lint clean frontend screenshots

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "orderstream needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "Installing orderstream and its dependencies into $(VENV) ..."
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The playground (GraphiQL) and the live board: npm packages pinned in frontend/package-lock.json,
# bundled by frontend/build.mjs into orderstream/static. Built again when a source changes; the
# API serves without them.
NODE_MODULES_STAMP := frontend/node_modules/.installed-stamp
FRONTEND_STAMP := orderstream/static/.built-stamp
NODE_18 := $(shell node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 18 ? 1 : 0)' 2>/dev/null && echo yes)

$(NODE_MODULES_STAMP): frontend/package.json frontend/package-lock.json
	cd frontend && npm ci --prefer-offline --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $@

$(FRONTEND_STAMP): $(NODE_MODULES_STAMP) frontend/build.mjs $(wildcard frontend/src/*)
	cd frontend && npm run --silent build
	@touch $@

frontend:
ifeq ($(NODE_18),yes)
	@$(MAKE) -s --no-print-directory $(FRONTEND_STAMP) || \
		echo "The playground and /live failed to build (see above); the API serves without them"
else
	@echo "Node.js 18+ not found: the playground and /live are not built; the API serves without them"
endif

serve: $(STAMP) frontend
	$(VENV)/bin/orderstream serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

test: $(STAMP) frontend
	$(VENV)/bin/python -m pytest

# The README's pictures of both pages, taken by the browser tests.
screenshots: $(STAMP) frontend
	ORDERSTREAM_SCREENSHOTS=docs $(VENV)/bin/python -m pytest -q tests/test_browser.py -k "graphiql_runs or board_shows"

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

# The HTTP points are driven by wrk, a load generator in C (Debian's package wrk).
bench: $(BENCH_STAMP)
	@command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then echo "Installing wrk (apt-get install -y wrk) ..." && \
	    { apt-get install -y -q wrk || { apt-get update -q && apt-get install -y -q wrk; }; }; \
	  else echo "make bench needs wrk: run 'sudo apt-get install wrk' (Debian, Ubuntu) and try again" >&2; exit 1; fi; }
	$(VENV)/bin/python -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) var .pytest_cache orderstream/static frontend/node_modules
