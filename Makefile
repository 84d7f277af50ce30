# Quick start: `make demo` (the product end to end) and `make test` (everything CI runs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-containers lint demo bench services clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned in the same call so pip takes the local CPU build, not a multi-GB CUDA one.
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

services:
	bash scripts/services.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layering contract in pyproject.toml [tool.importlinter]

test: $(STAMP) services lint
	bash scripts/browser.sh $(BIN)/python
	$(BIN)/python -m pytest -q tests

# Only the container test (docs/deployment.md, "The container test"); `make test` runs it with everything else.
test-containers: $(STAMP)
	$(BIN)/python -m pytest -q tests/containers

demo: $(STAMP)
	$(BIN)/python -m scripts.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.core

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache var demo-output
