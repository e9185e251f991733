# Quick start: `make demo` (the main job, end to end on CPU) and `make test` (the test suite).
# Both create and use a virtual environment in .venv/ at the repository root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on disk on our CI machines; GPU users keep their own CUDA build of torch
# (install the project with `pip install -e .` into an environment that already has it).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_DIR ?= demo_output

.PHONY: install test test-unit test-distributed test-learning test-gpu demo bench clean

$(VENV)/.installed: setup.py $(wildcard megatron_taskmoe/ops/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Exit code passes through (5 = no tests collected); .ci/run reports that case separately.
test: install
	$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; exit $$rc

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-distributed: install
	$(PY) -m pytest tests/distributed $(PYTEST_ARGS)

test-learning: install
	$(PY) -m pytest tests/learning $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest tests/gpu -m gpu $(PYTEST_ARGS)

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh $(DEMO_DIR)

clean:
	rm -rf build *.egg-info $(VENV) .pytest_cache
