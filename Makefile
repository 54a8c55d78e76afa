# Two entry points for a fresh machine (see README):
#   make sample   set up, then sample molecules with the shipped model
#   make test     set up, then run the test suite (what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first: on a machine without a GPU the CPU wheel; with one, PyPI's default CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-all sample evaluate lint clean

$(BIN)/moldiff: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/moldiff

setup: $(BIN)/moldiff

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

evaluate: setup
	$(BIN)/moldiff evaluate --dataset qm9:test

sample: setup
	$(BIN)/moldiff sample -n 100 --steps 50 -o out/samples

clean:
	rm -rf $(VENV) data/cache
