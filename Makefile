# Two commands for a fresh machine with Python 3.11:
#   make repro   set everything up, then run the pipeline (dvc repro) on the embedded default
#   make test    set everything up, then lint (ruff, mypy) and run the tests (unit, integration, nbval, pipeline)
# make repro FORCE=1 runs every stage again (dvc repro --force); DRY=1 only prints what would run
# (dvc repro --dry). Every recipe runs with .venv/bin first on PATH (below): DVC's stage command
# `python -m prelogit.stage` must find the venv's python, which a bare .venv/bin/dvc does not give it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro lint test test-fast readme clean-smoke paper gpu

$(BIN)/.installed: pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so that no CUDA build is pulled in by a dependency.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

setup: $(BIN)/.installed

FORCE ?=
DRY ?=
# Only the value 1 switches an option on, so FORCE=0 means no.
REPRO_FLAGS = $(if $(filter 1,$(FORCE)), --force)$(if $(filter 1,$(DRY)), --dry)

repro: setup
	$(BIN)/dvc repro$(REPRO_FLAGS)

# ruff over the package, the tests and the benchmarks; mypy over the package (pyproject.toml's [tool.mypy])
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q --nbval-lax tests notebooks

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not pipeline" tests

readme: setup
	$(BIN)/python -m prelogit.report --update-readme

clean-smoke:
	rm -rf results/_smoke

# Extra options of python -m prelogit.paper for `make paper` and `make gpu`, e.g.
#   make paper PAPER_ARGS="--num_processes 2"     each generating stage as 2 processes, one per GPU
#   make paper PAPER_ARGS="--num_processes 2 --config_file default"   with accelerate's own configuration
#   make paper PAPER_ARGS="--check-only"          only the preflight checks
PAPER_ARGS ?=

# The paper's scale (needs a CUDA GPU and hub access; checks both first, see params-paper.yaml).
paper: setup
	HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0 $(BIN)/python -m prelogit.paper $(PAPER_ARGS)

# The embedded default with every test prompt to N = 256 (needs a CUDA GPU; see params-gpu.yaml).
gpu: setup
	$(BIN)/python -m prelogit.paper --params params-gpu.yaml --name embedded-gpu --no-hub-check $(PAPER_ARGS)
