# Quick start: `make demo` (the main job, end to end on CPU) and `make test` (the test suite).
# Both create and use a virtual environment in .venv/ at the repository root (Python 3.11, megatron-core 0.16.1).
# `make test-py312` runs the same suite in .venv312/ (Python 3.12, torch 2.14.1, megatron-core 0.19.2).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on disk on our CI machines; GPU users keep their own CUDA build of torch
# (install the project with `pip install -e .` into an environment that already has it).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_DIR ?= demo_output

# The newest megatron-core this project supports, which needs Python 3.12 (pyenv's when present). torch 2.14.1
# from PyPI is a CUDA build (about 5.5 GB with its CUDA libraries) that runs on the CPU; the permutation extension
# is built with its CPU kernels only (the CUDA sources are compile-checked by
# tests/integration/test_permute_cuda_build.py).
PYTHON312 ?= $(or $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12)),python3.12)
VENV312 := .venv312
PY312 := $(VENV312)/bin/python
TORCH312_SPEC ?= torch==2.14.1
MCORE312_SPEC ?= megatron-core==0.19.2

.PHONY: install test test-unit test-model test-integration test-distributed test-learning test-gpu install-py312 \
	test-py312 demo bench clean

$(VENV)/.installed: setup.py $(wildcard megatron_taskmoe/ops/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Test tiers, cheapest first: unit (no subprocess, no process group), model (megatron-core models in an in-process
# one-rank process group), integration (CLIs and pretrain_mt.py as subprocesses), distributed (gloo, several
# processes), learning (every system trained until it learns), gpu (skipped without CUDA).
TIERS := unit model integration distributed learning gpu

# Every tier in one pytest run, in that order. Exit code passes through (5 = no tests collected); .ci/run reports
# that case separately.
test: install
	$(PY) -m pytest $(TIERS:%=tests/%) $(PYTEST_ARGS); rc=$$?; exit $$rc

test-unit test-model test-integration test-distributed test-learning: test-%: install
	$(PY) -m pytest tests/$* $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest tests/gpu -m gpu $(PYTEST_ARGS)

$(VENV312)/.installed: setup.py $(wildcard megatron_taskmoe/ops/csrc/*)
	@$(PYTHON312) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null || { \
	  echo "make: PYTHON312=$(PYTHON312) is not a Python 3.12 interpreter; set PYTHON312=/path/to/python3.12" >&2; \
	  exit 2; }
	$(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY312) -m pip install --quiet "$(TORCH312_SPEC)" "$(MCORE312_SPEC)"
	TASKMOE_BUILD_CUDA=0 $(PY312) -m pip install --quiet --no-build-isolation -e '.[test]'
	touch $@

install-py312: $(VENV312)/.installed

# Same suite, same order, same exit-code convention as `make test`, except that the learning tier trains four
# systems (megatron's router and dispatcher, our task routers and adapters, the dense baseline) instead of all 15:
# every system is trained under 0.16.1 by `make test`, and CI runs both within its time. LEARNING_SYSTEMS_PY312=
# (empty) trains all of them here too.
LEARNING_SYSTEMS_PY312 ?= dense,moe_token,moe_task_shared_dynamic,kudugunta_target
test-py312: install-py312
	MEGATRON_TASKMOE_LEARNING_SYSTEMS=$(LEARNING_SYSTEMS_PY312) $(PY312) -m pytest $(TIERS:%=tests/%) $(PYTEST_ARGS); \
	rc=$$?; exit $$rc

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh $(DEMO_DIR)

clean:
	rm -rf build *.egg-info $(VENV) $(VENV312) .pytest_cache
