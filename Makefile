# vqt-cache developer targets. `make help` lists them.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PIPELINE ?= pipelines/demo.toml
DEMO_STORE := data/cache/digits/tiny_vit_parity.zarr/zarr.json

.DEFAULT_GOAL := help
.PHONY: help setup test test-faults test-timing test-all lint format docs bench demo sweep clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install torch/torchvision (matching pair) and the package with dev extras

# The suite runs one test file per worker process (pytest-xdist), one core each: OMP_NUM_THREADS=1, or the workers'
# torch threads fight over the cores (4:18 instead of 2:17 on 2 cores). Plain `pytest` runs the same tests in one
# process.
test: $(STAMP)  ## run the test suite (CPU, 6 to 9 minutes on 2 cores; fault trials: `make test-faults`, timing: `make test-timing`)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --dist loadfile

test-faults: $(STAMP)  ## run the fault-injection trials (kill -9 inside writes, Ctrl-C, concurrent processes; ~3 min)
	$(PY) -m pytest -m faults

test-timing: $(STAMP)  ## plan's time estimate against the sweep it plans, alone on the machine (~1 min)
	$(PY) -m pytest -m timing

test-all: $(STAMP)  ## run every test, slow ones included
	$(PY) -m pytest -m ''

lint: $(STAMP)  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

docs: $(STAMP)  ## regenerate the docs' tables: benchmarks from bench/results.json, bad input from the tests' messages
	$(PY) -m bench.tables
	$(PY) -m pytest -q tests/test_bad_input.py --update-docs

bench: $(STAMP)  ## run the benchmarks, print a table, write bench/results.json and docs/benchmarks.md's tables
	$(PY) -m bench

demo: $(STAMP)  ## whole pipeline on the embedded digits data (no downloads)
	$(VENV)/bin/vqt-cache demo

sweep: $(STAMP) $(if $(filter pipelines/demo.toml,$(PIPELINE)),$(DEMO_STORE))  ## grid x datasets x seeds (PIPELINE=pipelines/demo.toml)
	$(VENV)/bin/vqt-cache sweep $(PIPELINE)

$(DEMO_STORE): | $(STAMP)
	$(VENV)/bin/vqt-cache demo

clean:  ## remove caches, runs and build artefacts (keeps .venv and the committed bench/results.json)
	rm -rf data/cache data/runs .pytest_cache .ruff_cache build dist *.egg-info
