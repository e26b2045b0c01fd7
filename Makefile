# Every target installs what it needs into .venv first: `make serve` and `make test`
# are all the set-up a fresh machine needs (Python 3.11+ and make).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= ./var

.PHONY: serve test bench lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "orderstream needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "Installing orderstream and its dependencies into $(VENV) ..."
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/orderstream serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(VENV)/bin/python -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) var .pytest_cache
