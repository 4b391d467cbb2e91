# The two commands of the README's quick start: `make serve` and `make test`.
# Both set up a virtual environment on first use (and again when pyproject.toml changes).

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: serve test lint install

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[local,dev]'
	touch $@

install: $(BIN)/.installed

serve: $(BIN)/.installed
	$(BIN)/imagegate serve

LINTED := src tests $(wildcard bench)

lint: $(BIN)/.installed
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

# The OpenAI Node SDK for tests/test_clients.py, when npm is here (that test skips without node).
NODE_TESTS := tests/node
NODE_SDK := $(if $(shell command -v npm 2>/dev/null),$(NODE_TESTS)/node_modules/.package-lock.json)

$(NODE_TESTS)/node_modules/.package-lock.json: $(NODE_TESTS)/package-lock.json
	npm ci --prefix $(NODE_TESTS) --no-audit --no-fund --loglevel=error

test: lint $(NODE_SDK)
	$(BIN)/pytest -q
