# Quick start: `make demo` (the product end to end) and `make test` (everything CI runs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: venv test test-containers lint demo bench services clean

# What the service, the demo and the benches need.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned in the same call so pip takes the local CPU build, not a multi-GB CUDA one. --no-compile: pip
	# would byte-compile all ~17,000 modules, most never imported; scripts/precompile.py compiles what is.
	$(BIN)/pip install -q --no-compile torch==2.13.0 -e .
	$(BIN)/python -m scripts.precompile
	touch $(STAMP)

# The test extras on top (pytest, ruff, browsers' drivers, podman-compose, ...): `make demo` does not wait for them.
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	$(BIN)/python -m scripts.precompile --all
	touch $(TEST_STAMP)

venv: $(TEST_STAMP)

services:
	bash scripts/services.sh

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layering contract in pyproject.toml [tool.importlinter]

test: $(TEST_STAMP) services lint
	bash scripts/browser.sh $(BIN)/python
	$(BIN)/python -m pytest -q tests

# Only the container test (docs/deployment.md, "The container test"); `make test` runs it with everything else.
test-containers: $(TEST_STAMP)
	$(BIN)/python -m pytest -q tests/containers

demo: $(STAMP)
	$(BIN)/python -m scripts.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.core

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache var demo-output
