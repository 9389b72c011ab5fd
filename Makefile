# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC picks the torch build. The default is the CPU wheel that this project's
# machines carry on disk; elsewhere use e.g. `make test TORCH_SPEC='torch'` (CUDA build from PyPI)
# or install torch first from https://pytorch.org/get-started and set TORCH_SPEC=''.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: demo test install lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_SPEC),'$(TORCH_SPEC)') -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/datavalue demo --out runs/demo --overwrite

# Tests run in a random order (pytest-randomly); the seed is printed first and last
# ("Using --randomly-seed=N"). Rerun one order with: make test PYTEST_ARGS='--randomly-seed=N'
test: install
	$(PY) -m pytest -q -x --timeout=900 -p randomly $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check datavalue tests experiments benchmarks

bench: install
	$(PY) benchmarks/capture_overhead.py

clean:
	rm -rf runs/ .pytest_cache
